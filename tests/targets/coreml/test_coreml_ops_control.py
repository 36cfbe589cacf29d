"""Recurrent, control-flow and activation ops added for real models (GRU, LSTM, If, PRelu, flexible
Flatten/Reshape), each lowered, saved, loaded back and run by the reference executor against ONNX
Runtime on the same inputs, and the executor's fast path against its plain path.

Thresholds: fp32 compute ≥ 90 dB SQNR (float32 summation order only); fp16 compute ≥ 45 dB (weights,
inputs and outputs stored in fp16; a recurrent op runs as one kernel, its states in float32 inside).
"""

import numpy as np
import onnx
import pytest
from coreml_models import ort_run, package_and_load, rng_array, single_op

from edgeq.validate.metrics import sqnr_db
from targets.coreml.executor import Executor

B, S, I, H = 3, 5, 4, 6


def _rnn(op, dirs, gates, *, bias=True, h0=False, c0=False, peep=False, seed=1):
    ins = {"x": ("input", rng_array((S, B, I), seed)),
           "w": ("const", rng_array((dirs, gates * H, I), seed + 1, scale=0.5)),
           "r": ("const", rng_array((dirs, gates * H, H), seed + 2, scale=0.5))}
    ins["b"] = ("const", rng_array((dirs, 2 * gates * H), seed + 3, scale=0.3)) if bias else ("absent", None)
    ins["seq"] = ("absent", None)
    ins["h0"] = ("input", rng_array((dirs, B, H), seed + 4)) if h0 else ("absent", None)
    if op == "LSTM":
        ins["c0"] = ("input", rng_array((dirs, B, H), seed + 5)) if c0 else ("absent", None)
        ins["p"] = ("const", rng_array((dirs, 3 * H), seed + 6, scale=0.3)) if peep else ("absent", None)
    return ins


def _batch_first(ins):
    x = ins["x"][1]
    out = dict(ins, x=("input", np.ascontiguousarray(x.transpose(1, 0, 2))))
    for k in ("h0", "c0"):
        if out.get(k, ("absent",))[0] == "input":
            out[k] = ("input", np.ascontiguousarray(out[k][1].transpose(1, 0, 2)))
    return out


RNN_CASES = {
    "lstm_forward": ("LSTM", _rnn("LSTM", 1, 4), {"hidden_size": H}, 3, 18),
    "lstm_reverse_states": ("LSTM", _rnn("LSTM", 1, 4, h0=True, c0=True), {"hidden_size": H, "direction": "reverse"}, 3, 18),
    "lstm_bidirectional_peepholes": ("LSTM", _rnn("LSTM", 2, 4, h0=True, c0=True, peep=True),
                                     {"hidden_size": H, "direction": "bidirectional"}, 3, 18),
    "lstm_no_bias_y_only": ("LSTM", _rnn("LSTM", 1, 4, bias=False), {"hidden_size": H}, 1, 17),
    "lstm_relu_cell": ("LSTM", _rnn("LSTM", 1, 4), {"hidden_size": H, "activations": ["Sigmoid", "Relu", "Tanh"]}, 3, 18),
    "gru_forward": ("GRU", _rnn("GRU", 1, 3, h0=True), {"hidden_size": H}, 2, 17),
    "gru_reverse": ("GRU", _rnn("GRU", 1, 3), {"hidden_size": H, "direction": "reverse"}, 2, 18),
    "gru_bidirectional": ("GRU", _rnn("GRU", 2, 3, h0=True), {"hidden_size": H, "direction": "bidirectional"}, 2, 18),
    "gru_linear_before_reset": ("GRU", _rnn("GRU", 1, 3, h0=True), {"hidden_size": H, "linear_before_reset": 1}, 2, 18),
    "gru_bidirectional_linear_before_reset": ("GRU", _rnn("GRU", 2, 3), {"hidden_size": H, "direction": "bidirectional",
                                                                        "linear_before_reset": 1}, 2, 18),
}


def _rnn_model(case):
    op, ins, attrs, outputs, _ = RNN_CASES[case]
    return single_op(op, ins, attrs, outputs=outputs, opset=14)


