"""Builders shared by tests: tiny ONNX models from text."""

import numpy as np
import onnx


def make_onnx(text: str, path) -> str:
    """Parse ONNX text (onnx.parser syntax), check it, save it, return the path."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


MLP_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
mlp (float[batch, 4] x) => (float[batch, 3] y) <float[4, 8] w1 = {%s}, float[8] b1 = {%s}, float[8, 3] w2 = {%s}>
{
    h = MatMul(x, w1)
    hb = Add(h, b1)
    r = Relu(hb)
    y = MatMul(r, w2)
}
"""


def mlp_text(scale2: float = 1.0, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal(32).round(3)
    b1 = rng.standard_normal(8).round(3)
    w2 = (rng.standard_normal(24) * scale2).round(3)
    fmt = lambda a: ", ".join(f"{v:.3f}" for v in a)  # noqa: E731
    return MLP_TEXT % (fmt(w1), fmt(b1), fmt(w2))


def optimized_ops(path, folder) -> list[str]:
    """Op types of the graph ONNX Runtime runs for the model at ``path`` (level ALL), in order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def decided_plan(model, recipe, profile=None, calib=None):
    """``make_plan`` + the algorithms' decisions (without data: nearest rounding), as quantize_model makes it."""
    from edgeq.pipeline.quantize import decide, resolve_profile
    from edgeq.quant.plan import make_plan
    from edgeq.quant.recipes import resolve_recipe

    rec, prof = resolve_recipe(recipe), resolve_profile(profile)
    [(plan, _)] = decide(model, [make_plan(model, rec, profile=prof)], rec, [prof], calib, progress=False)
    return plan


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises (its pybind classes), for tests that expect ORT to refuse a model."""
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return tuple(getattr(s, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented",
                                         "NoSuchFile", "RuntimeException") if hasattr(s, n))


def count_calibrations(monkeypatch) -> list[int]:
    """Patch quantize's calibration pass to record each pass's batch count in the list returned."""
    from edgeq.pipeline import quantize as qmod

    calls = []
    real = qmod.calibrate

    def counting(model, statistics, feeds, **kw):
        table = real(model, statistics, feeds, **kw)
        calls.append(table.batches)
        return table

    monkeypatch.setattr(qmod, "calibrate", counting)
    return calls


def tied_lm(path, table: np.ndarray, mix: np.ndarray, *, outputs=("e",)):
    """A language model's skeleton with a tied table: Gather(table) -> MatMul(mix) -> MatMul(table^T), saved to
    ``path``; the logits and the named intermediates (``e`` embedded, ``h`` mixed) are outputs."""
    from onnx import TensorProto, helper, numpy_helper

    v, d = table.shape
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "mix"], ["h"], name="mix"),
         helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="lm_head_t"),
         helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", v]),
         *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", d]) for n in outputs)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(mix, "mix")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def cli(capsys, *argv) -> str:
    """Run the edgeq CLI in-process; its stdout (the exit code must be 0)."""
    from edgeq.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out
