"""Pre-flight for Android: what cannot run is found before anything is written, by node name."""

import onnx
import pytest
from onnx import TensorProto, helper

import android_models as am
from edgeq.errors import UnsupportedError
from edgeq.quant.recipes import WeightFormat
from targets.android import AndroidTarget
from targets.android.profile import ANDROID


def problems(path):
    return AndroidTarget().preflight(onnx.load(str(path)))


def test_quantized_models_pass(tiny):
    for name in ("mlp.float", "mlp.w8a16", "mlp.w4a16", "conv.w8a16"):
        assert problems(tiny[name]) == [], name


def test_profile_keeps_4bit_where_the_ort_format_can_hold_it():
    assert ANDROID.supports("MatMul", WeightFormat.INT4) and ANDROID.supports("Gemm", WeightFormat.INT4)
    assert not ANDROID.supports("Conv", WeightFormat.INT4) and ANDROID.supports("Gather", WeightFormat.INT4)
    assert not any(ANDROID.supports(op, WeightFormat.MXFP4) for op in ("MatMul", "Gemm", "Conv", "Gather"))
    assert "no 4-bit tensor type" in ANDROID.why_not("Conv", WeightFormat.INT4)
    assert ANDROID.gather_forms == {WeightFormat.INT8: "gather_rows", WeightFormat.INT4: "gather_block_quantized"}


def test_quantize_with_the_android_profile_falls_back_with_a_reason(tiny):
    from edgeq import api

    plan = api.quantize(tiny["conv.float"], None, "w4a16", profile="android").plan
    assert plan.summary()["weights"] == {"int8": 1} and plan.summary()["fallbacks"] == 1
    assert "no 4-bit tensor type" in plan.explain()


def test_int4_conv_fails_naming_the_node(tiny):
    found = problems(tiny["conv.w4a16"])
    assert [(p.node, p.op_type) for p in found] == [("conv", "Conv")]
    assert "int4" in found[0].message and "--profile android" in found[0].hint


def test_int4_matmul_that_ort_does_not_pack_is_named(tiny):
    # MatMul → Relu: ORT 1.32 keeps DequantizeLinear(int4) → MatMul, and .ort cannot store int4
    found = problems(tiny["mlp.w4a16.relu"])
    assert [(p.node, p.op_type) for p in found] == [("fc1", "MatMul")]
    assert "Relu follows" in found[0].message and 'name = "^fc1$"' in found[0].hint


def test_op_without_an_ort_kernel_is_named(tmp_path):
    node = helper.make_node("ImageDecoder", ["encoded"], ["image"], name="decode_jpeg", pixel_format="RGB")
    path = am.with_extra_node(tmp_path / "dec.onnx", node, [("encoded", TensorProto.UINT8, ["n"])],
                              [("image", TensorProto.UINT8, ["h", "w", 3])])
    found = problems(path)
    assert [(p.node, p.op_type) for p in found] == [("decode_jpeg", "ImageDecoder")]
    assert "no CPU kernel for ImageDecoder" in found[0].message


def test_custom_domain_is_named(tmp_path):
    node = helper.make_node("FancyNorm", ["x"], ["y"], name="my_norm", domain="com.example")
    path = am.with_extra_node(tmp_path / "custom.onnx", node, [("x", TensorProto.FLOAT, [1, 4])],
                              [("y", TensorProto.FLOAT, [1, 4])], domains=["com.example"])
    found = problems(path)
    assert len(found) == 1 and found[0].node == "my_norm" and "com.example" in found[0].message
    assert "custom-op library" in found[0].hint


def test_unsupported_input_type_is_named(tmp_path):
    # DequantizeLinear on float4e2m1 exists in ONNX but ORT has no CPU kernel for that type
    x = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [4], [0.5, 1.0, -1.0, 2.0])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [1.0])
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="dq_fp4")
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [x, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    found = AndroidTarget().preflight(model)
    assert any(p.node == "dq_fp4" and "float4e2m1" in p.message for p in found)


def test_function_ops_are_left_to_ort(tmp_path):
    # HardSwish has no CPU kernel but is an ONNX function: ORT expands it
    node = helper.make_node("HardSwish", ["x"], ["y"], name="hs")
    path = am.with_extra_node(tmp_path / "hs.onnx", node, [("x", TensorProto.FLOAT, [1, 4])],
                              [("y", TensorProto.FLOAT, [1, 4])], opset=22)
    assert problems(path) == []


def test_opset_newer_than_the_profile(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    path = am.with_extra_node(tmp_path / "new.onnx", node, [("x", TensorProto.FLOAT, [1])],
                              [("y", TensorProto.FLOAT, [1])], opset=ANDROID.max_opset + 1)
    assert any(p.op_type == "opset" for p in problems(path))


def test_package_refuses_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(UnsupportedError) as e:
        AndroidTarget().package(tiny["conv.w4a16"], out)
    assert "node 'conv' (Conv)" in str(e.value) and "--profile android" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder


def test_int4_zero_points_are_reported_with_their_weight(tiny):
    # asymmetric int4: the zero point has the weight's type; one problem per node, about the weight
    import numpy as np

    model = onnx.load(str(tiny["conv.w4a16"]))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    model.graph.initializer.append(helper.make_tensor("conv_w_zp", TensorProto.INT4, list(scale.dims),
                                                      [1] * int(np.prod(scale.dims))))
    dq.input.append("conv_w_zp")
    found = AndroidTarget().preflight(model)
    assert [(p.node, "conv_w_q" in p.message) for p in found] == [("conv", True)]
