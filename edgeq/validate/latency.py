"""Host latency of models in ONNX Runtime CPU, measured side by side (interleaved runs, medians).

The host is not a phone: the numbers compare models (quantized vs float) under the same
conditions, they do not predict device latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeq.specs import TensorSpec


def batch_of_one(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """``feed`` cut to one sample along each input's batch axis.

    The batch axis is the one named like the first input's first dynamic axis (``batch``, or any
    name the model uses), wherever it sits (e.g. silero-vad's ``state`` is ``[2, batch, 128]``);
    inputs without that axis are kept whole.
    """
    batch = next((d for s in specs for d in s.shape[:1] if isinstance(d, str)), None)
    out = {}
    for s in specs:
        if s.name not in feed:
            continue
        v = np.asarray(feed[s.name])
        axis = next((i for i, d in enumerate(s.shape) if d == batch), None) if batch else None
        if axis is not None and axis < v.ndim and v.shape[axis] > 1:
            v = np.take(v, [0], axis=axis)
        out[s.name] = v
    return out


SEQUENCE_LENGTHS = (16, 64, 128)  # a text model is also timed at these lengths (short sentences first)


def sequence_axis(specs: Sequence[TensorSpec]) -> str | None:
    """The one named dynamic axis besides the batch axis that the inputs share (a text model's
    sequence); None when there is none, or several (the lengths to try would be a guess)."""
    batch = next((d for s in specs for d in s.shape[:1] if isinstance(d, str)), None)
    names = {d for s in specs for d in s.shape if isinstance(d, str) and d != batch}
    return names.pop() if len(names) == 1 else None


def at_length(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], axis: str, length: int
              ) -> dict[str, np.ndarray]:
    """``feed`` with every input's ``axis`` made ``length`` long (the values repeated or cut): a
    timing feed of that length with the real feed's tokens and mask pattern."""
    out = {}
    for s in specs:
        if s.name not in feed:
            continue
        v = np.asarray(feed[s.name])
        if axis in s.shape and v.shape[s.shape.index(axis)] > 0:
            i = s.shape.index(axis)
            reps = -(-length // v.shape[i])
            v = np.take(np.concatenate([v] * reps, axis=i), np.arange(length), axis=i)
        out[s.name] = v
    return out


def op_profile(path: Path, feed: Mapping[str, np.ndarray], *, runs: int = 10, warmup: int = 2) -> dict:
    """Per-op-type kernel time of ``path`` on ``feed`` from ONNX Runtime's profiler (see :func:`summarize`)."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from edgeq.runtime import ort_session

    with tempfile.TemporaryDirectory(prefix="edgeq-prof-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort_session(path, options=so)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        for _ in range(warmup + runs):
            sess.run(None, f)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    return summarize(events, runs)


def summarize(events: list[dict], runs: int, *, nodes: bool = False) -> dict:
    """Per-op-type times over the last ``runs`` ``model_run`` windows of an ORT profile trace.

    The trace has one ``model_run`` event per ``run()`` and one ``*_kernel_time`` event per node
    execution, with the node's op type in ``args.op_name``. Each node's time is its fastest
    execution over the runs (and a run's time the median ``model_run``): on a shared machine a
    preempted kernel is inflated by the time the other process ran, so neither the mean nor the
    median is the kernel's own time; the minimum is the least disturbed execution of the same work.
    Returns ``{"runs", "run_ms", "kernel_ms", "overhead_ms", "ops": {op type: {"ms", "count"}}}``
    (ops by time, descending; ``count``: nodes of that type executed per run) and, with
    ``nodes=True``, ``"nodes": {node name: {"op", "ms"}}``.
    """
    from collections import defaultdict

    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    if not windows:
        raise ValueError("the ORT profile has no model_run events")
    start = windows[0][0]
    per_node: dict[str, list] = {}  # node name -> [op type, [duration per execution]]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node.setdefault(name, [e.get("args", {}).get("op_name", "?"), []])[1].append(e["dur"])
    n = len(windows)
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    node_ms = {}
    for name, (op, durs) in per_node.items():
        per_run = max(1, round(len(durs) / n))  # a node inside a loop body may run more than once
        ms = min(durs) * per_run / 1e3
        node_ms[name] = (op, ms)
        by_op[op] += ms
        count[op] += per_run
    run_ms = statistics.median(b - a for a, b in windows) / 1e3
    kernel_ms = sum(by_op.values())
    out = {
        "runs": n,
        "run_ms": run_ms,
        "kernel_ms": kernel_ms,
        "overhead_ms": run_ms - kernel_ms,
        "ops": {op: {"ms": t, "count": count[op]} for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }
    if nodes:
        out["nodes"] = {k: {"op": op, "ms": ms} for k, (op, ms) in sorted(node_ms.items(), key=lambda kv: -kv[1][1])}
    return out


def top_ops(prof: dict, k: int = 4) -> str:
    """``"MatMul 1.23 ms (40%), Gather 0.50 ms (16%), ..."``: where a run's time goes."""
    total = prof["kernel_ms"] or float("nan")
    return ", ".join(f"{op} {v['ms']:.2f} ms ({100 * v['ms'] / total:.0f}%)" for op, v in list(prof["ops"].items())[:k])


def latency_report(models: Mapping[str, Path], feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *,
                   lengths: Sequence[int] = SEQUENCE_LENGTHS, profile: bool = True) -> dict:
    """Batch-1 latency of ``models`` (the first is the float reference) at the shapes users run.

    ``feed`` (one sample) first; a text model (one shared sequence axis) also at ``lengths``, except
    a length the float model does not run (listed in ``skipped`` with the reason). Each
    model is profiled at the fed shape (top op types). A quantized model slower than float at a
    shape is listed in ``slower`` with where its time goes.
    """
    shapes = [("the evaluation feed", dict(feed))]
    axis = sequence_axis(specs)
    if axis is not None:
        shapes += [(f"{axis}={n}", at_length(feed, specs, axis, n)) for n in lengths]
    measured, skipped = [], []
    for name, f in shapes:
        if f is not shapes[0][1]:
            why = _float_fails(next(iter(models.values())), f)
            if why is not None:  # not a text model after all (audio too short for its window): said, not fatal
                skipped.append({"shape": name, "reason": f"the float model does not run at this length: {why}"})
                continue
        measured.append({"shape": name, "feed_shapes": {k: list(v.shape) for k, v in f.items()},
                         "models": host_latency(models, f, runs=20 if f is shapes[0][1] else 10,
                                                budget_s=6.0 if f is shapes[0][1] else 3.0)})
    profiles = {}
    if profile:
        for label, path in models.items():
            try:
                profiles[label] = op_profile(path, feed)
            except Exception as e:  # the profile explains a number; its absence is said, not fatal
                from edgeq.errors import first_line

                profiles[label] = {"error": first_line(e)}
    reference = next(iter(models))
    slower = []
    for m in measured:
        base = m["models"][reference]["median_ms"]
        for label, v in list(m["models"].items())[1:]:
            ratio = base / v["median_ms"]
            if ratio < 1.0:
                prof = profiles.get(label, {})
                where = top_ops(prof) if "ops" in prof else "no profile"
                slower.append({"model": label, "shape": m["shape"], "speedup": ratio, "where": where})
    return {"threads": "ONNX Runtime default", "reference": reference, "shapes": measured,
            "feed_shapes": measured[0]["feed_shapes"], "models": measured[0]["models"],
            "profiles": profiles, "slower": slower, "skipped": skipped}


def _float_fails(path: Path, feed: Mapping[str, np.ndarray]) -> str | None:
    """Why the float model fails on ``feed`` (one line), or None when it runs. A length made up for a
    text model can be too short for a model with a sequence axis that is not text (silero-vad's
    audio: a reflect Pad of 64 samples and a 256-sample window); a quantized model failing where
    the float one runs is still an error of the latency stage."""
    from edgeq.errors import first_line
    from edgeq.runtime import ort_session

    try:
        ort_session(path).run(None, dict(feed))
    except Exception as e:
        return first_line(e)
    return None


def host_latency(models: Mapping[str, Path], feed: Mapping[str, np.ndarray], *, runs: int = 20,
                 budget_s: float = 6.0, threads: int | None = None) -> dict[str, dict]:
    """Median latency (ms) of each model on ``feed``, runs interleaved across models.

    ``threads``: ONNX Runtime's intra-op threads (None: its default). ``.ort`` files load as ORT format.
    """
    from edgeq.runtime import ort_session

    sessions = {label: ort_session(path, threads=threads) for label, path in models.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm up
        s.run(None, dict(feed))
    t_end = time.perf_counter() + budget_s
    for i in range(runs):
        for label, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, dict(feed))
            times[label].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return {k: {"median_ms": statistics.median(v), "runs": len(v)} for k, v in times.items()}


def causal_lm_latency(models: Mapping[str, Path], prompt: Sequence[int], *, decode_tokens: int = 16,
                      rounds: int = 5, budget_s: float = 20.0) -> dict[str, dict]:
    """Prefill and per-token decode latency of causal LMs (the explicit-cache graph), batch 1.

    Each round prefills ``prompt`` with an empty cache and then decodes ``decode_tokens`` greedy
    tokens one at a time (the shape a phone runs); rounds alternate between the models. Returns
    per model the median decode step (``median_ms``, per token), the median prefill, and the rates.
    ONNX Runtime runs with its default session options (threads, spinning), as an app's session does.
    """
    from edgeq.generate import CausalLM
    from edgeq.runtime import ort_session
    from edgeq.validate.runners import SessionRunner, session_input_spec

    def runner(label: str, path: Path) -> SessionRunner:
        sess = ort_session(path)
        return SessionRunner(label, sess, [session_input_spec(i) for i in sess.get_inputs()])

    lms = {label: CausalLM(runner(label, Path(path))) for label, path in models.items()}
    prefill: dict[str, list[float]] = {k: [] for k in lms}
    decode: dict[str, list[float]] = {k: [] for k in lms}

    def one_round(label: str, lm) -> None:
        t0 = time.perf_counter()
        logits, past = lm.step(prompt, lm.empty_cache())
        prefill[label].append((time.perf_counter() - t0) * 1e3)
        for _ in range(decode_tokens):
            token = int(np.argmax(logits[-1]))
            t0 = time.perf_counter()
            logits, past = lm.step([token], past)
            decode[label].append((time.perf_counter() - t0) * 1e3)

    for label, lm in lms.items():  # warm up
        lm.step(prompt, lm.empty_cache())
    t_end = time.perf_counter() + budget_s
    for i in range(rounds):
        for label, lm in lms.items():
            one_round(label, lm)
        if i >= 1 and time.perf_counter() > t_end:
            break
    out = {}
    for label in lms:
        step, pre = statistics.median(decode[label]), statistics.median(prefill[label])
        out[label] = {"median_ms": step, "runs": len(decode[label]), "decode_tokens_per_s": 1e3 / step,
                      "prefill_ms": pre, "prefill_tokens": len(prompt), "prefill_tokens_per_s": len(prompt) * 1e3 / pre}
    return out
