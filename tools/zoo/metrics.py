"""Each zoo model's natural fidelity metric, quantized against float, on the evaluation data.

A metric gets ``float_run`` and ``cand_run`` (feed dict → output dict, by output name), the
evaluation feeds and the model's extra evaluation data (labels, audio streams), and returns a
dict: ``headline`` (the table's one cell), ``ok`` (None, or whether the value meets the metric's
bar), and the numbers behind it.
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(ref, cand) -> float:
    ref = np.asarray(ref, np.float64)
    err = ref - np.asarray(cand, np.float64)
    s, n = float((ref * ref).sum()), float((err * err).sum())
    if not math.isfinite(n):
        return float("nan")
    return float("inf") if n == 0 else 10 * math.log10(max(s, 1e-300) / n)


def cosine_rows(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def _collect(run, feeds, names=None) -> dict[str, np.ndarray]:
    """Run every feed and concatenate each output along axis 0."""
    outs: dict[str, list] = {}
    for feed in feeds:
        res = run({k: v for k, v in feed.items() if not k.startswith("__")})
        for k, v in res.items():
            if names is None or k in names:
                outs.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v, axis=0) if v[0].ndim else np.stack(v) for k, v in outs.items()}


def _sqnrs(ref: dict, cand: dict) -> dict[str, float]:
    return {k: round(sqnr_db(ref[k], cand[k]), 2) for k in ref if k in cand}


# ---- metrics ---------------------------------------------------------------------------------

CONFIDENT_MARGIN = 0.05  # float top-1 minus top-2 probability (softmax of the output)


def top1(output: str, *, labels: str | None = None):
    """Top-1 agreement of ``output``'s argmax (and, with labels, both models' accuracy)."""
    def metric(float_run, cand_run, feeds, extra) -> dict:
        ref, cand = _collect(float_run, feeds), _collect(cand_run, feeds)
        a, b = ref[output].argmax(-1), cand[output].argmax(-1)
        agree = float((a == b).mean())
        # where the float model itself is at a near-tie (its top two classes within CONFIDENT_MARGIN
        # in probability) any perturbation flips top-1: agreement is also given on the other samples
        logits = ref[output].astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = np.sort(p / p.sum(-1, keepdims=True), -1)
        sure = (p[..., -1] - p[..., -2]) >= CONFIDENT_MARGIN
        sure_agree = float((a == b)[sure].mean()) if sure.any() else float("nan")
        out = {"top1_agreement": agree, "samples": int(a.size), "sqnr_db": _sqnrs(ref, cand),
               "confident_samples": int(sure.sum()), "confident_top1_agreement": sure_agree,
               "float_median_top1_prob": float(np.median(p[..., -1])),
               "headline": f"top-1 {100 * agree:.1f}% (n={a.size}; {100 * sure_agree:.1f}% of {int(sure.sum())} "
                           f"with float margin ≥ {CONFIDENT_MARGIN:g})"}
        if labels is not None:
            y = extra[labels]
            out["float_accuracy"], out["quant_accuracy"] = float((a == y).mean()), float((b == y).mean())
        return out

    return metric


def ctc_text(output: str, decode, *, truth: str = "texts"):
    """Greedy-CTC text of each line: share of lines decoded identically, and the character error
    rate of the quantized text against the float text (and both against the rendered truth)."""
    def metric(float_run, cand_run, feeds, extra) -> dict:
        ft, qt, refs, cands = [], [], [], []
        for feed in feeds:  # per feed: line widths (and so sequence lengths) differ between feeds
            r, c = float_run(feed)[output], np.asarray(cand_run(feed)[output])
            ft += [decode(x) for x in r.argmax(-1)]
            qt += [decode(x) for x in c.argmax(-1)]
            refs.append(r.ravel())
            cands.append(c.ravel())
        same = float(np.mean([f == q for f, q in zip(ft, qt)]))
        cer = _cer(qt, ft)
        out = {"line_agreement": same, "cer_vs_float": cer, "lines": len(ft),
               "sqnr_db": {output: round(sqnr_db(np.concatenate(refs), np.concatenate(cands)), 2)},
               "examples": [[f, q] for f, q in zip(ft, qt) if f != q][:5],
               "headline": f"text {100 * same:.1f}% lines, CER {100 * cer:.2f}%"}
        if truth in extra:
            t = [str(s) for s in extra[truth]]
            out["float_cer_vs_truth"], out["quant_cer_vs_truth"] = _cer(ft, t), _cer(qt, t)
        return out

    return metric


def _edit(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _cer(hyp: list[str], ref: list[str]) -> float:
    return sum(_edit(h, r) for h, r in zip(hyp, ref)) / max(1, sum(len(r) for r in ref))


def face(prob: str = "prob", box: str = "box"):
    """MTCNN: face/non-face decision agreement (prob[:, 1] > 0.5) and the box regression's SQNR."""
    def metric(float_run, cand_run, feeds, extra) -> dict:
        ref, cand = _collect(float_run, feeds), _collect(cand_run, feeds)
        a, b = ref[prob][:, 1] > 0.5, cand[prob][:, 1] > 0.5
        agree = float((a == b).mean())
        s = sqnr_db(ref[box], cand[box])
        return {"decision_agreement": agree, "box_sqnr_db": s, "samples": int(a.size), "sqnr_db": _sqnrs(ref, cand),
                "float_accuracy": float((a == extra["labels"]).mean()) if "labels" in extra else None,
                "headline": f"face {100 * agree:.1f}%, box {s:.1f} dB"}

    return metric


