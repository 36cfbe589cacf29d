"""The reference executor's fast path against its plain path, and its float16 rounding against numpy's.

The fast path holds fp16 tensors as float32 arrays of float16 values, rounds with float32
arithmetic, lays constant weights out once and splits large ops over threads; the plain path
(``fast=False``) holds float16 arrays and casts with numpy around every op. Both run the same op
implementations, so the tolerance between them is zero: identical bits, checked on every op case
of test_coreml_ops and on W8A8 models, with the thread split forced on tiny tensors.
"""

import math

import numpy as np
import onnx
import pytest
from coreml_models import cnn_feeds, package_and_load, rng_array, single_op, tiny_cnn, translated_run
from test_coreml_ops import CASES

from edgeq import api
from edgeq._quiet import quiet
from targets.coreml.executor import Executor, parallel
from targets.coreml.executor.fp16 import round_fp16
from targets.coreml.executor.ops_math import _erf


def _cast(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).astype(np.float32)


def _same_bits(a, b) -> bool:
    """Equal shapes, dtypes and bits (-0.0 differs from 0.0; any nan equals any nan)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    nan = np.isnan(a)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]
    return np.array_equal(nan, np.isnan(b)) and np.array_equal(np.where(nan, 0, a).view(uint),
                                                               np.where(nan, 0, b).view(uint))


def assert_within_fp16_ulp(want, got, max_share=0.01):
    """Arrays of float16 values (float16, or float32 after a program's final cast) equal but for at most
    ``max_share`` of elements, each one fp16 step apart (a float32 sum in another order landing on the
    other side of an fp16 midpoint)."""
    assert want.dtype == got.dtype and want.dtype in (np.float16, np.float32) and want.shape == got.shape
    differ = (want != got) & ~(np.isnan(want) & np.isnan(got))
    assert np.count_nonzero(differ) <= max_share * want.size
    step = np.spacing(np.maximum(np.abs(want), np.abs(got))[differ].astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(want[differ].astype(np.float32) - got[differ].astype(np.float32)) <= step)


def _fp16_edges() -> np.ndarray:
    """Every finite float16, the midpoints between neighbours, and the float32 numbers next to those."""
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    h = np.sort(h[np.isfinite(h)])
    mids = ((h[1:].astype(np.float64) + h[:-1]) / 2).astype(np.float32)
    pts = np.concatenate([h, mids, [65504.0, 65519.996, 65520.0, 70000.0, 2.0**-25, 3 * 2.0**-26, 1e-40, 3e38]])
    pts = np.concatenate([pts, -pts]).astype(np.float32)
    return np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf)),
                           np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)])


@pytest.mark.parametrize("where", ["new array", "in place"])
def test_round_fp16_is_a_float16_cast_bit_for_bit(where):
    rng = np.random.default_rng(0)
    cases = {
        "edges": _fp16_edges(),  # > 1 % below 2**-14: rounded by exponent
        "random bits": rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        "activations": (rng.standard_normal(200_000) * 3).astype(np.float32),  # few tiny values: patched
    }
    cases["activations"][:4] = [1e-6, -3e-8, -0.0, 7e4]
    for name, x in cases.items():
        want = _cast(x)
        got = round_fp16(x.copy(), out=None) if where == "new array" else round_fp16(y := x.copy(), out=y)
        assert _same_bits(got, want), name


def test_round_fp16_normal_only_on_dequantized_codes():
    """The dequantize shortcut (Veltkamp's passes only): codes -255..255 times fp16 scales of 2**-14 ..
    256, bit for bit a float16 cast."""
    rng = np.random.default_rng(2)
    scales = _cast(np.concatenate([[2.0**-14, 255.875], 2.0 ** rng.uniform(-14, 8, 200)]).astype(np.float32))
    x = (np.arange(-255, 256, dtype=np.float32)[None, :] * scales[:, None]).astype(np.float32)
    assert _same_bits(round_fp16(x, normal=True), _cast(x))


def test_erf_is_within_2e_7_of_math_erf():
    x = np.concatenate([np.linspace(-6, 6, 200_001), [0.0, -0.0, 1e-30, 3.9, 4.0, 4.1, 40.0]]).astype(np.float32)
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    got = _erf(x)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 2e-7
    assert np.all(np.abs(got) <= 1)


def _always_split(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_FLOPS", 0)
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(parallel, "workers", lambda: 3)  # an odd block count: uneven blocks
    monkeypatch.setattr(parallel, "_pool", None)


@pytest.fixture(params=["thresholds", "always split"])
def split(request, monkeypatch):
    """Run a test as shipped and with every op split over threads, however small."""
    if request.param == "always split":
        _always_split(monkeypatch)
    return request.param


def test_the_pool_really_runs_blocks_when_told_to(monkeypatch):
    """The split the fast-path tests force does reach the pool's threads."""
    import threading

    _always_split(monkeypatch)
    seen = []

    def block(a, b):
        seen.append((a, b, threading.current_thread().name))

    parallel.rows(block, 9, 1, 0)
    assert sorted((a, b) for a, b, _ in seen) == [(0, 3), (3, 6), (6, 9)]
    assert {name.startswith("edgeq-coreml") for _, _, name in seen} == {True, False}  # the caller and the pool


def _both(pkg):
    return Executor.from_package(pkg, fast=True), Executor.from_package(pkg, fast=False)


def _assert_same(fast, plain, feed, keep=None):
    a, b = fast.run(feed, keep=keep), plain.run(feed, keep=keep)
    assert a.keys() == b.keys()
    for k in a:
        assert _same_bits(a[k], b[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_plain_path_on_every_op(case, tmp_path, monkeypatch):
    _always_split(monkeypatch)  # tiny tensors: split every op, or the threaded code would not run
    op, inputs, attrs = CASES[case]
    model, feed = single_op(op, inputs, attrs)
    _, _, _, pkg = package_and_load(model, tmp_path, compute="fp16")
    fast, plain = _both(pkg)
    _assert_same(fast, plain, feed)
    translated = translated_run(fast, feed, case)
    if translated is not None:  # ONNX Runtime's float32 kernels, rounded at the same places: within an fp16 ulp
        assert_within_fp16_ulp(fast.run(feed)["y"], translated["y"])


def test_fast_path_equals_plain_path_w8a8_cnn(tmp_path, split):
    qdq = tmp_path / "cnn.w8a8.onnx"
    api.quantize(tiny_cnn(tmp_path / "cnn.onnx"), qdq, "w8a8", profile="ios18", calib=cnn_feeds())
    _, _, _, pkg = package_and_load(onnx.load(str(qdq)), tmp_path, compute="fp16")
    fast, plain = _both(pkg)
    keep = {op.outputs[0].name for op in fast.ops if op.op_type in ("quantize", "dequantize", "conv")}
    for feed in cnn_feeds(2, seed=5):
        _assert_same(fast, plain, feed, keep)


ATTENTION = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, seq, 64] x, float[batch, 1, 1, seq] bias) => (float[batch, seq, 64] y)
<float[64, 64] wq = {%s}, float[64, 64] wk = {%s}, float[64, 256] w1 = {%s}, float[256, 64] w2 = {%s},
 float[64] g = {%s}>
{
    n = LayerNormalization <axis = -1> (x, g)
    q = MatMul (n, wq)
    k = MatMul (n, wk)
    qh = Reshape (q, qs)
    kh = Reshape (k, qs)
    qt = Transpose <perm = [0, 2, 1, 3]> (qh)
    kt = Transpose <perm = [0, 2, 3, 1]> (kh)
    s = MatMul (qt, kt)
    sb = Add (s, bias)
    p = Softmax <axis = -1> (sb)
    vh = Transpose <perm = [0, 2, 1, 3]> (qh)
    o = MatMul (p, vh)
    ot = Transpose <perm = [0, 2, 1, 3]> (o)
    a = Reshape (ot, xs)
    r = Add (x, a)
    h = MatMul (r, w1)
    ge = Gelu (h)
    y = MatMul (ge, w2)
}
"""


def test_fast_path_equals_plain_path_attention_block(tmp_path, split):
    rng = np.random.default_rng(3)
    fmt = lambda *shape: ", ".join(f"{v:.4f}" for v in rng.standard_normal(shape).ravel() * 0.2)
    text = ATTENTION % (fmt(64, 64), fmt(64, 64), fmt(64, 256), fmt(256, 64), fmt(64))
    text = text.replace("{\n    n =", "{\n    qs = Constant <value = int64[4] {0, 0, 4, 16}> ()\n"
                                      "    xs = Constant <value = int64[3] {0, 0, 64}> ()\n    n =")
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    _, _, _, pkg = package_and_load(model, tmp_path, compute="fp16")
    bias = np.zeros((3, 1, 1, 7), np.float32)
    bias[1, ..., 5:] = -3.4e38  # padding as exports mask it: saturates to -65504 in fp16
    feed = {"x": rng_array((3, 7, 64), 4) * 3, "bias": bias}
    _assert_same(*_both(pkg), feed)


def test_gelu_tail_and_softmax_underflow_are_rounded_like_float16(tmp_path):
    """Values below float16's normal range (GELU's negative tail, small probabilities) take the
    subnormal rounding: the fast path gives what a float16 cast gives."""
    model, feed = single_op("Gelu", {"x": ("input", np.linspace(-6, 1, 4000, dtype=np.float32).reshape(40, 100))})
    _, _, _, pkg = package_and_load(model, tmp_path, compute="fp16")
    fast, plain = _both(pkg)
    got = fast.run(feed)["y"]
    assert np.count_nonzero((got != 0) & (np.abs(got) < 2.0**-14)) > 100  # float16 subnormals were produced
    _assert_same(fast, plain, feed)


def _mil_ops_emitted_by(paths) -> set[str]:
    """MIL op types built with ``mb.<op>(...)`` in the given source files."""
    import re

    ops = set()
    for p in paths:
        ops |= set(re.findall(r"\bmb\.([a-z_0-9]+)\(", p.read_text()))
    return ops - {"program", "const", "set_before_op", "placeholder", "scope", "state_tensor_placeholder"}


def test_every_op_the_lowering_can_emit_runs_in_the_executor():
    """A package edgeq built must be one its executor can run: every MIL op the lowering builds, by
    name in its source or through its op tables."""
    from pathlib import Path

    from targets.coreml import lower
    from targets.coreml.executor import OPS
    from targets.coreml.lower import elementwise, norm

    emitted = _mil_ops_emitted_by(Path(lower.__file__).parent.glob("*.py"))
    emitted |= set(elementwise._UNARY.values()) | set(elementwise._BINARY.values()) | set(norm._REDUCE.values())
    emitted |= {"real_div", "floor_div", "maximum", "minimum", "mul"}  # binary(ctx, "<op>", ...) calls
    assert len(emitted) > 60
    assert sorted(emitted - set(OPS)) == []


def test_every_op_coremltools_passes_can_emit_runs_in_the_executor():
    """coremltools rewrites the program on save (its cleanup and ML-program backend passes, e.g.
    sigmoid * x -> silu) and, with its default pipeline, fuses more (prelu, pixel_shuffle, LUT weights):
    every op those passes build is one the executor runs (including coreml_update_state, which a
    saved program holds as write_state + read_state: test_coreml_state.py)."""
    from pathlib import Path

    from coremltools.converters import mil

    from targets.coreml.executor import OPS

    root = Path(mil.__file__).parent
    sources = [p for p in [*(root / "mil" / "passes" / "defs").rglob("*.py"), *(root / "backend" / "mil" / "passes").glob("*.py")]
               if not p.name.startswith("test")]
    emitted = _mil_ops_emitted_by(sources)
    assert {"silu", "prelu", "pixel_shuffle", "constexpr_lut_to_dense", "gelu", "layer_norm"} <= emitted
    assert sorted(emitted - set(OPS)) == []


def test_sigmoid_times_x_is_saved_as_silu_and_runs(tmp_path):
    from coreml_models import ort_run

    from edgeq.validate.metrics import sqnr_db

    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 8, 5] x) => (float[2, 8, 5] y)
    {
        s = Sigmoid (x)
        y = Mul (x, s)
    }
    """
    model = onnx.parser.parse_model(text)
    feed = {"x": rng_array((2, 8, 5), 1) * 4}
    for compute, floor in (("fp32", 90), ("fp16", 45)):
        ex, _, _, _ = package_and_load(model, tmp_path / compute, compute=compute)
        assert "silu" in {op.op_type for op in ex.ops}  # fused by coremltools' backend on save
        assert sqnr_db(ort_run(model, feed)[0], ex.run(feed)["y"]) >= floor


def _saved_mil(tmp_path, build, x: np.ndarray, opset=18):
    """The MIL program ``build(mb, x)`` saved as an .mlpackage (no passes), loaded by the executor."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    target = {17: ct.target.iOS17, 18: ct.target.iOS18}[opset]

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)], opset_version=target)
    def prog(x):
        return build(mb, x)

    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                        pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    path = tmp_path / "mil.mlpackage"
    ml.save(str(path))
    ex = Executor.from_package(path)
    out = ex.run({next(iter(ex.input_dtypes)): x})
    return [out[n] for n in ex.output_names]


def test_ops_coremltools_fuses_in(tmp_path):
    """pixel_shuffle / pixel_unshuffle, square, reduce_argmax, stack, reverse, silu, rank-3 prelu: against
    their definitions written out element by element."""
    x = rng_array((2, 8, 3, 3), 5)

    def build(mb, x):
        return (mb.pixel_shuffle(x=x, upscale_factor=2), mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(3)),
                mb.square(x=x), mb.reduce_argmax(x=x, axis=1),
                mb.stack(values=[x, x], axis=2), mb.reverse(x=x, axes=[1, 3]), mb.silu(x=x),
                mb.prelu(x=mb.reshape(x=x, shape=[2, 8, 9]), alpha=np.full(8, 0.25, np.float32)))

    outs = _saved_mil(tmp_path, build, x)
    shuffle = np.zeros((2, 2, 6, 6), np.float32)
    for c, i, j, h, w in np.ndindex(2, 2, 2, 3, 3):
        shuffle[:, c, h * 2 + i, w * 2 + j] = x[:, c * 4 + i * 2 + j, h, w]
    unshuffle = np.zeros((2, 72, 1, 1), np.float32)
    for c, i, j in np.ndindex(8, 3, 3):
        unshuffle[:, c * 9 + i * 3 + j, 0, 0] = x[:, c, i, j]
    r = x.reshape(2, 8, 9)
    want = [shuffle, unshuffle, x * x, x.argmax(axis=1), np.stack([x, x], axis=2), x[:, ::-1, :, ::-1],
            x / (1 + np.exp(-x)), np.where(r > 0, r, 0.25 * r)]
    for w, g in zip(want, outs):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_palettized_weights_iOS18_lut_per_block(tmp_path):
    """constexpr_lut_to_dense (iOS 18): 2-bit indices, a LUT per block of 3 rows, vectors of 2 along axis 1."""
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)
    idx = rng.integers(0, 4, (6, 4)).astype(types.np_uint2_dtype)
    lut = rng.standard_normal((2, 1, 4, 2)).astype(np.float32)
    w = np.zeros((6, 8), np.float32)
    for r, c in np.ndindex(6, 4):
        w[r, 2 * c : 2 * c + 2] = lut[r // 3, 0, int(idx[r, c])]
    x = rng_array((5, 6), 3)

    def build(mb, x):
        return mb.matmul(x=x, y=mb.constexpr_lut_to_dense(indices=idx, lut=lut, vector_axis=1))

    np.testing.assert_allclose(_saved_mil(tmp_path, build, x)[0], x @ w, rtol=1e-5, atol=1e-5)
