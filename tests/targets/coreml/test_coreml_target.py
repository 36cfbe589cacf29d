"""The ios17/ios18 targets on tiny models: exact weights, pre-flight, shapes, metadata, runner."""

import json
from dataclasses import replace

import ml_dtypes
import numpy as np
import onnx
import pytest
from coreml_models import cnn_feeds, ort_run, ort_values, rng_array, single_op, tiny_cnn
from onnx import numpy_helper

from edgeq import api
from edgeq.errors import InputError, UnsupportedError
from edgeq.quant.profile import ONNXRUNTIME_CPU
from edgeq.validate.metrics import sqnr_db
from targets.coreml import IOS17Target, IOS18Target
from targets.coreml.executor import load_program
from targets.coreml.lower.context import mil_name
from targets.coreml.runner import MLPackageRunner, coreml_predict_available

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[batch, 5] ids, float[batch, 48, 6, 6] img) => (float[batch, 8] y, float[batch, 16, 4, 4] z)
<float[50, 64] emb = {%s}, float[64, 96] w = {%s}, float[8, 96] g = {%s}, float[16, 48, 3, 3] k = {%s}>
{
    e = Gather <axis = 0> (emb, ids)
    h = MatMul (e, w)
    m = ReduceMean <keepdims = 0> (h, axes1)
    y = Gemm <transB = 1> (m, g)
    z = Conv (img, k)
}
"""


def _tiny(tmp_path):
    rng = np.random.default_rng(0)
    vals = [rng.standard_normal(n).astype(np.float32) for n in (50 * 64, 64 * 96, 8 * 96, 16 * 48 * 9)]
    text = TEXT % tuple(", ".join(f"{v:.4f}" for v in a) for a in vals)
    text = text.replace("{\n    e =", "{\n    axes1 = Constant <value = int64[1] {1}> ()\n    e =")
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


FEED = {"ids": np.array([[1, 7, 3, 49, 0], [5, 5, 12, 30, 2]], np.int64), "img": rng_array((2, 48, 6, 6), 3)}


def _ops(pkg):
    """The saved program's ops by op name and by output name."""
    prog, _ = load_program(pkg)
    ops = list(prog.functions["main"].operations)
    return {op.name: op for op in ops}, {v.name: op for op in ops for v in op.outputs}


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _want_scale(scale: np.ndarray, compute: str) -> np.ndarray:
    """The scale as the package stores it: float16 in fp16 compute when the scales are float16 or all exactly
    float16 values; float32 otherwise."""
    half = scale.astype(np.float16)
    exact = np.array_equal(half.astype(np.float32), scale.astype(np.float32))
    return half if compute == "fp16" and exact else scale.astype(np.float32)


