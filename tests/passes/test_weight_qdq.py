"""The weight QDQ pass on tiny models: right numbers in ONNX Runtime, the forms ORT fuses."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from helpers import decided_plan, ort_errors

from edgeq.passes.weight_qdq import WeightQDQPass
from edgeq.quant.profile import ONNX_REFERENCE
from edgeq.quant.weights import quantize_weight
from edgeq.validate.metrics import sqnr_db


TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[2, 5] ids) => (float[10, 8] y)
<float[50, 64] emb = {%s}, float[64, 96] w = {%s}, float[8, 96] g = {%s}, int64[2] shape = {10, 96}>
{
    e = Gather <axis = 0> (emb, ids)
    h = MatMul (e, w)
    hf = Reshape (h, shape)
    y = Gemm <transB = 1> (hf, g)
}
"""


def _model(seed=0):
    rng = np.random.default_rng(seed)
    vals = [rng.standard_normal(n).astype(np.float32) for n in (50 * 64, 64 * 96, 8 * 96)]
    m = ir.from_onnx_text(TEXT % tuple(", ".join(f"{v:.5f}" for v in a) for a in vals))
    for i, n in enumerate(m.graph):
        n.name = f"{n.op_type.lower()}_{i}"
    return m


FEED = {"ids": np.array([[1, 7, 3, 49, 0], [5, 5, 12, 30, 2]], dtype=np.int64)}


def _run(model: ir.Model, optimized_path=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, FEED)[0]


def _dequantized_reference(model: ir.Model, plan) -> ir.Model:
    """The float model with each planned weight replaced by its dequantized value (numpy)."""
    ref = ir.from_proto(ir.to_proto(model))
    inits = ref.graph.initializers
    for d in plan.weights:
        w = inits[d.weight].const_value.numpy()
        q = quantize_weight(w, d)
        dq = q.dequantize()
        if d.form == "gather_block_quantized" and q.scale.dtype == np.float16:
            dq = dq.astype(np.float16).astype(np.float32)  # the fused Gather's output is the scale's type
        inits[d.weight].const_value = ir.tensor(dq.T if d.transpose else dq, name=d.weight)
    return ref


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
def test_ort_computes_the_planned_integers(recipe):
    model = _model()
    plan = decided_plan(model, recipe)
    expected = _run(_dequantized_reference(model, plan))
    float_out = _run(model)
    q = ir.from_proto(ir.to_proto(model))
    res = WeightQDQPass(plan)(q)
    assert res.modified
    proto = ir.to_proto(q)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in q.graph]
    # the table's rows are gathered before they are scaled (int8: plain ONNX; int4: the fused kernel)
    assert ops[:5 if recipe == "w8a16" else 2] == (["Gather", "Gather", "Cast", "Unsqueeze", "Mul"] if recipe == "w8a16"
                                                   else ["GatherBlockQuantized", "Cast"])
    assert ops.count("DequantizeLinear") == 2  # the MatMul and the Gemm weights
    assert not [i for i in q.graph.initializers if i in ("emb", "w", "g")]  # float weights gone
    got = _run(q, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # unfused ORT equals numpy dequantization up to float rounding (threshold 100 dB)
    assert sqnr_db(expected, got) > 100
    # and quantization error vs float is what the format allows (int8 > 30 dB, int4 > 12 dB)
    assert sqnr_db(float_out, got) > (30 if recipe == "w8a16" else 12)


def test_int4_matmul_is_fused_into_matmulnbits(tmp_path):
    model = _model()
    plan = decided_plan(model, "w4a16")
    WeightQDQPass(plan)(model)
    _run(model, optimized_path=tmp_path / "opt.onnx")
    ops = [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ("com.microsoft", "MatMulNBits") in ops
    gemm = [d for d in plan.weights if d.op_type == "Gemm"][0]
    assert gemm.transpose  # Gemm transB=1 was rewritten to the K-major form ORT fuses
    assert ops.count(("com.microsoft", "MatMulNBits")) == 2, ops


def test_mxfp4_embedding_runs_in_ort_through_gather_block_quantized():
    model = _model()
    plan = decided_plan(model, "mxfp4")
    formats = {d.op_type: d.format.value for d in plan.weights}
    assert formats == {"Gather": "mxfp4", "MatMul": "int4", "Gemm": "int4"}
    expected = _run(_dequantized_reference(model, plan))
    WeightQDQPass(plan)(model)
    assert "GatherBlockQuantized" in [n.op_type for n in model.graph]
    fp4 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT4E2M1]
    assert len(fp4) == 1 and fp4[0].const_value.shape == (50, 64)
    got = _run(model)
    assert sqnr_db(expected, got) > 25  # ORT's fused int4 MatMul quantizes activations (accuracy_level 4)


def test_mxfp4_dq23_form_runs_in_the_reference_evaluator():
    model = _model()
    plan = decided_plan(model, "mxfp4", ONNX_REFERENCE)
    assert {d.format.value for d in plan.weights} == {"mxfp4"}
    expected = ReferenceEvaluator(ir.to_proto(_dequantized_reference(model, plan))).run(None, FEED)[0]
    WeightQDQPass(plan)(model)
    proto = ir.to_proto(model)
    assert proto.opset_import[0].version == 23
    onnx.checker.check_model(proto, full_check=True)
    dq_types = {proto.graph.initializer[i].data_type for i in range(len(proto.graph.initializer))}
    assert onnx.TensorProto.FLOAT4E2M1 in dq_types
    got = ReferenceEvaluator(proto).run(None, FEED)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ort_errors(), match="DequantizeLinear"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
