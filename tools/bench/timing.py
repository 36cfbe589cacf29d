"""Batch-1 latency in ONNX Runtime CPU: sessions, interleaved timing, per-op-type profiles.

Shared by ``tools/bench_latency.py`` and one-off prototype scripts. A session is made the same
way for every model of a comparison (ORT_ENABLE_ALL, sequential executor, one inter-op thread,
``threads`` intra-op threads or ORT's default). ``.ort`` files are loaded as ORT format. Times
are taken interleaved across models (a, b, c, a, b, c, ...) so load from other work on a
shared machine hits all of them alike: read the ratio of medians, not the milliseconds.

The profile comes from ORT's own profiler (``SessionOptions.enable_profiling``): its JSON has one
``model_run`` event per ``run()`` and one ``*_kernel_time`` event per node execution, with the
node's op type in ``args.op_name``. Only kernels inside the last ``runs`` ``model_run`` windows
count (the warm-up runs are dropped); each node counts with its fastest execution (see
:func:`summarize`). ``overhead`` is a run's median wall time not spent in kernels (the executor,
allocations, copies), meaningful only on an idle machine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeq.validate.latency import summarize  # one parser of ORT's profile traces


def session(path: str | Path, threads: int | None, *, profile_prefix: str | None = None,
            config: Mapping[str, str] | None = None):
    """An ORT CPU session for ``path``; ``threads=None`` leaves ORT's default intra-op pool."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    if Path(path).suffix == ".ort":
        so.add_session_config_entry("session.load_model_format", "ORT")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(sessions: Mapping[str, object], feed: Mapping[str, np.ndarray], *, runs: int, warmup: int = 3,
                budget_s: float | None = None) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per run of each session, runs interleaved across sessions (a, b, c, a, b, c, ...).

    Per session: ``wall`` (elapsed) and ``cpu`` (CPU time of the calling thread). With one intra-op
    thread ORT computes on the calling thread, so ``cpu`` is the model's own compute time, nearly
    untouched by other processes competing for the cores; with more threads it misses the pool's
    work and only ``wall`` means anything. The order rotates each round so no model always runs
    right after the same other one. ``budget_s`` stops early (after at least 5 rounds).
    """
    labels = list(sessions)
    feeds = {k: _feed_for(s, feed) for k, s in sessions.items()}
    for _ in range(warmup):
        for k in labels:
            sessions[k].run(None, feeds[k])
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in labels}
    t_end = None if budget_s is None else time.perf_counter() + budget_s
    for i in range(runs):
        order = labels[i % len(labels):] + labels[: i % len(labels)]
        for k in order:
            c0, t0 = time.thread_time(), time.perf_counter()
            sessions[k].run(None, feeds[k])
            t1, c1 = time.perf_counter(), time.thread_time()
            times[k]["wall"].append((t1 - t0) * 1e3)
            times[k]["cpu"].append((c1 - c0) * 1e3)
        if t_end is not None and i >= 4 and time.perf_counter() > t_end:
            break
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _feed_for(sess, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def profile(path: str | Path, feed: Mapping[str, np.ndarray], threads: int | None, *, runs: int = 20,
            warmup: int = 3, config: Mapping[str, str] | None = None, nodes: bool = False) -> dict:
    """Per-op-type time of ``path`` from ORT's profiler: ms per run (per-node minimum over ``runs`` runs).

    Returns ``{"run_ms", "kernel_ms", "overhead_ms", "ops": {op type: {"ms", "count"}}}`` (ops by
    time, descending; ``count`` is nodes of that type executed per run) and, with ``nodes=True``,
    ``"nodes": {node name: {"op", "ms"}}``.
    """
    with tempfile.TemporaryDirectory(prefix="edgeq-prof-") as tmp:
        sess = session(path, threads, profile_prefix=os.path.join(tmp, "p"), config=config)
        f = _feed_for(sess, feed)
        for _ in range(warmup + runs):
            sess.run(None, f)
        trace = sess.end_profiling()
        with open(trace) as fh:
            events = json.load(fh)
    return summarize(events, runs, nodes=nodes)


def top_ops(prof: dict, k: int = 5) -> str:
    """``"MatMul 1.23 (40%), Gather 0.50 (16%), ..."`` for a table cell."""
    total = prof["run_ms"] or float("nan")
    parts = [f"{op} {v['ms']:.2f} ({100 * v['ms'] / total:.0f}%)" for op, v in list(prof["ops"].items())[:k]]
    return ", ".join(parts)
