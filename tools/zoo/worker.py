"""One zoo job in its own process (``python tools/zoo/worker.py JOB.json``), so a crash, a hang
(killed on timeout) or the memory of one model does not take the benchmark down.

Jobs: ``ort`` — ONNX Runtime's ``quantize_static`` baseline (QDQ, per-channel int8 weights, uint8
activations, MinMax) after ORT's own pre-processing; ``eval`` — a model's natural metric for one
candidate (a package folder run by edgeq's runner for its format, or a QDQ ONNX in ORT) against
the float ONNX in ORT. The result (or the error) is written to ``job["result"]`` as JSON.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]  # tools/, the repo

from edgeq.errors import first_line  # noqa: E402


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + first_line(e)


def _ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _session_run(path: str):
    sess = _ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}

    def run(feed):
        return dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in inputs})))

    return run


def ort_static(job: dict) -> dict:
    """``quant_pre_process`` (symbolic shape inference skipped when it fails), then ``quantize_static``.

    ORT's quantizer writes per-channel ``DequantizeLinear`` nodes (``axis``, opset 13) into models
    of opset 11/12 without raising the opset, and ORT then refuses the file. When that happens the
    float model is converted to opset 13 with onnx's version converter and quantized again (what an
    ORT user does next); the notes say so.
    """
    notes: list[str] = []
    out = Path(job["out"])
    src = job["float"]
    try:
        seconds = _ort_quantize(src, out, Path(job["calib"]), notes)
        _ort_session(str(out))
        return {"seconds": seconds, "notes": notes}
    except Exception as e:
        import onnx

        opset = next((o.version for o in onnx.load(src, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset >= 13:
            raise
        notes.append(f"as shipped (opset {opset}): {_first_line(e)}; converted to opset 13 and quantized again")
        from onnx import version_converter

        conv = out.with_name(out.stem + ".opset13.onnx")
        onnx.save(version_converter.convert_version(onnx.load(src), 13), str(conv))
        try:
            seconds = _ort_quantize(str(conv), out, Path(job["calib"]), notes)
        finally:
            conv.unlink(missing_ok=True)
        _ort_session(str(out))
        return {"seconds": seconds, "notes": notes, "opset_converted": True}


def _ort_quantize(src: str, out: Path, calib: Path, notes: list[str]) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from zoo.data import read_feeds

    prep = out.with_name(out.stem + ".prep.onnx")
    try:
        quant_pre_process(src, str(prep))
        src = str(prep)
    except Exception as e:
        notes.append(f"pre-processing failed ({_first_line(e)}); retried without symbolic shape inference")
        try:
            quant_pre_process(src, str(prep), skip_symbolic_shape=True)
            src = str(prep)
        except Exception as e2:
            notes.append(f"pre-processing failed again ({_first_line(e2)}); quantizing without it")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(read_feeds(calib))

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    try:
        quantize_static(src, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prep.unlink(missing_ok=True)
    return time.perf_counter() - t0


def evaluate(job: dict) -> dict:
    import numpy as np

    from zoo.data import read_feeds
    from zoo.models import ZOO

    model = ZOO[job["model"]]
    folder = Path(job["data"])
    feeds = read_feeds(folder / "eval")
    with np.load(folder / "extra.npz", allow_pickle=False) as z:
        extra = {k: z[k] for k in z.files}
    float_run = _session_run(job["float"])
    cand = job["candidate"]
    if Path(cand).is_dir():  # a package: edgeq's runner for its format (ORT for .ort, the reference executor for .mlpackage)
        from edgeq.validate.runners import open_runner

        runner = open_runner(cand)
        cand_run = runner.run
    else:
        cand_run = _session_run(cand)
    t0 = time.perf_counter()
    res = model.metric(float_run, cand_run, feeds, extra)
    res["seconds"] = time.perf_counter() - t0
    return res


def main(spec: str) -> int:
    job = json.loads(Path(spec).read_text())
    try:
        result = {"ok": True, **{"ort": ort_static, "eval": evaluate}[job["kind"]](job)}
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": _first_line(e)}
    Path(job["result"]).write_text(json.dumps(result, indent=1, default=float))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
