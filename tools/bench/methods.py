"""The quantization methods compared, one registry entry each, run inside a worker subprocess.

A method's ``run(job)`` reads the float model at ``job["model_path"]`` and the calibration
feeds in ``job["calib_dir"]`` (read lazily, batch by batch), writes ``job["out_path"]`` and
returns what it measured: ``quantize_s`` (the tool's own calls, model loading and ORT's
pre-processing included), notes, and anything tool-specific. Settings follow each tool's
documented way to get the format named; where a tool needs a choice, it is stated in ``notes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.data import LazyFeeds
from edgeq.errors import first_line


@dataclass(frozen=True)
class Method:
    name: str
    tool: str  # edgeq | onnxruntime | nncf
    summary: str
    run: Callable[[dict], dict]
    calibrated: bool = False  # uses activation statistics (and so the calibration data)
    python: str = "main"  # "main": the benchmark's interpreter; "nncf": the NNCF interpreter
    retry_fixed_length: bool = False  # on failure with varying sequence lengths, try fixed padding


def _first_line(e: BaseException) -> str:
    return first_line(e, 400)


def rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- edgeq ---------------------------------------------------------------------------------

def _edgeq(recipe: str, block: int | None = None) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        import edgeq

        kwargs = {"calib": LazyFeeds(job["calib_dir"]), "force": True}
        if block is not None:
            kwargs["block"] = block
        before = rss_mb()
        t0 = time.perf_counter()
        res = edgeq.quantize(job["model_path"], job["out_path"], recipe, **kwargs)
        seconds = time.perf_counter() - t0
        out = {"quantize_s": seconds, "rss_before_mb": before, "tool_ideal_bytes": int(res.ideal_bytes),
               "plan": res.plan.summary(), "notes": []}
        table = getattr(res, "calibration", None)
        if table is not None:
            out["calibration"] = {"batches": table.batches, "samples": table.samples,
                                  "observer_state_bytes": int(table.peak_state_bytes)}
        return out

    return run


# The budget a budget-search row aims at, per task. The search scores its variants on the
# calibration split (the evaluation split stays for the table's fidelity columns).
BUDGETS = {"classification": "top1_agreement>=0.97", "embedding": "cosine>=0.999"}


def _edgeq_budget(recipe: str) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        from edgeq.pipeline.budget import search

        budget = BUDGETS[job["task"]]
        feeds = LazyFeeds(job["calib_dir"])
        before = rss_mb()
        t0 = time.perf_counter()
        res = search(job["model_path"], recipe, budget, job["out_path"], calib=feeds, data=list(feeds), force=True,
                     progress=False)
        raised = ", ".join(f"{r.node}->{r.level}" for r in res.raised) or "none"
        return {"quantize_s": time.perf_counter() - t0, "rss_before_mb": before,
                "notes": [f"budget {budget} searched on the calibration split: {'met' if res.met else 'NOT met'} "
                          f"({res.budget.metric} {res.base:.4g} -> {res.final:.4g}); layers raised: {raised}"]}

    return run


# ---- ONNX Runtime ----------------------------------------------------------------------------

def _ort_preprocess(src: str, dst: Path) -> tuple[str, float, list[str]]:
    """ORT's recommended pre-processing; symbolic shape inference skipped if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    notes = []
    try:
        quant_pre_process(src, str(dst))
        notes.append("ORT pre-processing: full (symbolic shape inference, ONNX shape inference, optimization)")
    except Exception as e:
        notes.append(f"ORT pre-processing failed with symbolic shape inference ({type(e).__name__}: {_first_line(e)}); "
                     "re-ran it with skip_symbolic_shape=True")
        try:
            quant_pre_process(src, str(dst), skip_symbolic_shape=True)
        except Exception as e2:
            notes.append(f"ORT pre-processing failed again ({type(e2).__name__}: {_first_line(e2)}); "
                         "quantizing the raw export")
            return src, time.perf_counter() - t0, notes
    return str(dst), time.perf_counter() - t0, notes


