"""Quantize what real models hold: weights in Constant nodes, opset 11, BatchNorm, recurrent and
transposed-conv weights; a recipe that finds no weight fails instead of writing a float model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import UnsupportedError
from edgeq.pipeline.quantize import quantize_model
from edgeq.validate.metrics import sqnr_db


def _run(path_or_proto, feed):
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feed)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _paddle_style_cnn(rng) -> onnx.ModelProto:
    """Opset 11, weights in Constant nodes, Conv → BatchNormalization → Relu → Gemm (how paddle2onnx writes)."""
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    bn = [np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, rng.standard_normal(8).astype(np.float32),
          rng.standard_normal(8).astype(np.float32) * 0.1, np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5]
    fc = rng.standard_normal((8, 5)).astype(np.float32) * 0.3
    consts = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(a, name))
              for name, a in (("w", w), ("gamma", bn[0]), ("beta", bn[1]), ("mean", bn[2]), ("var", bn[3]), ("fc", fc))]
    nodes = consts + [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    g = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def test_opset11_constant_weights_and_batchnorm_are_quantized_into_a_model_ort_loads(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_cnn(rng), src)
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, "w8a16", progress=False)
    assert res.plan.coverage() == {"quantized": 2, "quantizable": 2}  # the folded Conv and the MatMul
    steps = {s.name: s for s in res.plan.imported}
    assert steps["convert opset"].changed and steps["fold BatchNormalization"].changed == 1
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == 21
    assert "BatchNormalization" not in _ops(out) and "Constant" not in _ops(out)
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    want = _run(onnx.load(str(src)), feed)[0]
    got = _run(out, feed)[0]  # ONNX Runtime loads it (per-axis DequantizeLinear needs opset >= 13)
    assert sqnr_db(want, got) > 30  # int8 per-channel weights: measured ~45 dB


def test_a_recipe_that_finds_no_weight_fails_and_writes_nothing(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    src = tmp_path / "noweights.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), src)
    with pytest.raises(UnsupportedError, match="no constant weight edgeq can quantize.*Relu, Softmax"):
        quantize_model(src, tmp_path / "q.onnx", "w8a16", progress=False)
    assert not (tmp_path / "q.onnx").exists()


def test_weights_only_inside_an_if_are_named_with_the_input_that_decides_the_branch(tmp_path):
    # silero-vad's silero_vad.onnx / _op18_ifless.onnx: the whole network sits in the branches of an If
    # on its `sr` input, reading the main graph's initializers; "no constant weight" misled
    rng = np.random.default_rng(0)

    def branch(w):
        return helper.make_graph([helper.make_node("MatMul", ["x", w], [f"y_{w}"])], f"b_{w}", [],
                                 [helper.make_tensor_value_info(f"y_{w}", TensorProto.FLOAT, [1, 4])])

    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=branch("w16"), else_branch=branch("w8"), name="by_rate")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("w16", "w8")]
    inits.append(numpy_helper.from_array(np.array(16000, np.int64), "k16"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                       helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    src = tmp_path / "branches.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), src)
    with pytest.raises(UnsupportedError, match="inside subgraphs \\(If 'by_rate': MatMul ×2, condition from input 'sr'\\)"):
        quantize_model(src, tmp_path / "q.onnx", "w8a16", progress=False)
    assert not (tmp_path / "q.onnx").exists()


def test_a_target_that_runs_none_of_the_weights_fails_but_rules_may_keep_all_float(tmp_path):
    from types import MappingProxyType

    from edgeq.quant.profile import TargetProfile

    rng = np.random.default_rng(1)
    src = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_cnn(rng), src)
    nothing = TargetProfile("nothing", MappingProxyType({}))
    with pytest.raises(UnsupportedError, match="left all 2 weights float for profile nothing.*fell back to float"):
        quantize_model(src, tmp_path / "q.onnx", "w8a16", profile=nothing, progress=False)
    recipe = tmp_path / "r.toml"  # the user's own rules: their choice, written (and the plan says so)
    recipe.write_text('[default]\nweights = "int8"\n[[rules]]\nop = ["Conv", "MatMul"]\nweights = "float"\n')
    res = quantize_model(src, tmp_path / "f.onnx", recipe, progress=False)
    assert res.plan.coverage() == {"quantized": 0, "quantizable": 2} and "excluded by rule 1" in res.plan.float_reasons()


def _lstm_and_convtranspose(rng) -> onnx.ModelProto:
    hidden, inp = 16, 8
    w = (rng.standard_normal((1, 4 * hidden, inp)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    ct = (rng.standard_normal((1, 3, 3, 3)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", w), ("R", r), ("B", b), ("ct", ct))]
    nodes = [
        helper.make_node("LSTM", ["seq", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=hidden),
        helper.make_node("ConvTranspose", ["img", "ct"], ["up"], strides=[2, 2]),
    ]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [5, 2, inp]),
                                         helper.make_tensor_value_info("img", TensorProto.FLOAT, [2, 1, 4, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("up", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("recipe, min_db", [("w8a16", 35), ("w4a16", 15)])  # measured ~45 / ~22 dB
def test_recurrent_and_transposed_conv_weights_are_quantized(tmp_path, recipe, min_db):
    rng = np.random.default_rng(2)
    src = tmp_path / "rnn.onnx"
    onnx.save(_lstm_and_convtranspose(rng), src)
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, recipe, progress=False)
    by_weight = {d.weight: d for d in res.plan.weights}
    assert set(by_weight) == {"W", "R", "ct"}
    assert (by_weight["W"].axis, by_weight["R"].axis) == ((1, 1) if recipe == "w8a16" else (2, 2))
    assert by_weight["ct"].axis == (1 if recipe == "w8a16" else 0)
    proto = onnx.load(str(out))
    assert not {"W", "R", "ct"} & {t.name for t in proto.graph.initializer}  # float copies gone
    feed = {"seq": rng.standard_normal((5, 2, 8)).astype(np.float32),
            "img": rng.standard_normal((2, 1, 4, 4)).astype(np.float32)}
    for want, got in zip(_run(onnx.load(str(src)), feed), _run(out, feed)):
        assert sqnr_db(want, got) > min_db


def test_android_keeps_recurrent_weights_int8_and_says_why():
    from edgeq.quant.plan import make_plan
    from edgeq.quant.recipes import preset
    from targets.android.profile import ANDROID
    import onnx_ir as ir

    plan = make_plan(ir.from_proto(_lstm_and_convtranspose(np.random.default_rng(3))), preset("w4a16"), profile=ANDROID)
    assert {d.format.value for d in plan.weights} == {"int8"}
    assert all("cannot ship on Android" in d.reason for d in plan.weights)


def test_a_float16_model_is_refused_before_calibration(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float16), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 6, 6])], [w])
    src = tmp_path / "half.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), src)
    with pytest.raises(UnsupportedError, match=r"computes in 16-bit floats: weights of conv \(Conv, float16\)"):
        quantize_model(src, tmp_path / "q.onnx", "w8a16", progress=False)
    assert not (tmp_path / "q.onnx").exists()
