"""The apply passes, in the onnxscript rewriter's test shape: inline ONNX text → checker → apply the
pass with a hand-made plan → the op list → numbers in ONNX Runtime (optimizations off) → checker.

Each pass only carries a decision out: the tests give it the decision and check it did exactly that.
"""

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgeq import meta
from edgeq.passes.activation_qdq import ActivationQDQPass
from edgeq.passes.protect import ProtectOutliersPass
from edgeq.passes.scale_inputs import ScaleInputsPass
from edgeq.passes.weight_qdq import WeightQDQPass
from edgeq.pipeline.apply import RecordPlanPass
from edgeq.quant import formats
from edgeq.quant.plan import ActivationDecision, IntegerBias, Protection, QuantPlan, Scaling, WeightDecision
from edgeq.quant.recipes import ActFormat, WeightFormat, preset
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((8, 6)) * 0.5).astype(np.float32)
B = (RNG.standard_normal(6) * 0.1).astype(np.float32)
TEXT = f"""
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 8] x) => (float[2, 6] y)
<float[8, 6] w = {{{", ".join(f"{v:.6f}" for v in W.reshape(-1))}}}, float[6] b = {{{", ".join(f"{v:.6f}" for v in B)}}}>
{{
    r = Relu (x)
    y = Gemm (r, w, b)
}}
"""
FEED = {"x": RNG.standard_normal((2, 8)).astype(np.float32) * 2}


def _model() -> ir.Model:
    proto = onnx.parser.parse_model(TEXT)
    onnx.checker.check_model(proto, full_check=True)
    m = ir.from_proto(proto)
    for i, n in enumerate(m.graph):
        n.name = f"{n.op_type.lower()}_{i}"
    return m


def _run(model: ir.Model) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort_session(proto.SerializeToString(), optimize=False).run(None, FEED)[0]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _int8_plan(model: ir.Model, **extra) -> QuantPlan:
    d = WeightDecision("gemm_1", "Gemm", 1, "w", (8, 6), WeightFormat.INT8, axis=1)
    q = formats.quantize_int8_per_channel(W, 1)
    return QuantPlan("t", "onnxruntime-cpu", (d,), (), codes={"w": q}, **extra)


def test_weight_pass_stores_the_plans_integers_and_corrected_bias():
    model = _model()
    corrected = (B - 0.01).astype(np.float32)
    plan = _int8_plan(model, biases={"gemm_1": corrected})
    res = WeightQDQPass(plan)(model)
    assert res.modified and _ops(model) == ["Relu", "DequantizeLinear", "Gemm"]
    dq = list(model.graph)[1]
    assert meta.role_of(dq.metadata_props) == meta.Role.WEIGHT and dq.metadata_props[meta.SOURCE] == "gemm_1"
    stored = model.graph.initializers["gemm_1/w_quantized"].const_value.numpy()
    np.testing.assert_array_equal(stored, plan.codes["w"].data)  # exactly the plan's codes
    assert "w" not in model.graph.initializers and "b" not in model.graph.initializers
    want = np.maximum(FEED["x"], 0) @ plan.codes["w"].dequantize() + corrected
    np.testing.assert_allclose(_run(model), want, rtol=1e-5, atol=1e-5)


def test_weight_pass_requires_integers_for_every_planned_weight():
    model = _model()
    plan = replace(_int8_plan(model), codes={})
    with pytest.raises(ir.passes.PreconditionError, match="no integers"):
        WeightQDQPass(plan)(model)


def test_activation_pass_inserts_the_planned_pairs_and_int32_bias():
    model = _model()
    plan = _int8_plan(model)
    WeightQDQPass(plan)(model)
    scale = 0.02
    s_w = plan.codes["w"].scale
    bias = IntegerBias("gemm_1", np.rint(B / (scale * s_w)).astype(np.int32), (scale * s_w).astype(np.float32))
    act = ActivationDecision("r", ("gemm_1",), "r", ActFormat.UINT8, scale, 0, 0.0, 255 * scale, source="r")
    plan = replace(plan, activations=(act,), integer_biases=(bias,))
    ActivationQDQPass(plan)(model)
    assert _ops(model) == ["Relu", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Gemm"]
    roles = [meta.role_of(n.metadata_props) for n in model.graph]
    assert roles[1:5] == [meta.Role.ACT_QUANTIZE, meta.Role.ACT_DEQUANTIZE, meta.Role.WEIGHT, meta.Role.BIAS]
    x = np.clip(np.rint(np.maximum(FEED["x"], 0) / scale), 0, 255) * scale
    want = x @ plan.codes["w"].dequantize() + bias.data * bias.scale
    np.testing.assert_allclose(_run(model), want, rtol=1e-5, atol=1e-5)


def test_scale_inputs_is_exact_in_float_and_marks_its_mul():
    model = _model()
    before = _run(model)
    s = np.linspace(0.5, 4.0, 8).astype(np.float32)
    ScaleInputsPass([Scaling("r", ("gemm_1",), s, "awq")])(model)
    assert _ops(model) == ["Relu", "Mul", "Gemm"]
    mul = list(model.graph)[1]
    assert meta.role_of(mul.metadata_props) == meta.Role.SCALING and mul.metadata_props[meta.SOURCE] == "r"
    assert mul.outputs[0].name == "r_smoothed"
    assert sqnr_db(before, _run(model)) > 120  # (x / s) · (diag(s) W) = x · W up to float rounding


MATMUL_TEXT = f"""
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 8] x) => (float[2, 6] y)
<float[8, 6] w = {{{", ".join(f"{v:.6f}" for v in W.reshape(-1))}}}>
{{
    r = Relu (x)
    y = MatMul (r, w)
}}
"""


def test_protect_pass_is_exact_in_float_and_keeps_the_output_name():
    proto = onnx.parser.parse_model(MATMUL_TEXT)
    model = ir.from_proto(proto)
    for i, n in enumerate(model.graph):
        n.name = f"{n.op_type.lower()}_{i}"
    before = _run(model)
    p = Protection("r", ("matmul_1",), np.array([2, 5]), np.array([9.0, 6.0]), 48, 12)
    ProtectOutliersPass([p])(model)
    assert _ops(model) == ["Relu", "Mul", "Gather", "MatMul", "MatMul", "Add"]
    roles = [meta.role_of(n.metadata_props) for n in model.graph]
    assert roles == [None, meta.Role.PROTECT_MASK, meta.Role.PROTECT_GATHER, None, meta.Role.PROTECT_MATMUL,
                     meta.Role.PROTECT_ADD]
    assert model.graph.outputs[0].name == "y"
    assert np.all(model.graph.initializers["w"].const_value.numpy()[[2, 5]] == 0)  # rows P left the grid
    assert sqnr_db(before, _run(model)) > 120


def test_record_plan_pass_writes_the_model_metadata():
    model = _model()
    plan = _int8_plan(model)
    RecordPlanPass(plan, preset("w8a16"), None)(model)
    props = model.metadata_props
    assert props[meta.RECIPE] == "w8a16" and props[meta.PROFILE] == "onnxruntime-cpu"
    assert '"int8": 1' in props[meta.SUMMARY] and meta.CALIBRATION not in props