def text_map(output: str = "scores", threshold: float = 0.4, channel: tuple[int, int] = (-1, 0), what: str = "text"):
    """Score maps (CRAFT, PP-OCR's DB detector, MTCNN P-Net's face map): SQNR of the maps and IoU of the
    masks where channel ``channel`` = (axis, index) is above ``threshold`` (CRAFT: region score > 0.4)."""
    axis, index = channel

    def metric(float_run, cand_run, feeds, extra) -> dict:
        inter = union = 0
        refs, cands = [], []
        for feed in feeds:
            r, c = np.asarray(float_run(feed)[output]), np.asarray(cand_run(feed)[output])
            refs.append(r.ravel())
            cands.append(c.ravel())
            a, b = np.take(r, index, axis=axis) > threshold, np.take(c, index, axis=axis) > threshold
            inter += int((a & b).sum())
            union += int((a | b).sum())
        s = sqnr_db(np.concatenate(refs), np.concatenate(cands))
        iou = inter / max(1, union)
        return {"sqnr_db": {output: s}, "region_iou": iou, "headline": f"{s:.1f} dB, {what} IoU {iou:.3f}"}

    return metric


def embedding(output: str = "embedding"):
    def metric(float_run, cand_run, feeds, extra) -> dict:
        ref, cand = _collect(float_run, feeds), _collect(cand_run, feeds)
        cos = cosine_rows(ref[output], cand[output])
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "samples": int(cos.size),
                "sqnr_db": _sqnrs(ref, cand), "headline": f"cos {cos.mean():.4f} (min {cos.min():.4f})"}

    return metric


def pitch(output: str = "probs", confidence: float = 0.5):
    """CREPE: pitch difference in cents, quantized vs float, on frames the float model is confident
    on (max probability > 0.5)."""
    def metric(float_run, cand_run, feeds, extra) -> dict:
        from samples.zoo.crepe import decode_cents

        ref, cand = _collect(float_run, feeds), _collect(cand_run, feeds)
        voiced = ref[output].max(axis=1) > confidence
        d = np.abs(decode_cents(ref[output]) - decode_cents(cand[output]))[voiced]
        out = {"voiced_frames": int(voiced.sum()), "frames": int(voiced.size), "sqnr_db": _sqnrs(ref, cand)}
        if d.size:
            out.update(cents_mean=float(d.mean()), cents_p95=float(np.percentile(d, 95)),
                       within_20_cents=float((d <= 20).mean()))
            out["headline"] = f"{d.mean():.1f} cents mean, p95 {out['cents_p95']:.1f} (n={d.size})"
        else:
            out["headline"] = "no confident frames"
        return out

    return metric


def vad_stream(stateful: bool, sr: bool = True):
    """Silero VAD on whole utterances, each model carrying its own state: per-frame speech decision
    (p > 0.5) agreement, and mean |Δp|. ``stateful``: the streaming model (one 512-sample frame
    per call, ``state`` carried; ``sr``: it takes the sample rate as an input); else the sequence
    model (all frames of an utterance in one call)."""
    def metric(float_run, cand_run, feeds, extra) -> dict:
        streams = extra["frames"]  # [utterances, frames, 576] (context + frame)
        if stateful:
            p_ref, p_cand = _stream_op15(float_run, streams, sr), _stream_op15(cand_run, streams, sr)
        else:
            p_ref, p_cand = _stream_seq(float_run, streams), _stream_seq(cand_run, streams)
        mask = extra["valid"]
        a, b = p_ref[mask] > 0.5, p_cand[mask] > 0.5
        agree = float((a == b).mean())
        dp = float(np.abs(p_ref - p_cand)[mask].mean())
        return {"decision_agreement": agree, "mean_abs_dprob": dp, "frames": int(mask.sum()),
                "speech_share_float": float(a.mean()),
                "headline": f"VAD {100 * agree:.1f}% frames, |Δp| {dp:.3f}"}

    return metric


def _stream_op15(run, streams: np.ndarray, with_sr: bool = True) -> np.ndarray:
    n, t, _ = streams.shape
    state = np.zeros((2, n, 128), np.float32)
    sr = {"sr": np.array(16000, dtype=np.int64)} if with_sr else {}
    probs = np.zeros((n, t), np.float32)
    for i in range(t):
        out = run({"input": streams[:, i], "state": state, **sr})
        probs[:, i] = np.asarray(out["output"]).reshape(n)
        state = np.asarray(out["stateN"], np.float32)
    return probs


def _stream_seq(run, streams: np.ndarray) -> np.ndarray:
    probs = []
    for s in streams:
        z = np.zeros((1, 1, 128), np.float32)
        probs.append(np.asarray(run({"input": s, "h": z, "c": z})["speech_probs"]).reshape(-1))
    return np.stack(probs)