def _batch_first_model(case):
    """The same op with layout=1 (batch first): ORT runs only layout 0, so the expected values are
    the layout-0 model's, transposed."""
    op, ins, attrs, outputs, _ = RNN_CASES[case]
    return single_op(op, _batch_first(ins), {**attrs, "layout": 1}, outputs=outputs, opset=14)


@pytest.mark.parametrize("compute", ["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(RNN_CASES))
def test_rnn_matches_onnxruntime(case, compute, tmp_path):
    model, feed = _rnn_model(case)
    expected = ort_run(model, feed)
    ex, _, facts, pkg = package_and_load(model, tmp_path, compute=compute, deployment=RNN_CASES[case][4])
    got = ex.run(feed)
    assert facts["mil_ops"].get(RNN_CASES[case][0].lower(), 0) >= 1
    for i, want in enumerate(expected):
        name = f"y{i}" if len(expected) > 1 else "y"
        assert got[name].shape == want.shape, name
        assert sqnr_db(want, got[name]) >= (90 if compute == "fp32" else 45), name
    plain = Executor.from_package(pkg, fast=False).run(feed)
    assert all(np.array_equal(plain[k], got[k]) for k in got)


@pytest.mark.parametrize("case", ["lstm_bidirectional_peepholes", "gru_bidirectional_linear_before_reset"])
def test_rnn_batch_first_layout(case, tmp_path):
    model0, feed0 = _rnn_model(case)
    want = ort_run(model0, feed0)
    model, feed = _batch_first_model(case)
    ex, _, _, _ = package_and_load(model, tmp_path, compute="fp32", deployment=18)
    got = ex.run(feed)
    assert sqnr_db(want[0].transpose(2, 0, 1, 3), got["y0"]) >= 90  # Y: [seq, dirs, batch, H] -> [batch, seq, dirs, H]
    for i in range(1, len(want)):
        assert sqnr_db(want[i].transpose(1, 0, 2), got[f"y{i}"]) >= 90  # states: [dirs, batch, H] -> [batch, dirs, H]


def test_gru_linear_before_reset_on_ios17_fails_preflight_naming_the_node():
    from targets.coreml import IOS17Target

    model, _ = _rnn_model("gru_linear_before_reset")
    problems = IOS17Target().preflight(model)
    assert [(p.node, p.op_type) for p in problems] == [("gru_node", "GRU")]
    assert "linear_before_reset=1" in problems[0].message and "--targets android" in problems[0].hint


def test_rnn_with_sequence_lens_fails_preflight():
    from targets.coreml import IOS18Target

    op, ins, attrs, outputs, _ = RNN_CASES["lstm_forward"]
    model, _ = single_op(op, {**ins, "seq": ("input", np.full((B,), S, np.int32))}, attrs, outputs=outputs, opset=14)
    problems = IOS18Target().preflight(model)
    assert len(problems) == 1 and "sequence_lens" in problems[0].message


def test_lstm_with_flexible_sequence_and_batch(tmp_path):
    """No initial state and flexible batch: the zero state is built from the input's run-time shape."""
    op, ins, attrs, outputs, _ = RNN_CASES["lstm_forward"]
    model, _ = single_op(op, ins, attrs, outputs=outputs, opset=14, dynamic={"x": {0: "sequence", 1: "batch"}})
    ex, _, facts, _ = package_and_load(model, tmp_path, compute="fp32")
    assert "fill" in facts["mil_ops"]
    for s, b in ((S, B), (2, 7)):
        x = rng_array((s, b, I), 9)
        want = ort_run(model, {"x": x})
        got = ex.run({"x": x})
        for i, w in enumerate(want):
            assert sqnr_db(w, got[f"y{i}"]) >= 90


def _if_model(cond_nodes, *, x_dims=("batch", 4), extra_inputs=(), inner_if=False):
    """y = If(cond) then relu(x) * 2 (with an initializer of its own) else x - 1 (reading an outer value)."""
    from onnx import TensorProto, helper, numpy_helper

    then_nodes = [helper.make_node("Relu", ["x"], ["t_r"]), helper.make_node("Mul", ["t_r", "two"], ["t_y"])]
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, list(x_dims))],
                               [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    if inner_if:  # the then branch itself holds an If on a constant
        inner_then = helper.make_graph([helper.make_node("Neg", ["t_y"], ["i_y"])], "inner_then", [],
                                       [helper.make_tensor_value_info("i_y", TensorProto.FLOAT, list(x_dims))])
        inner_else = helper.make_graph([helper.make_node("Identity", ["t_y"], ["e_y"])], "inner_else", [],
                                       [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, list(x_dims))])
        then_g.node.extend([helper.make_node("Constant", [], ["yes"], value=numpy_helper.from_array(np.array(True))),
                            helper.make_node("If", ["yes"], ["t_z"], then_branch=inner_then, else_branch=inner_else,
                                             name="inner_if")])
        then_g.output[0].name = "t_z"
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e_y2"])], "else", [],
                               [helper.make_tensor_value_info("e_y2", TensorProto.FLOAT, list(x_dims))])
    nodes = [*cond_nodes, helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims)), *extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_dims))],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                               numpy_helper.from_array(np.array([0], np.int64), "zero_idx"),
                               numpy_helper.from_array(np.array(1, np.int64), "one_i")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _batch_is_one():
    from onnx import helper

    return [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Gather", ["shp", "zero_idx"], ["b"]),
            helper.make_node("Squeeze", ["b"], ["b0"]), helper.make_node("Equal", ["b0", "one_i"], ["cond"])]