class _Reader:
    """An ORT ``CalibrationDataReader`` over a folder of feeds, read lazily."""

    def __init__(self, folder: str):
        self.folder = folder
        self.feeds = LazyFeeds(folder)
        self._it = iter(self.feeds)

    def __deepcopy__(self, memo):  # ORT's GPTQ deep-copies its reader: a fresh pass over the same files
        return type(self)(self.folder)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):  # the base class API, spelled out
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _ort_with_prep(quantize: Callable[[str, dict], None]) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        out = Path(job["out_path"])
        prep = out.with_name(out.stem + ".prep.onnx")
        before = rss_mb()
        t0 = time.perf_counter()
        src, prep_s, notes = _ort_preprocess(job["model_path"], prep)
        try:
            quantize(src, job)
        finally:
            prep.unlink(missing_ok=True)
        return {"quantize_s": time.perf_counter() - t0, "prep_s": prep_s, "rss_before_mb": before, "notes": notes}

    return run


def _ort_static(method_name: str) -> Callable[[dict], dict]:
    def quantize(src: str, job: dict) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        reader = _ort_reader(job["calib_dir"])
        quantize_static(src, job["out_path"], reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method_name))

    return _ort_with_prep(quantize)


def _ort_dynamic(src: str, job: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, job["out_path"], per_channel=True, weight_type=QuantType.QInt8)


