"""Data-aware rounding of int8 Conv weights (edgeq.quant.rounding): the patches are the Conv's,
the codes never lose to nearest rounding on the objective, and on smooth inputs (neighbouring
pixels alike, as in photos) they cut the output error of high-pass kernels."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as oh
from onnx import numpy_helper as nh
from w8a8_models import cnn

import edgeq
from edgeq.errors import InputError
from edgeq.quant import formats
from edgeq.quant.recipes import BiasCorrectionConfig, ConvRoundingConfig, ConvRoundingScope, load_recipe, preset
from edgeq.quant.rounding import ConvGeometry, PatchMoments, patches, round_int8_per_channel
from edgeq.validate.metrics import sqnr_db


def _conv(x, w, **attrs):
    node = oh.make_node("Conv", ["x", "w"], ["y"], **attrs)
    g = oh.make_graph([node], "c", [oh.make_tensor_value_info("x", 1, list(x.shape))],
                      [oh.make_tensor_value_info("y", 1, None)], [nh.from_array(w, "w")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("cin, cout, group, k, pads, strides, dil", [
    (3, 4, 1, (3, 3), (0, 0, 1, 1), (2, 2), (1, 1)),  # an RGB stem, TF-style asymmetric padding
    (6, 6, 6, (5, 5), (2, 2, 2, 2), (1, 1), (1, 1)),  # depthwise 5×5
    (4, 6, 2, (3, 3), (1, 2, 1, 0), (1, 2), (2, 1)),  # grouped, dilated, uneven strides and pads
])
def test_patches_reproduce_the_conv(cin, cout, group, k, pads, strides, dil):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cin, 11, 12)).astype(np.float32)
    w = rng.standard_normal((cout, cin // group, *k)).astype(np.float32)
    geo = ConvGeometry(group, k, pads, strides, dil)
    p = patches(x, geo)  # [g, n, positions]
    y = np.matmul(w.reshape(group, cout // group, -1), p)  # [g, cout/g, positions]
    ref = _conv(x, w, group=group, kernel_shape=list(k), pads=list(pads), strides=list(strides), dilations=list(dil))
    n, _, ho, wo = ref.shape
    got = y.reshape(cout, n, ho, wo).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_moments_are_the_patch_second_moments_and_subsample_large_maps():
    rng = np.random.default_rng(1)
    geo = ConvGeometry(3, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1))
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    mom = PatchMoments(geo)
    mom.update(x[:2])
    mom.update(x[2:])
    p = patches(x, geo).astype(np.float64)
    np.testing.assert_allclose(mom.hessian(centered=False), p @ p.transpose(0, 2, 1) / p.shape[2], rtol=1e-5)
    mu = p.mean(axis=2)
    np.testing.assert_allclose(mom.hessian(centered=True), p @ p.transpose(0, 2, 1) / p.shape[2]
                               - mu[:, :, None] * mu[:, None, :], rtol=1e-4, atol=1e-6)
    big = PatchMoments(geo)
    big.update(rng.standard_normal((1, 3, 128, 128)).astype(np.float32))
    assert big.count <= 1024  # every k-th row and column of a large map


def _smooth_patch_hessian(n_taps=9, corr=0.95, mean=1.0):
    """E[x xᵀ] of 3×3 patches of a smooth image: neighbours alike, a large common mean."""
    idx = np.array([(i, j) for i in range(3) for j in range(3)])
    d = np.abs(idx[:, None, :] - idx[None, :, :]).sum(axis=2)
    return (corr ** d + mean**2)[None].astype(np.float64)


def test_codes_never_lose_to_nearest_and_win_on_a_high_pass_kernel():
    rng = np.random.default_rng(2)
    h = _smooth_patch_hessian()
    for _ in range(20):  # random kernels: never worse than nearest rounding
        w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
        _, before, after = round_int8_per_channel(w, h, damping=0.0)
        assert after >= before - 1e-9
    # a high-pass kernel with large taps of opposite signs (sum ~ 0): its output is small and the
    # rounding errors along the common mean dominate; chosen codes cancel them
    hp = np.array([[-5.45, -6.43, -0.05], [4.52, 6.02, -0.18], [0.78, 0.73, 0.14]], np.float32)
    w = (hp + rng.standard_normal((8, 3, 3)) * 0.3).astype(np.float32)[:, None]
    q, before, after = round_int8_per_channel(w, h, damping=0.0)
    assert after >= before + 6
    nearest = formats.quantize_int8_per_channel(w, 0)
    assert np.abs(q.data.astype(int) - nearest.data.astype(int)).max() <= 2  # codes stay next to nearest
    np.testing.assert_array_equal(q.scale, nearest.scale)  # the int8 scale is unchanged
    assert np.abs(q.data.astype(int)).max() <= 127


def _smooth_feeds(n, seed, batch=4):
    """Low-resolution noise upsampled 4×: neighbouring pixels alike, as in photos."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        low = rng.standard_normal((batch, 3, 4, 4)) * 2.0 + 1.0
        feeds.append({"x": np.kron(low, np.ones((1, 1, 4, 4))).astype(np.float32)})
    return feeds


