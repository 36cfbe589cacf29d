"""Run a reference and candidates on the same feeds and compare them.

The reference runs once per feed; every candidate is compared with it per output (SQNR,
cosine, max abs error), on the task's own metric (classifier top-k — per position for
``[batch, positions, classes]`` scores —, embedding neighbours), and, when both are ONNX, per
intermediate tensor matched by name.

A recurrent state output (``state_pairs``, see :mod:`edgeq.validate.state`) is judged by what it
carries: every model runs each feed a second time from the state it returned, and the other
outputs of that call (``speech_probs (state carried)``) get the gates; the state's own SQNR and
cosine are reported, not gated, when such an output exists.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeq.errors import InputError
from edgeq.validate.feeds import shapes_seen
from edgeq.validate.metrics import ClassifierStats, EmbeddingStats, TensorStats
from edgeq.validate.runners import IntermediateRunner, Runner, TorchRunner


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail gates. ``min_cosine`` applies to each output's mean per-sample cosine.

    ``min_top1_per_position`` is the top-1 gate of class scores per position (``[batch, positions,
    classes]``); None: ``min_top1_agreement`` applies to them too."""

    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    min_top1_per_position: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class CandidateResult:
    runner: dict
    outputs: dict[str, dict]
    task: dict
    intermediates: list[dict]
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def as_dict(self) -> dict:
        return {
            "model": self.runner,
            "outputs": self.outputs,
            "task": self.task,
            "intermediates": self.intermediates,
            "checks": self.checks,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ValidationReport:
    reference: dict
    data: dict
    task_kind: str
    thresholds: Thresholds
    candidates: list[CandidateResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    def as_dict(self) -> dict:
        from edgeq import __version__

        return {
            "edgeq_version": __version__,
            "reference": self.reference,
            "data": self.data,
            "task": self.task_kind,
            "thresholds": self.thresholds.as_dict(),
            "candidates": [c.as_dict() for c in self.candidates],
            "passed": self.passed,
        }


def _pair_outputs(ref_names: Sequence[str], cand_names: Sequence[str], label: str) -> list[tuple[str, str]]:
    if set(ref_names) == set(cand_names):
        return [(n, n) for n in cand_names]
    if len(ref_names) == len(cand_names):
        return list(zip(ref_names, cand_names))  # same arity, different names: pair by position
    raise InputError(
        f"{label} has {len(cand_names)} outputs ({', '.join(cand_names)}) but the reference has "
        f"{len(ref_names)} ({', '.join(ref_names)})"
    )


def compare(
    reference: Runner,
    candidates: Sequence[Runner],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    data_desc: str = "",
    task: str = "generic",
    thresholds: Thresholds = Thresholds(),
    intermediates: bool = True,
    progress: bool = True,
    state_pairs: Sequence[tuple[str, str]] = (),
) -> ValidationReport:
    """Compare each candidate with the reference on ``feeds`` (already checked).

    ``state_pairs``: ``(input, output)`` names of recurrent states the caller feeds back (see the
    module docstring)."""
    from tqdm.auto import tqdm

    cands = list(candidates)
    if not cands:
        raise InputError("no candidate to validate", hint="give at least one candidate model")
    if isinstance(reference, TorchRunner):
        first = cands[0]
        reference.bind(first.input_specs or [], first.output_names or [])
    ref_outputs = reference.output_names or []

    # Intermediates matched by name, per candidate, when both sides can expose them.
    inter: dict[int, list[str]] = {}
    if intermediates and isinstance(reference, IntermediateRunner):
        ref_vals = set(reference.value_names())
        for i, c in enumerate(cands):
            if isinstance(c, IntermediateRunner):
                inter[i] = [n for n in c.value_names() if n in ref_vals]
    ref_wanted = sorted({n for names in inter.values() for n in names})

    out_stats = [dict() for _ in cands]
    task_stats = [None] * len(cands)
    inter_stats = [{n: TensorStats(keep_cosines=False) for n in inter.get(i, [])} for i in range(len(cands))]
    pairs: list[list[tuple[str, str]] | None] = [None] * len(cands)
    seconds = [0.0] * len(cands)

    states = {o: i for i, o in state_pairs}
    bar = tqdm(feeds, desc="validate", unit="feed", disable=not progress or None, leave=False)
    for feed in bar:
        if ref_wanted:
            ref = reference.run_values(feed, ref_wanted)
        else:
            ref = reference.run(feed)
        if not ref_outputs:
            ref_outputs = [k for k in ref if k not in ref_wanted]
        ref_next = reference.run(carry_state(feed, ref, states)) if states else None
        for i, c in enumerate(cands):
            t0 = time.perf_counter()
            got = c.run_values(feed, inter[i]) if inter.get(i) else c.run(feed)
            seconds[i] += time.perf_counter() - t0
            if pairs[i] is None:
                cand_outputs = c.output_names or [k for k in got if k not in inter.get(i, [])]
                pairs[i] = _pair_outputs(ref_outputs, cand_outputs, c.label)
                for _, cn in pairs[i]:
                    out_stats[i][cn] = TensorStats()
                for rn, cn in pairs[i]:
                    if states and rn not in states:
                        out_stats[i][carried_name(cn)] = TensorStats()
                if task == "classification":
                    task_stats[i] = ClassifierStats()
                elif task == "embedding":
                    task_stats[i] = EmbeddingStats()
            for k, (rn, cn) in enumerate(pairs[i]):
                try:
                    out_stats[i][cn].update(ref[rn], got[cn])
                except ValueError as e:
                    raise InputError(f"{c.label}: output {cn!r}: {e}") from e
                if k == 0 and task_stats[i] is not None:
                    task_stats[i].update(ref[rn], got[cn])
            if states:
                got_next = c.run(carry_state(feed, {rn: got[cn] for rn, cn in pairs[i]}, states))
                for rn, cn in pairs[i]:
                    if rn not in states:
                        out_stats[i][carried_name(cn)].update(ref_next[rn], got_next[cn])
            for n, st in inter_stats[i].items():
                if ref[n].shape == got[n].shape:
                    st.update(ref[n], got[n])

    results = []
    for i, c in enumerate(cands):
        outputs = {n: s.summary() for n, s in out_stats[i].items()}
        state_of = {cn: states[rn] for rn, cn in pairs[i] or [] if rn in states}
        for n, s in outputs.items():
            if n in state_of:
                s["recurrent_state"] = state_of[n]
            elif n.endswith(CARRIED):
                s["state_carried"] = True
        tstats = task_stats[i].summary() if task_stats[i] is not None else {}
        inters = [{"name": n, **s.summary()} for n, s in inter_stats[i].items() if s.elements]
        res = CandidateResult(c.describe(), outputs, tstats, inters, seconds=seconds[i])
        res.checks = _checks(res, thresholds)
        results.append(res)
    data = {"source": data_desc, "feeds": len(feeds), "input_shapes": shapes_seen(feeds)}
    return ValidationReport(reference.describe(), data, task, thresholds, results)


CARRIED = " (state carried)"


def carried_name(output: str) -> str:
    """The name under which ``output`` of the call from the carried state is reported."""
    return output + CARRIED


def carry_state(feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], states: Mapping[str, str]) -> dict:
    """``feed`` with each state input replaced by the state output a model returned for it."""
    nxt = dict(feed)
    for out, inp in states.items():
        v = np.asarray(outputs[out]).astype(np.asarray(feed[inp]).dtype)
        nxt[inp] = v.reshape(np.shape(feed[inp])) if v.size == np.size(feed[inp]) else v
    return nxt


def _checks(res: CandidateResult, th: Thresholds) -> list[dict]:
    checks = []

    def add(name: str, value: float, limit: float) -> None:
        checks.append({"check": name, "value": value, "threshold": limit, "passed": bool(value >= limit)})

    def cannot(name: str, limit: float, note: str, passed: bool) -> None:
        """A gate that cannot be evaluated, with the reason (a failure unless another gate covers it)."""
        checks.append({"check": name, "value": None, "threshold": limit, "passed": passed, "note": note})

    carried = [o for o, s in res.outputs.items() if s.get("state_carried")]
    for out, s in res.outputs.items():
        if s.get("recurrent_state") and carried and (th.min_sqnr_db is not None or th.min_cosine is not None):
            s["gated"] = False
            gate, limit = ("sqnr_db", th.min_sqnr_db) if th.min_sqnr_db is not None else ("cosine_mean", th.min_cosine)
            cannot(f"{out}: {gate}", limit,
                   f"{out} is the state fed back as {s['recurrent_state']!r}: judged by the next call from the state "
                   f"each model returned ({', '.join(carried)}), not on its own (a state moves in directions the "
                   f"model forgets; its SQNR {s['sqnr_db']:.1f} dB is reported)", True)
            continue
        if th.min_sqnr_db is not None:
            add(f"{out}: sqnr_db", s["sqnr_db"], th.min_sqnr_db)
        if th.min_cosine is not None:
            if "cosine_mean" in s:
                add(f"{out}: cosine_mean", s["cosine_mean"], th.min_cosine)
            elif s.get("one_value_per_sample"):
                covered = th.min_sqnr_db is not None
                cannot(f"{out}: cosine_mean", th.min_cosine,
                       "cosine cannot see errors in one value per sample" + (
                           "; the SQNR floor applies" if covered else ": give --min-sqnr"), covered)
    if res.task.get("per_position") and "top1_agreement" in res.task:
        limit = th.min_top1_per_position if th.min_top1_per_position is not None else th.min_top1_agreement
        if limit is not None:
            add("top1_agreement (per position)", res.task["top1_agreement"], limit)
    elif th.min_top1_agreement is not None:
        if "top1_agreement" not in res.task:
            cannot("top1_agreement", th.min_top1_agreement, "not measured: the task is not classification "
                   "(pass --task classification if the first output holds class scores)", False)
        else:
            add("top1_agreement", res.task["top1_agreement"], th.min_top1_agreement)
    return checks