def _ort_rtn(with_gather: bool) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        ops = ("MatMul", "Gather") if with_gather else ("MatMul",)
        axes = (("MatMul", 0), ("Gather", 1))
        before = rss_mb()
        t0 = time.perf_counter()
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, op_types_to_quantize=ops, quant_axes=axes)
        q = MatMulNBitsQuantizer(onnx.load(job["model_path"]), block_size=32, is_symmetric=True,
                                 op_types_to_quantize=ops, quant_axes=axes, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(job["out_path"], use_external_data_format=False)
        return {"quantize_s": time.perf_counter() - t0, "rss_before_mb": before,
                "notes": [f"DefaultWeightOnlyQuantConfig (RTN), int4 symmetric, block 32, ops {'+'.join(ops)}"]}

    return run


def _ort_reader(folder: str):
    from onnxruntime.quantization import CalibrationDataReader

    return type("Reader", (_Reader, CalibrationDataReader), {})(folder)


def _ort_nbits(algo: str) -> Callable[[dict], dict]:
    """MatMulNBitsQuantizer int4, blocks (groups) of 32 along K, with one of ORT's other algorithms.

    GPTQ and k-quant run ORT's own copy of Intel Neural Compressor's weight-only code
    (``onnxruntime.quantization.neural_compressor``: numpy and ORT, not the neural-compressor
    package); HQQ runs in torch. All three quantize MatMul only: GPTQ and k-quant take only
    MatMul nodes whatever ``op_types_to_quantize`` says, and HQQ raises on Gather (its float zero
    points do not fit GatherBlockQuantized), so none has a Gather variant.
    """

    def run(job: dict) -> dict:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        ops = ("MatMul",)
        before = rss_mb()
        t0 = time.perf_counter()
        if algo == "gptq":
            reader = _ort_reader(job["calib_dir"])
            cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01, block_size=128,
                                                actorder=False, mse=False, perchannel=True, op_types_to_quantize=ops)
            note = ("GPTQWeightOnlyQuantConfig (ORT's bundled INC GPTQ), int4 asymmetric (zero point per block), "
                    "group 32, MatMul only; percdamp 0.01, GPTQ column block 128, actorder off, mse off, "
                    f"perchannel on (ORT's defaults); Hessians from all {len(reader.feeds)} calibration batches")
        elif algo == "hqq":
            cfg = mnq.HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=ops)
            note = ("HQQWeightOnlyQuantConfig (torch, no calibration data), int4 with float scale and zero point "
                    "per block of 32 along K, MatMul only; HQQ's default solver (lp 0.7, 20 iterations)")
        elif algo == "kquant":
            cfg = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=ops)
            note = ("KQuantWeightOnlyQuantConfig (ORT's bundled INC k-quant: scale/zero-point search per block), "
                    "int4 asymmetric, group 32, MatMul only, no calibration data")
        else:
            raise ValueError(f"unknown MatMulNBits algorithm {algo!r}")
        q = mnq.MatMulNBitsQuantizer(onnx.load(job["model_path"]), bits=4, block_size=32, is_symmetric=False,
                                     op_types_to_quantize=ops, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(job["out_path"], use_external_data_format=False)
        return {"quantize_s": time.perf_counter() - t0, "rss_before_mb": before, "notes": [note]}

    return run


# ---- NNCF ----------------------------------------------------------------------------------

def _nncf_int8(job: dict) -> dict:
    import nncf
    import onnx

    feeds = LazyFeeds(job["calib_b1_dir"])
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if job["task"] == "embedding" else {}
    before = rss_mb()
    t0 = time.perf_counter()
    model = onnx.load(job["model_path"])
    q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)
    onnx.save(q, job["out_path"])
    notes = [f"nncf {nncf.__version__} quantize, defaults, subset_size={len(feeds)} single-sample feeds"
             + (", model_type=TRANSFORMER" if kwargs else "")]
    return {"quantize_s": time.perf_counter() - t0, "rss_before_mb": before, "notes": notes}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("edgeq-w8a8", "edgeq", "edgeq W8A8: int8 per-channel weights, uint8 calibrated activations",
           _edgeq("w8a8"), calibrated=True),
    Method("edgeq-w8a8-budget", "edgeq",
           "edgeq W8A8 + accuracy budget search (top1_agreement>=0.97 / cosine>=0.999 on the calibration split)",
           _edgeq_budget("w8a8"), calibrated=True),
    Method("edgeq-w8a16", "edgeq", "edgeq W8A16: int8 per-channel weights only", _edgeq("w8a16")),
    Method("edgeq-w4a16", "edgeq", "edgeq W4A16: int4 block 32 weights (embeddings too)", _edgeq("w4a16", block=32)),
    Method("edgeq-mxfp4", "edgeq",
           "edgeq MXFP4: fp4 e2m1 + power-of-two scale per 32 (falls back where ORT can't run it)",
           _edgeq("mxfp4")),
    Method("ort-static-minmax", "onnxruntime", "ORT quantize_static QDQ per-channel, MinMax (w int8, a uint8)",
           _ort_static("MinMax"), calibrated=True),
    Method("ort-static-percentile", "onnxruntime", "ORT quantize_static QDQ per-channel, Percentile (w int8, a uint8)",
           _ort_static("Percentile"), calibrated=True, retry_fixed_length=True),
    Method("ort-static-entropy", "onnxruntime", "ORT quantize_static QDQ per-channel, Entropy (w int8, a uint8)",
           _ort_static("Entropy"), calibrated=True, retry_fixed_length=True),
    Method("ort-dynamic", "onnxruntime", "ORT quantize_dynamic per-channel (w int8, activations quantized at run time)",
           _ort_with_prep(_ort_dynamic)),
    Method("ort-rtn-b32", "onnxruntime", "ORT MatMulNBitsQuantizer RTN int4 block 32, MatMul only", _ort_rtn(False)),
    Method("ort-rtn-b32-gather", "onnxruntime", "ORT MatMulNBitsQuantizer RTN int4 block 32, MatMul + Gather",
           _ort_rtn(True)),
    Method("ort-gptq-b32", "onnxruntime", "ORT MatMulNBitsQuantizer GPTQ int4 asymmetric block 32, MatMul only",
           _ort_nbits("gptq"), calibrated=True),
    Method("ort-hqq-b32", "onnxruntime", "ORT MatMulNBitsQuantizer HQQ int4 block 32 (float zero points), MatMul only",
           _ort_nbits("hqq")),
    Method("ort-kquant-b32", "onnxruntime", "ORT MatMulNBitsQuantizer k-quant int4 asymmetric block 32, MatMul only",
           _ort_nbits("kquant")),
    Method("nncf-int8", "nncf", "NNCF post-training quantization of the ONNX model (int8, its defaults)",
           _nncf_int8, calibrated=True, python="nncf"),
]}

DEFAULT_METHODS = list(METHODS)
RSS_METHODS = ("edgeq-w8a8", "ort-static-minmax")  # the peak-RSS-versus-sample-count study