@pytest.mark.parametrize("inner_if", [False, True])
@pytest.mark.parametrize("cond", [True, False])
def test_if_on_a_constant_lowers_the_taken_branch(cond, inner_if, tmp_path):
    from onnx import helper, numpy_helper

    model = _if_model([helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(cond)))],
                      inner_if=inner_if)
    feed = {"x": rng_array((3, 4), 2)}
    ex, _, facts, _ = package_and_load(model, tmp_path, compute="fp32")
    assert sqnr_db(ort_run(model, feed)[0], ex.run(feed)["y"]) >= 90
    assert ("relu" in facts["mil_ops"]) is cond and ("sub" in facts["mil_ops"]) is not cond


def test_if_on_the_batch_size_folds_once_the_batch_is_fixed(tmp_path):
    from targets.coreml import IOS18Target

    model = _if_model(_batch_is_one())
    problems = IOS18Target().preflight(model)
    assert [(p.node, p.op_type) for p in problems] == [("branch", "If")]
    assert "dynamic axes batch" in problems[0].message and "--shape batch=N" in problems[0].hint
    assert IOS18Target(shapes={"batch": 1}).preflight(model) == []
    for b in (1, 2):
        feed = {"x": rng_array((b, 4), 3)}
        ex, _, facts, _ = package_and_load(model, tmp_path / str(b), compute="fp32", shapes={"batch": b})
        assert sqnr_db(ort_run(model, feed)[0], ex.run(feed)["y"]) >= 90
        assert ("relu" in facts["mil_ops"]) is (b == 1)


