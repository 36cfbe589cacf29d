"""tools/bench/timing.py: interleaved timing and the ORT-profile parser, on a tiny inline model."""

import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_onnx, mlp_text, optimized_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench import timing  # noqa: E402


def _event(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def test_summarize_drops_warmup_and_takes_each_nodes_fastest_run():
    events = [
        _run(0, 1000), _event("mm", "MatMul", 10, 900),  # warm-up run: not counted
        _run(2000, 300), _event("mm", "MatMul", 2010, 200), _event("add", "Add", 2210, 50),
        _run(3000, 900), _event("mm", "MatMul", 3010, 800), _event("add", "Add", 3810, 60),  # preempted
        _run(4000, 320), _event("mm", "MatMul", 4010, 210), _event("add", "Add", 4230, 40),
    ]
    p = timing.summarize(events, runs=3, nodes=True)
    assert p["runs"] == 3
    assert p["ops"]["MatMul"] == {"ms": pytest.approx(0.200), "count": 1}
    assert p["ops"]["Add"] == {"ms": pytest.approx(0.040), "count": 1}
    assert list(p["ops"]) == ["MatMul", "Add"]  # by time
    assert p["run_ms"] == pytest.approx(0.320)  # median model_run
    assert p["kernel_ms"] == pytest.approx(0.240)
    assert p["nodes"]["add"] == {"op": "Add", "ms": pytest.approx(0.040)}


def test_summarize_without_runs_is_an_error():
    with pytest.raises(ValueError, match="model_run"):
        timing.summarize([_event("mm", "MatMul", 0, 1)], runs=1)


def test_interleaved_and_profile_on_a_real_session(tmp_path):
    path = make_onnx(mlp_text(), tmp_path / "mlp.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32), "unused": np.zeros(1)}
    sessions = {"a": timing.session(path, 1), "b": timing.session(path, None)}
    t = timing.interleaved(sessions, feed, runs=5, warmup=1)
    assert set(t) == {"a", "b"}
    assert all(len(v["wall"]) == 5 and len(v["cpu"]) == 5 for v in t.values())
    assert all(w > 0 for v in t.values() for w in v["wall"])

    p = timing.profile(path, feed, 1, runs=4, warmup=1)
    assert p["runs"] == 4
    ran = optimized_ops(path, tmp_path)  # the nodes of the graph ORT runs, one kernel each per run
    assert {op: v["count"] for op, v in p["ops"].items()} == {op: ran.count(op) for op in set(ran)}
    assert p["kernel_ms"] == pytest.approx(sum(v["ms"] for v in p["ops"].values()))
    assert all(v["ms"] > 0 for v in p["ops"].values())
    assert timing.top_ops(p, k=1).startswith(next(iter(p["ops"])))
