import onnx_ir as ir

from edgeq.quant.plan import make_plan
from edgeq.quant.profile import ONNX_REFERENCE, ONNXRUNTIME_CPU
from edgeq.quant.recipes import QuantSpec, Recipe, Rule, WeightFormat, preset

MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[batch, seq] ids, float[batch, 3, 8, 8] img) => (float[batch, seq, 16] y, float[batch, 4] z)
<float[100, 32] emb = {%s}, float[32, 16] w = {%s}, float[4, 3, 3, 3] cw = {%s}, float[4, 1, 3, 3] dw = {%s},
 float[4, 4] gw = {%s}>
{
    e = Gather <axis = 0> (emb, ids)
    y = MatMul (e, w)
    c = Conv <pads = [1, 1, 1, 1]> (img, cw)
    d = Conv <group = 4, pads = [1, 1, 1, 1]> (c, dw)
    p = GlobalAveragePool (d)
    f = Flatten (p)
    z = Gemm <transB = 1> (f, gw)
}
"""


def _model():
    sizes = [100 * 32, 32 * 16, 4 * 27, 4 * 9, 16]
    vals = [", ".join(["0.5"] * n) for n in sizes]
    m = ir.from_onnx_text(MODEL % tuple(vals))
    for i, n in enumerate(m.graph):
        n.name = f"{n.op_type.lower()}_{i}"
    return m


def _by_node(plan):
    return {d.node: d for d in plan.weights}, {n.node: n for n in plan.floats}


def test_w4a16_layouts_and_depthwise_fallback():
    plan = make_plan(_model(), preset("w4a16"), profile=ONNX_REFERENCE)
    w, f = _by_node(plan)
    assert (w["gather_0"].format, w["gather_0"].axis, w["gather_0"].block) == (WeightFormat.INT4, 1, 32)
    assert (w["matmul_1"].axis, w["matmul_1"].block) == (0, 32)  # blocks along K
    assert (w["conv_2"].format, w["conv_2"].axis) == (WeightFormat.INT4, 1)
    assert w["conv_3"].format == WeightFormat.INT8 and "depthwise" in w["conv_3"].reason
    assert w["gemm_6"].transpose and w["gemm_6"].axis == 0
    assert f["flatten_5"].reason == "no constant weight"


def test_w8_axes_are_output_channels():
    w, _ = _by_node(make_plan(_model(), preset("w8a16")))
    assert w["matmul_1"].axis == 1 and w["conv_2"].axis == 0 and w["gemm_6"].axis == 0 and not w["gemm_6"].transpose
    assert w["gather_0"].axis == 0


def test_mxfp4_falls_back_where_the_profile_says_and_reports_why():
    w, _ = _by_node(make_plan(_model(), preset("mxfp4")))
    assert w["gather_0"].format == WeightFormat.MXFP4
    assert w["matmul_1"].format == WeightFormat.INT4
    assert "mxfp4 not runnable here" in w["matmul_1"].reason and "fell back to int4" in w["matmul_1"].reason
    ref, _ = _by_node(make_plan(_model(), preset("mxfp4"), profile=ONNX_REFERENCE))
    assert ref["matmul_1"].format == WeightFormat.MXFP4


def test_rules_exclude_and_explain():
    rec = Recipe("r", QuantSpec(WeightFormat.INT4), (Rule(QuantSpec(WeightFormat.FLOAT), ("Gemm",)),
                                                     Rule(QuantSpec(WeightFormat.INT8), (), "gather")))
    plan = make_plan(_model(), rec, profile=ONNX_REFERENCE)
    w, f = _by_node(plan)
    assert f["gemm_6"].reason == "excluded by rule 1"
    assert w["gather_0"].format == WeightFormat.INT8 and w["gather_0"].reason == "rule 2"
    text = plan.explain()
    assert "excluded by rule 1" in text and "fell back to int8" in text and "other nodes (no constant weight)" in text
    assert plan.summary()["weights"] == {"int4": 2, "int8": 2}


def test_onnxruntime_keeps_conv_weights_int8_and_says_weight_only_convs_are_not_faster():
    plan = make_plan(_model(), preset("w4a16"), profile=ONNXRUNTIME_CPU)
    w, _ = _by_node(plan)
    assert w["conv_2"].format == WeightFormat.INT8 and "7x the time of int8" in w["conv_2"].reason
    assert w["matmul_1"].format == WeightFormat.INT4
    notes = {n.node: n.reason for n in plan.notes}
    assert "dequantized on every run" in notes["conv_2"] and "matmul_1" not in notes
    w8a8 = {n.node for n in make_plan(_model(), preset("w8a8"), profile=ONNXRUNTIME_CPU).notes}
    assert "conv_2" not in w8a8  # W8A8: QLinearConv, no note
