"""Streaming calibration: ranges equal one-shot statistics, feeds are checked as they stream,
masking constants never set a range, memory does not grow with the number of batches."""

import numpy as np
import onnx
import pytest
from w8a8_models import cnn, cnn_feeds, encoder_block, encoder_feeds

from edgeq.errors import InputError
from edgeq.quant.calibrate import calibrate
from edgeq.quant.recipes import CalibrationConfig


def _ranges_by_numpy(path, feeds, names):
    import onnxruntime as ort

    m = onnx.load(path)
    for n in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [s.run(names, f) for f in feeds]
    return {n: (min(o[i].min() for o in outs), max(o[i].max() for o in outs)) for i, n in enumerate(names)}


def test_minmax_equals_one_shot_over_variable_lengths(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    feeds = encoder_feeds(5)  # sequence lengths 5..9
    names = ["ln", "r1", "a2"]
    table = calibrate(onnx.load(path), names, iter(feeds), progress=False)  # a generator: streamed once
    expect = _ranges_by_numpy(path, feeds, names)
    for n in names:
        r = table.ranges[n]
        assert (r.lo, r.hi) == pytest.approx(expect[n], rel=1e-6, abs=1e-7)
        assert r.ignored == 0 and r.seen > 0
    assert table.batches == 5 and table.samples == 10
    assert len(table.data_sha256) == 64


def test_masking_constants_are_counted_not_ranged(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    table = calibrate(onnx.load(path), ["masked", "res"], encoder_feeds(3), progress=False)
    masked, res = table.ranges["masked"], table.ranges["res"]
    assert masked.ignored > 0  # the finfo.min entries of padded positions
    assert abs(masked.lo) < 1e3 and abs(masked.hi) < 1e3  # the range is the real values'
    assert res.ignored == 0


def test_statistics_memory_is_flat_in_the_batch_count(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    cfg = CalibrationConfig("mse")
    few = calibrate(onnx.load(path), ["ln", "r1"], encoder_feeds(2), config=cfg, progress=False)
    many = calibrate(onnx.load(path), ["ln", "r1"], encoder_feeds(12), config=cfg, progress=False)
    assert few.peak_state_bytes == many.peak_state_bytes


def test_channel_statistics(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx", outlier_channel=3)
    table = calibrate(onnx.load(path), [], encoder_feeds(3), channels=["ln"], means=["x"], progress=False)
    a = table.channel_absmax["ln"]
    assert a.shape == (16,) and int(np.argmax(a)) == 3  # the planted outlier channel
    assert "x" not in table.channel_mean  # axis 1 of [B, S, D] changes size: not a channel axis
    cnn_path = cnn(tmp_path / "cnn.onnx")
    feeds = cnn_feeds(3)
    table = calibrate(onnx.load(cnn_path), [], feeds, means=["x"], progress=False)
    expect = np.concatenate([f["x"] for f in feeds]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(table.channel_mean["x"], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feeds, message", [
    ([], "no calibration feeds"),
    ([{"x": np.zeros((2, 5, 16), np.float32)}], "mask"),  # a missing input is named
    ([{"x": np.zeros((2, 5, 8), np.float32), "mask": np.ones((2, 5, 1), np.float32)}], "x"),
    ([{"x": np.full((2, 5, 16), np.nan, np.float32), "mask": np.ones((2, 5, 1), np.float32)}], "NaN"),
])
def test_bad_feeds_fail_before_any_run(tmp_path, feeds, message):
    path = encoder_block(tmp_path / "enc.onnx")
    with pytest.raises(InputError, match=message):
        calibrate(onnx.load(path), ["ln"], feeds, progress=False)
