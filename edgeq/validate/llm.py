"""Validation of a causal LM against its float reference, like llama.cpp's perplexity tool does.

On evaluation texts (each fed from position 0 with an empty cache, teacher-forced in one pass):

- perplexity of each model: ``exp(mean NLL)`` of every token after the first of each text;
- mean KL divergence ``KL(P_ref ‖ P_cand)`` of the next-token distributions (and its 99th
  percentile and maximum, where rare large errors show);
- top-1 agreement: the fraction of positions where both models' most likely next token is the same;
- logits SQNR and cosine (the generic statistics);

and on a few prompts, greedy generation agreement: each model generates greedily with its own
cache, and the candidate's tokens are compared with the reference's up to the first divergence
(``greedy_agreement`` = reproduced reference tokens / reference tokens). Where a candidate diverges,
both models score the same prefix (teacher-forced) and the row records the reference's margin
between its token and the candidate's: a divergence is *within noise* when that margin is at most
the largest error the candidate made on the reference's top-2 margin over the teacher-forced texts
(``top2_margin_error_max``; its RMS is reported too): a gap the candidate's own precision (e.g.
fp16) has been seen to move, so a near-tie it can flip, not a fault (``greedy_within_noise``
counts prompts equal or diverging so).

Any runner of the explicit-cache graph works: the float or QDQ ONNX in ONNX Runtime, the ``.ort``,
the torch step module of a sample; and a stateful ``.mlpackage`` (its cache as Core ML state) in
edgeq's reference executor, the state carried from step to step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeq.errors import InputError
from edgeq.export.causal_lm import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, is_causal_lm_io
from edgeq.generate import CausalLM, is_stateful
from edgeq.validate.compare import CandidateResult, ValidationReport
from edgeq.validate.feeds import shapes_seen
from edgeq.validate.metrics import TensorStats
from edgeq.validate.runners import Runner

DEFAULT_NEW_TOKENS = 32


@dataclass(frozen=True)
class LLMThresholds:
    """Gates for a causal LM; None = not checked."""

    max_perplexity_ratio: float | None = None  # candidate perplexity / reference perplexity
    max_kld: float | None = None  # mean KL divergence (nats)
    min_top1_agreement: float | None = None
    min_greedy_agreement: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def is_causal_lm_runner(runner: Runner) -> bool:
    """The explicit-cache graph, or a package keeping that graph's cache as state (iOS 18)."""
    specs = runner.input_specs
    if specs is None:
        return False
    names = [s.name for s in specs]
    if is_stateful(runner):
        return {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} <= set(names) and LOGITS in (runner.output_names or [])
    return is_causal_lm_io(names, runner.output_names or [])


def sequences_from_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[int]]:
    """Token sequences out of graph feeds; each must start at position 0 with an empty cache."""
    out = []
    for i, feed in enumerate(feeds):
        ids, mask, pos = feed[INPUT_IDS], feed[ATTENTION_MASK], feed[POSITION_IDS]
        past = [v for k, v in feed.items() if k.startswith("past_key_values.")]
        if any(p.shape[2] for p in past) or ids.shape != mask.shape or (pos.size and pos[:, 0].any()):
            raise InputError(f"evaluation feed {i} does not start a text (empty cache, position 0)",
                             hint="LLM metrics need whole texts from their first token")
        for row, m in zip(ids, mask):
            keep = row[m.astype(bool)]
            if keep.size != m.sum() or (m.sum() < m.size and m[: m.sum()].min() == 0):
                raise InputError(f"evaluation feed {i}: only right padding is supported")
            if keep.size >= 2:
                out.append([int(t) for t in keep])
    if not out:
        raise InputError("no evaluation text has two tokens or more", hint="give longer texts")
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class _TextStats:
    nll: float = 0.0
    tokens: int = 0
    agree: int = 0

    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.tokens)) if self.tokens else float("nan")


