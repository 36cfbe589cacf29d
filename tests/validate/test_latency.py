"""Host latency at the shapes users run: sequence lengths of a text model, op profiles, slower-than-float flags."""

import importlib

import numpy as np
import onnx
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgeq.specs import TensorSpec
from edgeq.validate.latency import at_length, latency_report, sequence_axis

SPECS = [TensorSpec("input_ids", ("batch", "sequence"), "int64"), TensorSpec("mask", ("batch", "sequence"), "int64")]


def test_the_sequence_axis_is_the_one_dynamic_axis_besides_batch():
    assert sequence_axis(SPECS) == "sequence"
    assert sequence_axis([TensorSpec("x", ("batch", 3, 224, 224), "float32")]) is None
    assert sequence_axis([TensorSpec("a", ("batch", "s"), "int64"), TensorSpec("b", ("batch", "t"), "int64")]) is None


def test_a_feed_at_another_length_repeats_or_cuts_the_real_tokens():
    feed = {"input_ids": np.array([[101, 7, 8, 102, 0]]), "mask": np.array([[1, 1, 1, 1, 0]])}
    long = at_length(feed, SPECS, "sequence", 12)
    assert long["input_ids"].shape == (1, 12) and list(long["input_ids"][0, 5:10]) == [101, 7, 8, 102, 0]
    assert list(at_length(feed, SPECS, "sequence", 3)["mask"][0]) == [1, 1, 1]


def _model(path, hidden: int, dequantize: bool):
    """An embedding lookup + MatMul; the 'quantized' one dequantizes a large table on every run."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((4000, hidden)).astype(np.float32)
    w = rng.standard_normal((hidden, hidden)).astype(np.float32)
    inits = [nh.from_array(w, "w")]
    nodes = [oh.make_node("Gather", ["table", "input_ids"], ["e"]), oh.make_node("MatMul", ["e", "w"], ["y"])]
    if dequantize:
        inits += [nh.from_array(np.clip(np.rint(table * 20), -127, 127).astype(np.int8), "table_q"),
                  nh.from_array(np.array(0.05, np.float32), "s")]
        nodes.insert(0, oh.make_node("DequantizeLinear", ["table_q", "s"], ["table"]))
    else:
        inits.append(nh.from_array(table, "table"))
    graph = oh.make_graph(nodes, "m", [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
                                       oh.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["batch", "sequence"])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), path)
    return path


def test_the_report_times_each_length_profiles_and_flags_a_slower_model(tmp_path, monkeypatch):
    latency = importlib.import_module("edgeq.validate.latency")

    models = {"float.onnx": _model(tmp_path / "f.onnx", 64, False), "q.onnx": _model(tmp_path / "q.onnx", 64, True)}
    feed = {"input_ids": np.array([[5, 6, 7, 8]]), "mask": np.ones((1, 4), np.int64)}
    timed = []

    def fake_latency(models, feed, **kw):  # timings are not asserted: q is "slower" at 16 tokens only
        timed.append(feed["input_ids"].shape[1])
        q_ms = 2.0 if feed["input_ids"].shape[1] == 16 else 0.5
        return {"float.onnx": {"median_ms": 1.0, "runs": 3}, "q.onnx": {"median_ms": q_ms, "runs": 3}}

    monkeypatch.setattr(latency, "host_latency", fake_latency)
    rep = latency_report(models, feed, SPECS, lengths=(16, 64))
    assert timed == [4, 16, 64]
    assert [m["shape"] for m in rep["shapes"]] == ["the evaluation feed", "sequence=16", "sequence=64"]
    assert rep["shapes"][2]["feed_shapes"]["input_ids"] == [1, 64]
    assert set(rep["models"]) == set(models) and rep["reference"] == "float.onnx"
    assert "DequantizeLinear" in rep["profiles"]["q.onnx"]["ops"]
    # flagged with where its time goes (the real profile: the whole table dequantized on every run)
    assert [(s["model"], s["shape"], s["speedup"]) for s in rep["slower"]] == [("q.onnx", "sequence=16", 0.5)]
    assert rep["slower"][0]["where"].startswith("DequantizeLinear")


def test_a_length_the_float_model_cannot_run_is_skipped_with_the_reason(tmp_path):
    # silero-vad op15 has one sequence axis (audio samples) and a reflect Pad of 64: at 16 samples
    # neither model runs; the evaluation feed's length is timed, 16 is listed as skipped
    graph = oh.make_graph([oh.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], "pad",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence"])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [nh.from_array(np.array([0, 0, 0, 64], np.int64), "pads")])
    path = tmp_path / "pad.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), path)
    specs = [TensorSpec("x", ("batch", "sequence"), "float32")]
    feed = {"x": np.zeros((1, 512), np.float32)}
    rep = latency_report({"float.onnx": path, "q.onnx": path}, feed, specs, lengths=(16, 128), profile=False)
    assert [m["shape"] for m in rep["shapes"]] == ["the evaluation feed", "sequence=128"]
    assert [s["shape"] for s in rep["skipped"]] == ["sequence=16"]
    assert "does not run at this length" in rep["skipped"][0]["reason"] and "Pad" in rep["skipped"][0]["reason"]
