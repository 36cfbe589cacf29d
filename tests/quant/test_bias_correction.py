"""Bias correction on a padded Conv (edgeq.quant.bias): the mean output shift of weight rounding is
cancelled at every output position, the ones whose taps read the zero padding included."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

import edgeq
from edgeq.quant.bias import TapMean
from edgeq.quant.recipes import BiasCorrectionConfig, preset

CIN, COUT, FRAMES = 8, 16, 4


def _conv1d(path):
    """x[N, 8, 4] -> Conv1d(kernel 3, padding 1) -> y: like silero-vad's encoder on a window of 4 frames,
    half the outputs read a padded zero at one tap."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((COUT, CIN, 3)).astype(np.float32) * 0.3
    w[:, :, 0] += 0.0041  # below half an int8 step of most rows: rounding shifts the edge taps' sums
    b = rng.standard_normal(COUT).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1], name="conv")], "g",
                          [oh.make_tensor_value_info("x", 1, ["n", CIN, FRAMES])], [oh.make_tensor_value_info("y", 1, None)],
                          [nh.from_array(w, "w"), nh.from_array(b, "b")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return str(path)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)  # magnitudes: a large positive mean per channel
    return [{"x": (np.abs(rng.standard_normal((32, CIN, FRAMES))) + 4.0).astype(np.float32)} for _ in range(n)]


def _y(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def test_tap_means_count_the_padding_as_zeros():
    x = np.arange(2 * 1 * 4, dtype=np.float32).reshape(2, 1, 4)  # [[0 1 2 3], [4 5 6 7]]
    t = TapMean((3,), (1,), (1,), (1, 1))
    t.update(x)
    # tap 0 reads x[o-1]: (0+0+1+2) + (0+4+5+6) over 8 outputs; tap 1 all; tap 2 x[o+1]: (1+2+3+0) + (5+6+7+0)
    np.testing.assert_allclose(t.result()[0], [18 / 8, 28 / 8, 24 / 8])


def test_bias_correction_cancels_the_mean_shift_at_padded_positions_too(tmp_path):
    src = _conv1d(tmp_path / "m.onnx")
    cal, ev = _feeds(8, 1), _feeds(8, 2)
    ref = _y(src, ev)
    shift = {}
    for on in (False, True):
        out = tmp_path / f"bc{on}.onnx"
        rec = preset("w8a16").with_algorithms(bias_correction=BiasCorrectionConfig() if on else None,
                                              conv_rounding=None)  # nearest codes: the shift bias correction removes
        edgeq.quantize(src, out, rec, calib=cal, force=True, progress=False)
        err = _y(out, ev) - ref
        shift[on] = np.abs(err.mean(axis=(0, 2)))  # per channel: the mean error a bias can cancel
    # a single bias per channel cannot fix the border frames apart from the inner ones, but it must
    # cancel the channel's mean shift over all positions (a per-channel input mean over-corrects:
    # the border frames read one padded zero each)
    assert shift[True].mean() < 0.1 * shift[False].mean()
