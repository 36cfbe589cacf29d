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