def perplexity(lm: CausalLM, sequences: Sequence[Sequence[int]]) -> float:
    """``exp(mean NLL)`` over every token after the first of each sequence (teacher-forced)."""
    st = _TextStats()
    for ids in sequences:
        logp = _log_softmax(lm.logits(ids)[:-1])
        st.nll -= float(logp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum())
        st.tokens += len(ids) - 1
    return st.perplexity()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def validate_causal_lm(
    reference: Runner,
    candidates: Sequence[Runner],
    sequences: Sequence[Sequence[int]],
    *,
    prompts: Sequence[Sequence[int]] = (),
    prompt_texts: Sequence[str] | None = None,
    tokenizer=None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    stop_ids: Sequence[int] | None = None,
    thresholds: LLMThresholds = LLMThresholds(),
    data_desc: str = "",
    progress: bool = True,
) -> ValidationReport:
    """Compare candidates with the reference on teacher-forced texts and greedy generations.

    Generation stops at ``stop_ids`` for every model alike (default: the end-of-sequence ids any
    of the models or the tokenizer declares; a torch reference declares none).
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise InputError("no candidate to validate", hint="give at least one candidate model")
    ref = CausalLM(reference)
    cands = [CausalLM(c) for c in candidates]
    if stop_ids is None:
        stop = {t for lm in (ref, *cands) for t in lm.eos_token_ids}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stop.add(int(tokenizer.eos_token_id))
        stop_ids = sorted(stop)
    ref_st = _TextStats()
    cand_st = [_TextStats() for _ in cands]
    klds: list[list[np.ndarray]] = [[] for _ in cands]
    logit_stats = [TensorStats(keep_cosines=False) for _ in cands]
    gap_err = [[0.0, 0, 0.0] for _ in cands]  # the candidate's error on the reference's top-2 margin: sum of squares, count, max
    seconds = [0.0] * len(cands)
    for ids in tqdm(sequences, desc="perplexity", unit="text", disable=not progress or None, leave=False):
        target = np.asarray(ids[1:])
        rows = np.arange(len(ids) - 1)
        r_logits = ref.logits(ids)[:-1]
        r_logp = _log_softmax(r_logits)
        ref_st.nll -= float(r_logp[rows, target].sum())
        ref_st.tokens += len(rows)
        r_top = r_logp.argmax(axis=-1)
        r_two = np.argsort(r_logits, axis=-1)[:, -2:]  # second best, best
        r_p = np.exp(r_logp)
        for i, c in enumerate(cands):
            t0 = time.perf_counter()
            c_logits = c.logits(ids)[:-1]
            seconds[i] += time.perf_counter() - t0
            c_logp = _log_softmax(c_logits)
            cand_st[i].nll -= float(c_logp[rows, target].sum())
            cand_st[i].tokens += len(rows)
            cand_st[i].agree += int((c_logp.argmax(axis=-1) == r_top).sum())
            klds[i].append(np.maximum((r_p * (r_logp - c_logp)).sum(axis=-1), 0.0))
            logit_stats[i].update(r_logits, c_logits)
            gap_r = np.diff(np.take_along_axis(r_logits.astype(np.float64), r_two, axis=-1), axis=-1)
            gap_c = np.diff(np.take_along_axis(c_logits.astype(np.float64), r_two, axis=-1), axis=-1)
            err = np.abs(gap_c - gap_r)
            gap_err[i][0] += float((err**2).sum())
            gap_err[i][1] += err.size
            gap_err[i][2] = max(gap_err[i][2], float(err.max(initial=0.0)))

    ref_runs = [ref.generate(p, max_new_tokens, stop_ids=stop_ids).tokens for p in prompts]
    ref_ppl = ref_st.perplexity()
    results = []
    for i, c in enumerate(cands):
        kld = np.concatenate(klds[i])
        rms = float(np.sqrt(gap_err[i][0] / max(1, gap_err[i][1])))
        noise = gap_err[i][2]
        greedy = []
        for k, (p, want) in enumerate(zip(prompts, ref_runs)):
            t0 = time.perf_counter()
            got = c.generate(p, max_new_tokens, stop_ids=stop_ids).tokens
            seconds[i] += time.perf_counter() - t0
            row = {"prompt": prompt_texts[k] if prompt_texts else list(map(int, p)),
                   "prefix": common_prefix(want, got), "reference_tokens": len(want), "candidate_tokens": len(got),
                   "equal": want == got}
            if want != got and row["prefix"] < min(len(want), len(got)):
                row["divergence"] = _divergence(ref, c, list(p) + want[: row["prefix"]], want[row["prefix"]],
                                                got[row["prefix"]], noise)
            if tokenizer is not None:
                row["reference_text"] = tokenizer.decode(want, skip_special_tokens=True)
                row["candidate_text"] = tokenizer.decode(got, skip_special_tokens=True)
            greedy.append(row)
        ppl = cand_st[i].perplexity()
        metrics = {
            "perplexity": ppl, "reference_perplexity": ref_ppl, "perplexity_ratio": ppl / ref_ppl,
            "kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
            "top1_agreement": cand_st[i].agree / cand_st[i].tokens, "texts": len(sequences),
            "tokens": cand_st[i].tokens,
        }
        if greedy:
            metrics["greedy_agreement"] = sum(g["prefix"] for g in greedy) / max(1, sum(
                g["reference_tokens"] for g in greedy))
            metrics["greedy_equal"] = sum(g["equal"] for g in greedy)
            metrics["greedy_prompts"] = len(greedy)
            metrics["greedy_within_noise"] = sum(g["equal"] or g.get("divergence", {}).get("within_noise", False)
                                                 for g in greedy)
            metrics["top2_margin_error_rms"] = rms
            metrics["top2_margin_error_max"] = float(noise)
            metrics["greedy"] = greedy
        res = CandidateResult(c.runner.describe(), {"logits": logit_stats[i].summary()}, metrics, [],
                              seconds=seconds[i])
        res.checks = _checks(metrics, thresholds)
        results.append(res)
    data = {"source": data_desc, "feeds": len(sequences), "tokens": ref_st.tokens,
            "input_shapes": shapes_seen({INPUT_IDS: np.zeros((1, len(s)))} for s in sequences),
            "prompts": len(prompts), "max_new_tokens": max_new_tokens, "stop_ids": list(stop_ids)}
    return ValidationReport(reference.describe(), data, "causal_lm", thresholds, results)


def _divergence(ref: CausalLM, cand: CausalLM, context: list[int], want: int, got: int, noise: float) -> dict:
    """Both models' scores after ``context`` (teacher-forced) where the candidate chose ``got``, the
    reference ``want``: the reference's margin between the two, and whether it is within ``noise``."""
    r = ref.logits(context)[-1]
    c = cand.logits(context)[-1]
    margin = float(r[want] - r[got])
    return {"reference_margin": margin, "candidate_margin": float(c[got] - c[want]),
            "reference_top2_gap": float(np.diff(np.sort(r)[-2:])[0]), "noise": float(noise),
            "within_noise": bool(margin <= noise)}


