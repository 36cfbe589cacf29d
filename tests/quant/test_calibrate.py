"""Streaming calibration: ranges equal one-shot statistics, feeds are checked as they stream,
masking constants never set a range, memory does not grow with the number of batches."""

import numpy as np
import onnx
import pytest
from w8a8_models import cnn, cnn_feeds, encoder_block, encoder_feeds

from edgeq.errors import InputError
from edgeq.quant.activations import RangeStatistic
from edgeq.quant.calibrate import calibrate
from edgeq.quant.recipes import CalibrationMethod
from edgeq.quant.stats import ChannelAbsMax, ChannelMean, Gram


def _ranges(path, names, feeds, method=CalibrationMethod.MINMAX):
    stats = {n: RangeStatistic(n, method, {}) for n in names}
    table = calibrate(onnx.load(path), {n: [s] for n, s in stats.items()}, feeds, progress=False)
    return table, {n: s.result() for n, s in stats.items()}


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
    table, ranges = _ranges(path, names, iter(feeds))  # a generator: streamed once
    expect = _ranges_by_numpy(path, feeds, names)
    for n in names:
        r = ranges[n]
        assert (r.lo, r.hi) == pytest.approx(expect[n], rel=1e-6, abs=1e-7)
        assert r.ignored == 0 and r.seen > 0
    assert table.batches == 5 and table.samples == 10
    assert len(table.data_sha256) == 64


def test_masking_constants_are_counted_not_ranged(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    _, ranges = _ranges(path, ["masked", "res"], encoder_feeds(3))
    masked, res = ranges["masked"], ranges["res"]
    assert masked.ignored > 0  # the finfo.min entries of padded positions
    assert abs(masked.lo) < 1e3 and abs(masked.hi) < 1e3  # the range is the real values'
    assert res.ignored == 0


def test_statistics_memory_is_flat_in_the_batch_count(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    few, _ = _ranges(path, ["ln", "r1"], encoder_feeds(2), CalibrationMethod.MSE)
    many, _ = _ranges(path, ["ln", "r1"], encoder_feeds(12), CalibrationMethod.MSE)
    assert few.peak_state_bytes == many.peak_state_bytes


def test_channel_statistics(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx", outlier_channel=3)
    absmax, mean = ChannelAbsMax(), ChannelMean()
    calibrate(onnx.load(path), {"ln": [absmax], "x": [mean]}, encoder_feeds(3), progress=False)
    a = absmax.result()
    assert a.shape == (16,) and int(np.argmax(a)) == 3  # the planted outlier channel
    assert mean.result() is None  # axis 1 of [B, S, D] changes size: not a channel axis
    cnn_path = cnn(tmp_path / "cnn.onnx")
    feeds = cnn_feeds(3)
    mean = ChannelMean()
    calibrate(onnx.load(cnn_path), {"x": [mean]}, feeds, progress=False)
    expect = np.concatenate([f["x"] for f in feeds]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean.result(), expect, rtol=1e-5, atol=1e-6)


def test_gram_equals_one_shot_and_skips_masked_rows(tmp_path):
    path = encoder_block(tmp_path / "enc.onnx")
    feeds = encoder_feeds(4)
    gram, masked_gram, masked_max = Gram(), Gram(), ChannelAbsMax()
    calibrate(onnx.load(path), {"ln": [gram], "masked": [masked_gram, masked_max]}, feeds, progress=False)
    rows = np.concatenate([r.reshape(-1, 16) for r in _outputs(path, feeds, "ln")]).astype(np.float64)
    np.testing.assert_allclose(gram.result(), rows.T @ rows / len(rows), rtol=1e-5)
    assert masked_max.masked and masked_max.result() is None  # the finfo.min positions
    m = np.concatenate([r.reshape(-1, r.shape[-1]) for r in _outputs(path, feeds, "masked")]).astype(np.float64)
    m = m[np.all(np.abs(m) < 1e30, axis=1)]
    np.testing.assert_allclose(masked_gram.result(), m.T @ m / len(m), rtol=1e-5)


def _outputs(path, feeds, name):
    import onnxruntime as ort

    m = onnx.load(path)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run([name], f)[0] for f in feeds]


@pytest.mark.parametrize("feeds, message", [
    ([], "no calibration feeds"),
    ([{"x": np.zeros((2, 5, 16), np.float32)}], "mask"),  # a missing input is named
    ([{"x": np.zeros((2, 5, 8), np.float32), "mask": np.ones((2, 5, 1), np.float32)}], "x"),
    ([{"x": np.full((2, 5, 16), np.nan, np.float32), "mask": np.ones((2, 5, 1), np.float32)}], "NaN"),
])
def test_bad_feeds_fail_before_any_run(tmp_path, feeds, message):
    path = encoder_block(tmp_path / "enc.onnx")
    with pytest.raises(InputError, match=message):
        _ranges(path, ["ln"], feeds)


def test_a_float16_tensor_is_observed_as_float16(tmp_path):
    # calibration declared every observed tensor float: ONNX Runtime refused a float16 one ("Type
    # (tensor(float)) of output arg ... does not match expected type (tensor(float16))")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.FLOAT16),
         onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("Cast", ["r"], ["y"], to=onnx.TensorProto.FLOAT)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "half.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), path)
    feeds = [{"x": np.array([[-1, 0.5, 2, 3], [4, -5, 6, 0.25]], np.float32)}]
    _, ranges = _ranges(str(path), ["r"], feeds)
    assert ranges["r"].lo == 0 and ranges["r"].hi == 6
