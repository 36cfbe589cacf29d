"""The zoo's weight count (tools/zoo/weights.py): constant weights are found however they are stored,
and a weight counts as quantized only when it is read through DequantizeLinear."""

import onnx
import onnx.parser

from tools.zoo.weights import count, summary

FLOAT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x, float[3, 4] a) => (float[1, 3, 2, 2] y, float[3, 4] z) <
    float[3, 2, 3, 3] w = {@W@}, float[8, 4] table = {@T@}, int64[2] shape = {3, 4},
    float[16] flat = {@F@}
> {
    c = Constant <value = float[3, 2, 3, 3] {@W@}> ()
    y = Conv (x, c)
    r = Reshape (flat, shape)
    r2 = Transpose (r)
    m = MatMul (a, r2)
    idx = Constant <value = int64[1] {1}> ()
    g0 = Gather (shape, idx)
    e = Gather (table, idx)
    shape2 = Constant <value = int64[2] {4, 4}> ()
    mw = Reshape (flat, shape2)
    m2 = Identity (mw)
    z = MatMul (a, m2)
}
"""


def _text(n):
    return ", ".join(["0.5"] * n)


def _model(tmp_path, name, text):
    path = tmp_path / name
    onnx.save(onnx.parser.parse_model(text), str(path))
    return path


def test_constant_node_and_computed_weights_count_but_integer_gather_does_not(tmp_path):
    text = FLOAT.replace("@W@", _text(54)).replace("@T@", _text(32)).replace("@F@", _text(16))
    res = count(_model(tmp_path, "f.onnx", text))
    # Conv (Constant node), MatMul r2 (Transpose of a Reshape of an initializer), MatMul m2, Gather table;
    # the Gather from the int64 shape constant is shape arithmetic, not a weight
    assert res["slots"] == 4 and res["dq"] == 0
    assert res["float_ops"] == {"Conv": 1, "MatMul": 2, "Gather": 1}


def test_only_weights_read_through_dequantize_linear_are_quantized(tmp_path):
    f = _model(tmp_path, "f.onnx", """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 3] y, float[2, 3] z) <float[4, 3] w = {@W@}> {
    y = MatMul (x, w)
    z = MatMul (x, w)
}""".replace("@W@", _text(12)))
    q = _model(tmp_path, "q.onnx", """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 3] y, float[2, 3] z) <int8[4, 3] wq = {@Q@}, float s = {0.1}, float[4, 3] w = {@W@}> {
    wd = DequantizeLinear (wq, s)
    wt = Identity (wd)
    y = MatMul (x, wt)
    z = MatMul (x, w)
}""".replace("@Q@", ", ".join(["1"] * 12)).replace("@W@", _text(12)))
    res = summary(f, q)
    assert (res["quantized"], res["quantizable"]) == (1, 2)
    assert res["float_left"] == {"MatMul": 1}
    assert res["size_share"] == 0.5


def test_coverage_by_size_weighs_each_weight_by_its_elements(tmp_path):
    # a small float weight next to a large quantized one: 1 of 2 by count, 12 of 16 elements by size
    f = _model(tmp_path, "f.onnx", """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 3] y, float[2, 1] z) <float[4, 3] w = {@W@}, float[4, 1] v = {0.5, 0.5, 0.5, 0.5}> {
    y = MatMul (x, w)
    z = MatMul (x, v)
}""".replace("@W@", _text(12)))
    q = _model(tmp_path, "q.onnx", """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 3] y, float[2, 1] z) <int8[4, 3] wq = {@Q@}, float s = {0.1}, float[4, 1] v = {0.5, 0.5, 0.5, 0.5}> {
    wd = DequantizeLinear (wq, s)
    y = MatMul (x, wd)
    z = MatMul (x, v)
}""".replace("@Q@", ", ".join(["1"] * 12)))
    res = summary(f, q)
    assert (res["quantized"], res["quantizable"], res["size_share"]) == (1, 2, 0.75)


def test_a_branch_the_static_shapes_rule_out_holds_no_quantizable_weight(tmp_path):
    # silero-vad op15: If(state's dim 0 == 2) picks one of two LSTMs; state is [2, batch, 128], so the
    # other branch can never run and its weights are not counted
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] s, float[1, 4] x) => (float[1, 3] y) <float[4, 3] w1 = {@A@}, float[4, 3] w2 = {@A@}, int64 zero = {0},
                                                      int64 two = {2}> {
    shape = Shape (s)
    d0 = Gather (shape, zero)
    cond = Equal (d0, two)
    y = If (cond) <then_branch = t () => (float[1, 3] a) { a = MatMul (x, w1) },
                   else_branch = e () => (float[1, 3] b) { b = MatMul (x, w2) }>
}
""".replace("@A@", _text(12))
    path = _model(tmp_path, "if.onnx", text)
    assert count(path)["slots"] == 2  # the file as it is: the weights of both MatMuls
    assert summary(path, path)["quantizable"] == 1