def test_if_on_an_input_value_fails_preflight_with_the_android_fix(tmp_path):
    from onnx import TensorProto, helper

    from edgeq.errors import UnsupportedError
    from targets.coreml import IOS18Target

    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    model = _if_model([helper.make_node("Equal", ["sr", "one_i"], ["cond"])], extra_inputs=[sr])
    problems = IOS18Target(shapes={"batch": 1}).preflight(model)
    assert len(problems) == 1 and "value of input 'sr'" in problems[0].message
    assert "--targets android" in problems[0].hint
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedError, match="branch.*If"):
        IOS18Target().package(path, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("case,mil_op", [("prelu_per_channel", "prelu"), ("prelu_after_linear", "select"),
                                         ("prelu_last_axis_rank4", "select")])
def test_prelu_uses_mil_prelu_only_for_one_slope_per_channel(case, mil_op, tmp_path):
    from test_coreml_ops import CASES

    model, _ = single_op(*CASES[case])
    _, _, facts, _ = package_and_load(model, tmp_path, compute="fp16")
    assert mil_op in facts["mil_ops"] and ("prelu" in facts["mil_ops"]) is (mil_op == "prelu")


FLEX = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[batch, seq, 3, 4] x) => (float[N, M] f, float[batch, seq, 12] r, float[P, 4] q, float[K, L] h)
{
    f = Flatten <axis = 2> (x)
    h = Flatten <axis = 1> (x)
    shp = Constant <value = int64[3] {0, 0, -1}> ()
    r = Reshape (x, shp)
    tail = Constant <value = int64[2] {-1, 4}> ()
    q = Reshape (x, tail)
}
"""


@pytest.mark.parametrize("compute", ["fp32", "fp16"])
def test_flatten_and_reshape_with_flexible_dims(compute, tmp_path):
    model = onnx.parser.parse_model(FLEX)
    onnx.checker.check_model(model, full_check=True)
    ex, _, _, _ = package_and_load(model, tmp_path, compute=compute)
    for b, s in ((2, 5), (1, 1), (3, 2)):
        feed = {"x": rng_array((b, s, 3, 4), b + s)}
        want = ort_run(model, feed)
        got = ex.run(feed)
        for name, w in zip(("f", "r", "q", "h"), want):
            assert got[name].shape == w.shape and sqnr_db(w, got[name]) >= (90 if compute == "fp32" else 60), name


@pytest.mark.parametrize("dim", ["?", "-1", "", "p2o.DynamicDimension.0", "unk__749", "-1 as value"])
def test_odd_dynamic_dim_names_build_and_run(dim, tmp_path):
    """Placeholders that name nothing ("?", "-1", empty, a -1 dim_value) become <input>_dim<i>; odd names
    (paddle2onnx's, onnxruntime's unk__) are kept as axis names and sanitised into MIL symbols."""
    from targets.coreml import IOS18Target

    model, feed = single_op("Relu", {"x": ("input", rng_array((2, 3, 4), 1))}, dynamic={"x": {0: "batch"}})
    d = model.graph.input[0].type.tensor_type.shape.dim[2]
    if dim == "-1 as value":
        d.dim_value = -1
    else:
        d.ClearField("dim_value")
        d.dim_param = dim
    axis = dim if dim in ("p2o.DynamicDimension.0", "unk__749") else "x_dim2"
    assert sorted(IOS18Target()._axis_names(model)) == sorted(["batch", axis])
    ex, low, _, _ = package_and_load(model, tmp_path, compute="fp32", shapes={"batch": 2})
    assert set(low.flexible) == {axis}
    assert np.array_equal(ex.run(feed)["y"], np.maximum(feed["x"], 0))
    assert np.array_equal(ex.run({"x": rng_array((2, 3, 7), 2)})["y"].shape, (2, 3, 7))


REAL_MODEL_PATTERNS = """
<ir_version: 10, opset_import: ["" : 12]>
g (float[batch, 4, height, 6] x, float[] sr, float[2, batch, 3] state) => (float[A, B, C, D] y, float[E, F, G] z, int64[] n, float[2, batch, 3] s2)
{
    h = ReduceMean <axes = [2], keepdims = 1> (x)
    sq = Squeeze <axes = [2]> (h)
    shp = Shape (sq)
    b = Slice (shp, two, three)
    target = Concat <axis = 0> (zeros1, tail, b)
    y = Reshape (sq, target)
    z = Transpose <perm = [2, 0, 1]> (sq)
    n = Size (x)
    s2 = Mul (state, sr)
}
"""


def test_paddle_and_silero_patterns(tmp_path):
    """What real exports do: Squeeze of a flexible axis (PP-OCR), Reshape to a run-time shape with a
    leading 0 and a different rank (ONNX copies axis 0, MIL's 0 counts from the right), Size of a
    flexible tensor, a scalar input, and an input named "state" (a word coremltools renames)."""
    from onnx import numpy_helper

    model = onnx.parser.parse_model(REAL_MODEL_PATTERNS)
    for v in (model.graph.input[1], model.graph.output[2]):  # "[]" parses as no shape: make them scalars
        v.type.tensor_type.shape.SetInParent()
    for name, arr in (("two", [2]), ("three", [3]), ("zeros1", [0]), ("tail", [2, 2])):
        model.graph.initializer.append(numpy_helper.from_array(np.array(arr, np.int64), name))
    onnx.checker.check_model(model, full_check=True)
    ex, low, _, _ = package_and_load(model, tmp_path, compute="fp32")
    assert [s.mil_name for s in low.inputs] == ["x", "sr", "state_"]
    for b, hgt in ((2, 5), (3, 1)):
        feed = {"x": rng_array((b, 4, hgt, 6), b), "sr": np.array(1.5, np.float32), "state": rng_array((2, b, 3), 7)}
        want = ort_run(model, feed)
        got = ex.run({"x": feed["x"], "sr": feed["sr"].reshape(1), "state_": feed["state"]})
        for name, w in zip(("y", "z", "n", "s2"), want):
            assert got[name].shape == w.shape, name
            assert np.allclose(got[name], w, rtol=1e-6, atol=1e-6), name


def test_batch_norm_statistics_beyond_fp16_are_folded(tmp_path):
    """A paddle detector's variance of 1e8 saturates in fp16: folded into scale and shift instead."""
    x = rng_array((2, 3, 4, 4), 1) * 3000
    inputs = {"x": ("input", x), "s": ("const", np.array([0.8, 1.1, 1.0], np.float32)),
              "b": ("const", np.array([0.1, -0.4, 0.3], np.float32)),
              "m": ("const", np.array([-559.0, 275.0, 3.0], np.float32)),
              "v": ("const", np.array([9.8e7, 1.05e7, 4.0], np.float32))}
    model, feed = single_op("BatchNormalization", inputs, {"epsilon": 1e-5})
    ex, _, _, _ = package_and_load(model, tmp_path, compute="fp16")
    assert sqnr_db(ort_run(model, feed)[0], ex.run(feed)["y"]) >= 50


def test_lstm_with_int8_weights_from_dequantize_linear(tmp_path):
    """A QDQ model's LSTM reads its weights through DequantizeLinear: on iOS 17 they are dequantized
    at conversion with ONNX semantics (iOS 18 stores the integers: test_coreml_recurrent_int8.py)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    w_q = rng.integers(-127, 128, (1, 4 * H, I)).astype(np.int8)
    r_q = rng.integers(-127, 128, (1, 4 * H, H)).astype(np.int8)
    scale = (rng.uniform(0.002, 0.01, 4 * H)).astype(np.float32)
    op, ins, attrs, outputs, _ = RNN_CASES["lstm_forward"]
    model, feed = single_op(op, ins, attrs, outputs=outputs, opset=21)
    g = model.graph
    for name, q in (("w", w_q), ("r", r_q)):  # the float weights become DequantizeLinear of int8 codes
        g.initializer.remove(next(i for i in g.initializer if i.name == name))
        g.initializer.extend([numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")])
        g.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=1,
                                          name=f"{name}_dq"))
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    ex, low, _, _ = package_and_load(model, tmp_path, deployment=17, compute="fp32")
    assert not low.weights  # no constexpr left for them
    want = ort_run(model, feed)
    got = ex.run(feed)
    for i, w in enumerate(want):
        assert sqnr_db(w, got[f"y{i}"]) >= 90


RESIZE_TO_SKIP = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[batch, 4, height, width] x, float[batch, 2, h2, w2] skip) => (float[A, B, C, D] y)
{
    nc = Shape <end = 2> (x)
    hw = Shape <start = 2> (skip)
    s = Concat <axis = 0> (nc, hw)
    y = Resize <mode = "linear", coordinate_transformation_mode = "%s"> (x, "", "", s)
}
"""


@pytest.mark.parametrize("ctm", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"])
def test_resize_to_a_size_known_at_run_time(ctm, tmp_path):
    """CRAFT's upsampling to a skip tensor's size (F.interpolate(size=skip.shape[2:])): MIL resize."""
    model = onnx.parser.parse_model(RESIZE_TO_SKIP % ctm)
    onnx.checker.check_model(model, full_check=True)
    ex, _, facts, _ = package_and_load(model, tmp_path, compute="fp32")
    assert "resize" in facts["mil_ops"]
    for (h, w), (h2, w2) in (((5, 7), (10, 14)), ((6, 4), (11, 9)), ((8, 8), (3, 5))):
        feed = {"x": rng_array((2, 4, h, w), h), "skip": rng_array((2, 2, h2, w2), w)}
        got = ex.run(feed)["y"]
        want = ort_run(model, feed)[0]
        assert got.shape == want.shape and sqnr_db(want, got) >= 90, (h, w, h2, w2)
