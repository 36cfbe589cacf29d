"""A table tied between the embedding and the output layer (a language model's lm_head): one format,
one set of integers, stored once — GatherBlockQuantized and MatMulNBits on the same packed bytes for
ONNX Runtime, one DequantizeLinear feeding both readers elsewhere; exact against the dequantized table."""

import numpy as np
import onnx
import pytest
from helpers import tied_lm
from onnx import numpy_helper

from edgeq.pipeline.quantize import quantize_model
from edgeq.quant.profile import ONNX_REFERENCE, ONNXRUNTIME_CPU
from edgeq.runtime import ort_session

V, D = 96, 64


def _tied_lm(path):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, D)).astype(np.float32)
    mix = (rng.standard_normal((D, D)) / 8).astype(np.float32)
    return tied_lm(path, table, mix), table, mix


@pytest.mark.parametrize("recipe", ["w4a16", "w8a16"])
@pytest.mark.parametrize("profile", [ONNXRUNTIME_CPU, ONNX_REFERENCE])
def test_the_tied_table_is_stored_once_and_read_exactly(tmp_path, recipe, profile):
    src, table, mix = _tied_lm(tmp_path / "lm.onnx")
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, recipe, profile=profile, progress=False)
    tied = [d for d in res.plan.weights if d.weight == "table"]
    assert [d.node for d in tied] == ["embed", "lm_head"] and len({d.format for d in tied}) == 1
    assert res.plan.coverage() == {"quantized": 2, "quantizable": 2}  # the table counts once
    proto = onnx.load(str(out))
    sizes = {t.name: t for t in proto.graph.initializer}
    big = [n for n, t in sizes.items() if np.prod(t.dims) >= V * D // 2 and n.startswith("table")]
    assert len(big) == 1, big  # the table's integers, once (no float copy, no second integer copy)
    ops = [n.op_type for n in proto.graph.node]
    if profile is ONNXRUNTIME_CPU:
        assert {"GatherBlockQuantized", "MatMulNBits"} <= set(ops) and "Transpose" not in ops
    else:
        assert ops.count("DequantizeLinear") >= 1 and "Transpose" in ops
    codes = res.plan.codes["table"]
    deq = codes.dequantize()
    ids = np.array([[0, 5, 95, 5, 17]], np.int64)
    if profile is ONNX_REFERENCE:
        return  # the DQ-23 form is for onnx.reference / Core ML, not ONNX Runtime
    e, logits = (ort_session(out, optimize=False).run(["e", "logits"], {"input_ids": ids}))
    np.testing.assert_array_equal(e, deq[ids])  # only the looked-up rows, exactly the dequantized table
    h = e @ res.plan.codes["mix"].dequantize()
    ref = h @ deq.T
    # MatMulNBits at accuracy level 4 computes with int8 activations: close to, not equal to, float
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize(("recipe_text", "bits"), [
    ("", 8),  # the w4a16 preset: int4 projections, the tied table int8 (the output layer is the most sensitive)
    ('tied_table = "int4"\n', 4),
])
def test_w4a16_stores_the_tied_table_as_the_recipe_says(tmp_path, recipe_text, bits):
    src, table, _ = _tied_lm(tmp_path / "lm.onnx")
    if recipe_text:
        recipe = tmp_path / "r.toml"
        recipe.write_text('name = "w4-tied4"\n[default]\nweights = "int4"\n' + recipe_text)
    else:
        recipe = "w4a16"
    res = quantize_model(src, tmp_path / "q.onnx", recipe, profile=ONNXRUNTIME_CPU, progress=False)
    formats = {d.node: d.format.value for d in res.plan.weights}
    assert formats == {"embed": f"int{bits}", "lm_head": f"int{bits}", "mix": "int4"}
    assert "tied_table" in next(d.reason for d in res.plan.weights if d.node == "embed") or recipe_text
    nodes = {n.op_type: n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    for op in ("GatherBlockQuantized", "MatMulNBits"):
        assert next(a.i for a in nodes[op].attribute if a.name == "bits") == bits
    codes = res.plan.codes["table"]
    assert codes.block_size == 32
    # int8 symmetric (a GGUF's Q8_0 table exactly); int4 with a zero point per block (the asymmetric default)
    assert codes.zero_point is None if bits == 8 else codes.zero_point.shape == (V, D // 32)


def test_a_table_on_the_q8_0_grid_comes_back_exactly(tmp_path):
    """GGUF's Q8_0 (the SmolLM2 table): fp16 scale · int8 code per block of 32. The w4a16 preset's int8
    tied table (blocks of 32, symmetric, round to nearest) finds the same scales and codes: no error."""
    src, _, _ = _tied_lm(tmp_path / "lm.onnx")
    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, (V, D)).astype(np.float32)
    q[:, ::32] = 127 * np.sign(rng.standard_normal((V, D // 32)))  # each block reaches ±127, as Q8_0's do
    d = (rng.uniform(1e-3, 2e-2, (V, D // 32))).astype(np.float16).astype(np.float32)
    grid = (q.reshape(V, D // 32, 32) * d[..., None]).reshape(V, D)
    model = onnx.load(str(src))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(grid, "table"))
    onnx.save(model, str(src))
    res = quantize_model(src, tmp_path / "q.onnx", "w4a16", profile=ONNXRUNTIME_CPU, progress=False)
    np.testing.assert_array_equal(res.plan.codes["table"].dequantize(), grid)