def _outputs(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def test_hessian_rounding_reduces_the_output_error_on_held_out_smooth_inputs(tmp_path):
    src = cnn(tmp_path / "cnn.onnx", dw_outlier=True)
    m = onnx.load(src)  # make conv1 a high-pass (edge) filter bank with large taps, as photo stems have
    w1 = next(t for t in m.graph.initializer if t.name == "w1")
    a = nh.to_array(w1).copy()
    a[:4] = np.array([[-5.45, -6.43, -0.05], [4.52, 6.02, -0.18], [0.78, 0.73, 0.14]], np.float32) * \
        np.array([1.0, -1.0, 0.5])[None, :, None, None]
    w1.CopyFrom(nh.from_array(a, "w1"))
    onnx.save(m, src)
    calib, ev = _smooth_feeds(6, seed=1), _smooth_feeds(4, seed=9)  # evaluation apart from calibration
    ref = _outputs(src, ev)
    base = preset("w8a16").with_algorithms(bias_correction=BiasCorrectionConfig())  # weights only: the error rounding targets
    errs = {}
    for rounding in ("nearest", "hessian"):
        out = tmp_path / f"{rounding}.onnx"
        res = edgeq.quantize(src, out, base.with_algorithms(conv_rounding=ConvRoundingConfig() if rounding == "hessian" else None), calib=calib, force=True, progress=False)
        rounded = {n.node for n in res.plan.notes if "codes chosen" in n.reason}
        assert rounded == (set() if rounding == "nearest" else {"conv1", "dwconv", "project", "expand"})  # not the Gemm
        errs[rounding] = sqnr_db(ref, _outputs(out, ev))
    assert errs["hessian"] >= errs["nearest"] + 3, errs


def test_small_scope_takes_the_convs_with_a_small_fan_in(tmp_path, monkeypatch):
    from edgeq.quant import rounding
    from edgeq.quant.plan import make_plan
    from edgeq.pipeline.quantize import load_model

    model = load_model(cnn(tmp_path / "cnn.onnx"))
    plan = make_plan(model, preset("w8a8"))
    monkeypatch.setattr(rounding, "SMALL_FAN_IN", 16)  # conv1 has 3·3·3 = 27 inputs per output
    assert set(rounding.rounding_sites(model, plan, ConvRoundingScope.SMALL)) == {"dwconv", "project", "expand"}
    assert set(rounding.rounding_sites(model, plan, ConvRoundingScope.ALL)) == {"conv1", "dwconv", "project", "expand"}


def test_recipe_key_and_bad_value(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[default]\nweights = "int8"\nactivations = "uint8"\n[algorithms]\nconv_rounding = {scope = "small"}\n')
    assert load_recipe(p).algorithms.conv_rounding == ConvRoundingConfig(ConvRoundingScope.SMALL)
    assert load_recipe(p).needs_calibration
    assert preset("w8a8").algorithms.conv_rounding == ConvRoundingConfig() == preset("w8a16").algorithms.conv_rounding
    p.write_text('[algorithms]\nconv_rounding = {scope = "adaround"}\n')
    with pytest.raises(InputError, match="scope = 'adaround' is not one of 'all', 'small'"):
        load_recipe(p)