def _checks(m: Mapping, th: LLMThresholds) -> list[dict]:
    checks = []

    def add(name: str, limit: float | None, op: str) -> None:
        if limit is None:
            return
        value = m.get(name)
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        checks.append({"check": name, "value": value, "threshold": limit, "op": op, "passed": bool(ok)})

    add("perplexity_ratio", th.max_perplexity_ratio, "<=")
    add("kld_mean", th.max_kld, "<=")
    add("top1_agreement", th.min_top1_agreement, ">=")
    add("greedy_agreement", th.min_greedy_agreement, ">=")
    return checks


def format_llm_report(report: ValidationReport) -> str:
    """The LLM metrics as a table, the greedy generations side by side, and the gates."""
    ref_ppl = next((c.task["reference_perplexity"] for c in report.candidates), float("nan"))
    d = report.data
    lines = [f"reference: {report.reference['label']} ({report.reference['kind']}), perplexity {ref_ppl:.3f}",
             (f"data: {d['source']}: {d['feeds']} texts, {d['tokens']} predicted tokens; "
              f"greedy: {d['prompts']} prompts x {d['max_new_tokens']} tokens"), ""]
    header = (f"{'candidate':<30} {'perplexity':>10} {'ratio':>7} {'KLD mean':>9} {'KLD p99':>8} {'top-1':>7} "
              f"{'greedy':>7} {'logit SQNR':>10}")
    lines += [header, "-" * len(header)]
    for c in report.candidates:
        t = c.task
        greedy = f"{t['greedy_agreement']:.3f}" if "greedy_agreement" in t else "-"
        lines.append(f"{c.runner['label'][:30]:<30} {t['perplexity']:>10.3f} {t['perplexity_ratio']:>7.4f} "
                     f"{t['kld_mean']:>9.5f} {t['kld_p99']:>8.4f} {t['top1_agreement']:>7.4f} {greedy:>7} "
                     f"{c.outputs['logits']['sqnr_db']:>9.1f}")
    for c in report.candidates:
        for g in c.task.get("greedy", []):
            mark = "same" if g["equal"] else f"diverges after {g['prefix']} of {g['reference_tokens']} tokens"
            if "divergence" in g:
                d = g["divergence"]
                mark += (f" (reference margin {d['reference_margin']:.3f} "
                         f"{'<=' if d['within_noise'] else '>'} noise {d['noise']:.3f})")
            lines.append(f"{c.runner['label']}: {g['prompt']!r}: {mark}")
            if "candidate_text" in g:
                lines.append(f"    reference: {g['reference_text']!r}")
                if not g["equal"]:
                    lines.append(f"    candidate: {g['candidate_text']!r}")
        for chk in c.checks:
            value = "-" if chk["value"] is None else f"{chk['value']:.4g}"
            lines.append(f"{c.runner['label']}: {'pass' if chk['passed'] else 'FAIL'} {chk['check']} = {value} "
                         f"({chk['op']} {chk['threshold']:g})")
    if any(c.checks for c in report.candidates):
        lines.append("result: " + ("PASS" if report.passed else "FAIL"))
    return "\n".join(lines)