def _assert_package_carries_the_qdq_parameters(qdq_path, pkg, deployment: int, compute: str) -> dict:
    """Every quantization parameter of the QDQ ONNX, read back out of the saved .mlpackage, bit for bit:
    weight integers, scales (their dtype too) and zero points; activation quantize/dequantize scales and
    zero points; int32 biases as the float values ORT dequantizes them to. Returns counts by kind."""
    model = onnx.load(str(qdq_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_name, by_out = _ops(pkg)
    seen = {"weight": 0, "zero_point": 0, "fp16_scale": 0, "activation": 0, "int32_bias": 0}
    biases = {}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = inits[n.input[1]]
        zp = inits[n.input[2]] if len(n.input) > 2 and n.input[2] else None
        if n.input[0] in inits and inits[n.input[0]].dtype == np.int32:
            biases[n.output[0]] = n
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight
            data = inits[n.input[0]]
            op = by_name[mil_name(n.output[0])]
            if deployment == 17:
                assert op.op_type == "constexpr_affine_dequantize", n.name
                got_q, got_s, got_zp = op.quantized_data.val, op.scale.val, op.zero_point.val
            else:
                assert op.op_type == "constexpr_blockwise_shift_scale", n.name
                got_q, got_s = op.data.val, op.scale.val
                got_zp = op.offset.val if op.offset is not None else None
            want_q = data.astype(np.int8) if data.dtype == np.dtype(ml_dtypes.int4) else data
            got_q = got_q[tuple(slice(0, d) for d in want_q.shape)]  # a padded partial block ends in zeros
            assert np.array_equal(np.asarray(got_q).astype(np.int8), want_q.astype(np.int8)), n.name
            want_s = _want_scale(scale, compute)
            assert got_s.dtype == want_s.dtype and np.array_equal(_bits(got_s), _bits(want_s)), n.name
            seen["fp16_scale"] += got_s.dtype == np.float16
            if zp is None:
                assert got_zp is None or not np.asarray(got_zp).any(), n.name
            else:
                assert got_zp is not None and np.array_equal(np.asarray(got_zp).astype(np.int8).reshape(-1),
                                                            zp.astype(np.int8).reshape(-1)), n.name
                seen["zero_point"] += 1
            seen["weight"] += 1
            continue
        op = by_out[mil_name(n.output[0])]  # an activation quantize / dequantize
        assert op.op_type == {"QuantizeLinear": "quantize", "DequantizeLinear": "dequantize"}[n.op_type], n.name
        want_s = scale.astype(np.float16 if compute == "fp16" else np.float32)
        assert op.scale.val.dtype == want_s.dtype and np.array_equal(_bits(op.scale.val), _bits(want_s)), n.name
        assert op.zero_point.val.dtype == zp.dtype and np.array_equal(op.zero_point.val, zp), n.name
        seen["activation"] += 1
    if biases:  # int32 biases: folded to exactly what ORT's DequantizeLinear computes
        feed = {i.name: np.zeros([1 if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim],
                                 np.float32) for i in model.graph.input if i.name not in inits}
        want = ort_values(model, feed, list(biases))
        for n in model.graph.node:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in biases:
                op = by_out[mil_name(n.output[0])]  # conv(bias=...), or Gemm's matmul then add(y=bias)
                op = op.x.op if op.op_type == "cast" else op  # a graph output is cast to fp32
                got = op.bias.val if n.op_type == "Conv" else op.y.val
                expect = want[n.input[2]].astype(np.float16 if compute == "fp16" else np.float32)
                assert got.dtype == expect.dtype and np.array_equal(_bits(got), _bits(expect)), n.name
                seen["int32_bias"] += 1
    return seen


W4_CPU = "w4a16 (onnxruntime-cpu profile with DequantizeLinear Gathers: float16 Gather scales, DequantizeLinear-23)"
# the host profile as it was before its Gathers read rows through GatherBlockQuantized (an ORT contrib op
# Core ML has no lowering for): the DequantizeLinear-23 form with float16 Gather scales still reaches iOS
# from any QDQ ONNX written that way
HOST_DQ_GATHERS = replace(ONNXRUNTIME_CPU, name="onnxruntime-cpu-dq-gathers", gather_forms={}, tied_forms={})


@pytest.mark.parametrize("target_cls,recipe,compute", [
    (IOS17Target, "w8a16", "fp16"), (IOS18Target, "w8a16", "fp16"), (IOS18Target, "w4a16", "fp16"),
    (IOS18Target, W4_CPU, "fp16"), (IOS18Target, W4_CPU, "fp32"),
])
def test_saved_package_carries_the_qdq_integers_scales_and_zero_points_bit_for_bit(tmp_path, target_cls, recipe,
                                                                                   compute):
    target = target_cls(compute=compute)
    qdq = tmp_path / "tiny.qdq.onnx"
    profile = HOST_DQ_GATHERS if recipe == W4_CPU else target.name
    api.quantize(_tiny(tmp_path), qdq, recipe.split()[0], profile=profile)
    res = target.package(qdq, tmp_path / "pkg")
    seen = _assert_package_carries_the_qdq_parameters(qdq, res.model_file, target.deployment, compute)
    assert seen["weight"] == 4
    # every int8 weight carries its (zero) zero point; int4 MatMul/Gemm/Conv blocks carry theirs
    assert seen["zero_point"] == (4 if recipe == "w8a16" else 3)
    if recipe == W4_CPU:
        model = onnx.load(str(qdq))
        assert model.opset_import[0].version == 23
        assert seen["fp16_scale"] == (1 if compute == "fp16" else 0)  # the Gather's, widened exactly in fp32
    # and the package computes what the QDQ ONNX computes (fp16 compute: ≥ 45 dB; fp32: ≥ 90 dB)
    got = MLPackageRunner(res.model_file).run(FEED)
    want = dict(zip(["y", "z"], ort_run(onnx.load(str(qdq)), FEED)))
    for k in ("y", "z"):
        assert sqnr_db(want[k], got[k]) >= (45 if compute == "fp16" else 90), k


def test_a_host_profile_w4a16_model_is_refused_with_the_profile_to_quantize_for(tmp_path):
    qdq = tmp_path / "tiny.qdq.onnx"
    api.quantize(_tiny(tmp_path), qdq, "w4a16", profile="onnxruntime-cpu")
    with pytest.raises(UnsupportedError, match="GatherBlockQuantized.*--profile ios18"):
        IOS18Target().package(qdq, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("target_cls,compute", [(IOS17Target, "fp16"), (IOS17Target, "fp32"), (IOS18Target, "fp16")])
def test_w8a8_activation_quantize_and_int32_biases_keep_the_qdq_numbers(tmp_path, target_cls, compute):
    """W8A8: activation Q/DQ → MIL quantize/dequantize with the ONNX zero point and scale (float16-rounded
    in fp16 compute), int8 weights with their zero points, int32 biases folded to ORT's values."""
    target = target_cls(compute=compute)
    qdq = tmp_path / "cnn.w8a8.onnx"
    api.quantize(tiny_cnn(tmp_path / "cnn.onnx"), qdq, "w8a8", profile=target.name, calib=cnn_feeds())
    res = target.package(qdq, tmp_path / "pkg")
    assert res.manifest["mil_ops"]["quantize"] == res.manifest["mil_ops"]["dequantize"] == 3
    seen = _assert_package_carries_the_qdq_parameters(qdq, res.model_file, target.deployment, compute)
    assert seen == {"weight": 4, "zero_point": 4, "fp16_scale": 0, "activation": 6, "int32_bias": 3}
    feed = cnn_feeds(1, seed=7)[0]
    want = ort_run(onnx.load(str(qdq)), feed)[0]
    got = MLPackageRunner(res.model_file).run(feed)["y"]
    # fp32: the same codes as ORT (measured: identical outputs); fp16: measured 51.7 dB (a few activation
    # codes one step apart, from the fp16 rounding of the activations they quantize)
    assert sqnr_db(want, got) >= (90 if compute == "fp32" else 45)


def test_int4_on_ios17_fails_preflight_naming_the_node_and_writes_nothing(tmp_path):
    qdq = tmp_path / "tiny.w4.onnx"
    api.quantize(_tiny(tmp_path), qdq, "w4a16")  # the default profile keeps int4
    out = tmp_path / "pkg"
    with pytest.raises(UnsupportedError, match="int4 block weights need iOS 18") as e:
        IOS17Target().package(qdq, out)
    assert "DequantizeLinear" in str(e.value) and "_dequantize" in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]


def test_ios17_profile_falls_back_int4_to_int8_and_says_why(tmp_path):
    res = api.quantize(_tiny(tmp_path), None, "w4a16", profile="ios17")
    assert {d.format.value for d in res.plan.weights} == {"int8"}
    assert all("iOS 17" in d.reason and "fell back" in d.reason for d in res.plan.weights)
    res = api.quantize(_tiny(tmp_path), None, "mxfp4", profile="ios18")
    assert all("no 4-bit float" in d.reason for d in res.plan.weights)


def test_unlowerable_op_is_named_before_anything_is_written(tmp_path):
    model, _ = single_op("Det", {"x": ("input", rng_array((3, 3), 1))})
    path = tmp_path / "det.onnx"
    onnx.save(model, str(path))
    problems = IOS18Target().preflight(model)
    assert [(p.node, p.op_type) for p in problems] == [("det_node", "Det")]
    with pytest.raises(UnsupportedError, match="det_node.*Det"):
        IOS18Target().package(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


SHAPE_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, sequence, 8] x) => (float[batch, sequence, 2, 4] y)
{
    s = Shape <end = 2> (x)
    tail = Constant <value = int64[2] {2, 4}> ()
    shp = Concat <axis = 0> (s, tail)
    y = Reshape (x, shp)
}
"""


@pytest.mark.parametrize("shapes,has_shape_op", [(None, True), ({"batch": 2, "sequence": 3}, False)])
def test_shape_subgraphs_fold_for_fixed_shapes_and_stay_dynamic_otherwise(tmp_path, shapes, has_shape_op):
    path = tmp_path / "shape.onnx"
    onnx.save(onnx.parser.parse_model(SHAPE_TEXT), str(path))
    res = IOS18Target(shapes=shapes).package(path, tmp_path / "pkg")
    assert ("shape" in res.manifest["mil_ops"]) is has_shape_op
    x = rng_array((2, 3, 8), 1)
    got = MLPackageRunner(res.model_file).run({"x": x})["y"]
    assert np.array_equal(got, x.astype(np.float16).astype(np.float32).reshape(2, 3, 2, 4))


def test_metadata_readme_and_manifest(tmp_path):
    qdq = tmp_path / "tiny.qdq.onnx"
    api.quantize(_tiny(tmp_path), qdq, "w8a16", profile="ios17")
    res = api.package(qdq, "ios17", tmp_path / "pkg")
    import coremltools as ct

    spec = ct.utils.load_spec(str(res.model_file))
    meta = dict(spec.description.metadata.userDefined)
    assert meta["edgeq.compute_precision"] == "fp16" and meta["edgeq.deployment_target"] == "iOS17"
    assert json.loads(meta["edgeq.quantization"])["weights"] == {"int8": 4}
    assert [i["name"] for i in json.loads(meta["edgeq.inputs"])] == ["ids", "img"]
    assert {f.name: f.shortDescription for f in spec.description.input}["ids"].startswith("int32 [batch 1..1024, 5]")
    readme = (res.path / "README.md").read_text()
    assert "import CoreML" in readme and '"ids": MLFeatureValue' in readme and "iOS17" in readme
    assert res.manifest["runtime"]["minimum_ios"] == "17.0"
    assert set(res.manifest["files"]) >= {"tiny.mlpackage/Manifest.json", "README.md"}


def test_fp32_compute_on_request(tmp_path):
    model, feed = single_op("Gelu", {"x": ("input", rng_array((4, 5), 1))})
    path = tmp_path / "gelu.onnx"
    onnx.save(model, str(path))
    res = IOS18Target(compute="fp32").package(path, tmp_path / "pkg")
    assert "cast" not in res.manifest["mil_ops"]
    assert sqnr_db(ort_run(model, feed)[0], MLPackageRunner(res.model_file).run(feed)["y"]) >= 90
    with pytest.raises(InputError, match="compute precision"):
        IOS18Target(compute="bf16")


def test_runner_checks_flexible_ranges_and_int32(tmp_path):
    path = tmp_path / "shape.onnx"
    onnx.save(onnx.parser.parse_model(SHAPE_TEXT), str(path))
    res = IOS18Target(shapes={"sequence": (1, 4)}).package(path, tmp_path / "pkg")
    runner = MLPackageRunner(res.model_file)
    assert [str(s) for s in runner.input_specs] == ["x:float32[batch,sequence,8]"]
    with pytest.raises(InputError, match="outside the package's range 1..4"):
        runner.run({"x": rng_array((1, 5, 8), 1)})


@pytest.mark.skipif(not coreml_predict_available()[0], reason=coreml_predict_available()[1] or "n/a")
def test_coreml_predict_matches_the_reference_executor(tmp_path):  # pragma: no cover - macOS only
    from targets.coreml.runner import coreml_predict

    qdq = tmp_path / "tiny.qdq.onnx"
    api.quantize(_tiny(tmp_path), qdq, "w8a16", profile="ios18")
    res = IOS18Target().package(qdq, tmp_path / "pkg")
    ref = MLPackageRunner(res.model_file).run(FEED)
    got = coreml_predict(res.model_file, {"ids": FEED["ids"].astype(np.int32), "img": FEED["img"]})
    for k in ("y", "z"):
        assert sqnr_db(ref[k], got[k]) >= 40


def test_executor_teacher_forcing_replaces_named_values(tmp_path):
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3] x) => (float[2, 3] y)
    {
        m = Mul (x, x)
        y = Sub (m, x)
    }
    """
    path = tmp_path / "f.onnx"
    onnx.save(onnx.parser.parse_model(text), str(path))
    res = IOS18Target(compute="fp32").package(path, tmp_path / "pkg")
    ex = MLPackageRunner(res.model_file).executor
    x = rng_array((2, 3), 1)
    forced = np.full((2, 3), 5.0, np.float32)
    out = ex.run({"x": x}, keep={"m"}, force={"m": forced})
    np.testing.assert_array_equal(out["m"], forced)
    np.testing.assert_array_equal(out["y"], forced - x)
    with pytest.raises(InputError, match="cannot force nope"):
        ex.run({"x": x}, force={"nope": forced})
    with pytest.raises(InputError, match="forced value 'm' has shape"):
        ex.run({"x": x}, force={"m": forced[:1]})


def test_scales_that_are_float16_values_are_stored_as_float16_with_the_same_weights(tmp_path, monkeypatch):
    """fp16 compute: float32 weight scales that are all exactly float16 (a GGUF's Q8_0 scales) are stored as
    float16 (half the bytes); the package computes bit for bit what it computes with them stored float32."""
    from onnx import TensorProto, helper

    from targets.coreml.lower import quant

    rng = np.random.default_rng(0)
    half_scales = lambda *shape: (rng.uniform(0.01, 0.05, shape).astype(np.float16).astype(np.float32))  # noqa: E731
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (64, 48)).astype(np.int8), "w8"),
        numpy_helper.from_array(half_scales(48), "s8"),
        numpy_helper.from_array(rng.integers(-8, 8, (64, 40)).astype(ml_dtypes.int4), "w4"),
        numpy_helper.from_array(half_scales(2, 40), "s4"),  # blocks of 32 along K = 64
        numpy_helper.from_array(rng.uniform(0.01, 0.05, 40).astype(np.float32), "s_odd"),  # not float16 values
        numpy_helper.from_array(rng.integers(-127, 128, (64, 40)).astype(np.int8), "w_odd"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w8", "s8"], ["d8"], axis=1),
             helper.make_node("DequantizeLinear", ["w4", "s4"], ["d4"], axis=0, block_size=32),
             helper.make_node("DequantizeLinear", ["w_odd", "s_odd"], ["d_odd"], axis=1),
             helper.make_node("MatMul", ["x", "d8"], ["y"]), helper.make_node("MatMul", ["x", "d4"], ["z"]),
             helper.make_node("MatMul", ["x", "d_odd"], ["u"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", k]) for n, k in (("y", 48), ("z", 40),
                                                                                          ("u", 40))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    qdq = tmp_path / "q.onnx"
    onnx.save(model, str(qdq))
    feed = {"x": rng_array((3, 64), 1)}
    target = IOS18Target(compute="fp16")
    res = target.package(qdq, tmp_path / "half")
    by_name, _ = _ops(res.model_file)
    assert {n: by_name[mil_name(d)].scale.val.dtype for n, d in (("w8", "d8"), ("w4", "d4"), ("odd", "d_odd"))} == \
        {"w8": np.float16, "w4": np.float16, "odd": np.float32}
    monkeypatch.setattr(quant, "_stored_scale", lambda scale, compute: scale)
    ref = target.package(qdq, tmp_path / "full")
    assert _ops(ref.model_file)[0][mil_name("d8")].scale.val.dtype == np.float32
    got = MLPackageRunner(res.model_file, engine="numpy").run(feed)
    want = MLPackageRunner(ref.model_file, engine="numpy").run(feed)
    for k in ("y", "z", "u"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
