"""Numeric comparison of a candidate's outputs with a reference's, in pure numpy.

Conventions (used everywhere in edgeq):

- SQNR (dB) = 10·log10(Σ ref² / Σ (ref − cand)²) over all elements; ``inf`` when equal.
- Cosine similarity is computed per sample: axis 0 is the sample axis of a batched output
  (rank ≥ 2); a rank-0/1 output is one sample.
- Top-k metrics read the last axis of a classifier's output as class scores.
- Statistics are accumulated feed by feed, so memory does not grow with the data set
  (except the per-sample cosines, top-k and embeddings, a few numbers per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``cand`` against ``ref`` in dB."""
    ref64 = np.asarray(ref, dtype=np.float64)
    err = ref64 - np.asarray(cand, dtype=np.float64)
    return _sqnr_from_sums(float(np.sum(ref64 * ref64)), float(np.sum(err * err)))


def _sqnr_from_sums(signal: float, noise: float) -> float:
    if not math.isfinite(noise) or not math.isfinite(signal):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def per_sample_cosine(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (row along axis 0 for rank ≥ 2, else the whole tensor)."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if r.ndim >= 2:
        r = r.reshape(r.shape[0], -1)
        c = c.reshape(c.shape[0], -1)
    else:
        r = r.reshape(1, -1)
        c = c.reshape(1, -1)
    num = np.sum(r * c, axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(c, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))
    return cos


@dataclass
class TensorStats:
    """Running comparison of one tensor over many feeds."""

    signal: float = 0.0
    noise: float = 0.0
    max_abs_err: float = 0.0
    elements: int = 0
    nonfinite: int = 0  # positions where exactly one side is NaN/inf, or they disagree on it
    cosines: list[float] = field(default_factory=list)
    keep_cosines: bool = True
    one_value_per_sample: bool = False

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r, c = np.asarray(ref), np.asarray(cand)
        if r.shape != c.shape:
            raise ValueError(f"shape {list(c.shape)} differs from the reference's {list(r.shape)}")
        if not (r.dtype == c.dtype == np.float32 and np.isfinite(np.sum(r)) and np.isfinite(np.sum(c))):
            # non-finite values (or other dtypes): compare in float64 where both sides are finite. The
            # common all-finite float32 case skips the masks and copies (validation compares ~10^4
            # tensors: 4x faster; float32 dot products change an SQNR by < 0.001 dB)
            r, c = r.astype(np.float64), c.astype(np.float64)
            finite = np.isfinite(r) & np.isfinite(c)
            same_nonfinite = ~finite & ((r == c) | (np.isnan(r) & np.isnan(c)))
            self.nonfinite += int(np.count_nonzero(~finite & ~same_nonfinite))
            r, c = np.where(finite, r, 0.0), np.where(finite, c, 0.0)
        rf = r.reshape(-1)
        err = rf - c.reshape(-1)
        self.signal += float(np.dot(rf, rf))
        self.noise += float(np.dot(err, err))
        if err.size:
            self.max_abs_err = max(self.max_abs_err, float(max(err.max(), -err.min())))
        self.elements += int(r.size)
        per_sample = r[0].size if r.ndim >= 2 else r.size
        if per_sample <= 1:
            self.one_value_per_sample = True  # a cosine of one value is ±1 whatever the error: not kept
        elif self.keep_cosines:
            self.cosines.extend(per_sample_cosine(r, c).tolist())

    @property
    def sqnr_db(self) -> float:
        if self.nonfinite:
            return float("-inf")
        return _sqnr_from_sums(self.signal, self.noise)

    def summary(self) -> dict:
        out = {
            "sqnr_db": self.sqnr_db,
            "max_abs_err": self.max_abs_err,
            "elements": self.elements,
            "nonfinite_mismatches": self.nonfinite,
        }
        if self.keep_cosines and self.cosines:
            cos = np.asarray(self.cosines)
            out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), samples=int(cos.size))
        if self.one_value_per_sample:
            out["one_value_per_sample"] = True
        return out


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores along the last axis, best first, one row per sample."""
    s = np.asarray(scores).reshape(-1, np.asarray(scores).shape[-1])
    k = min(k, s.shape[-1])
    idx = np.argpartition(-s, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, idx, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1)


@dataclass
class ClassifierStats:
    """Top-1 agreement and top-5 overlap of a classifier's scores.

    A ``[batch, positions, classes]`` output (a CTC recognizer's frames, a token classifier's tags) is
    judged per position: every position is one decision, and the summary says ``per_position``."""

    top1_same: list[bool] = field(default_factory=list)
    top5_overlap: list[float] = field(default_factory=list)
    per_position: bool = False

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.per_position |= np.ndim(ref) >= 3
        r5, c5 = topk(ref, 5), topk(cand, 5)
        self.top1_same.extend((r5[:, 0] == c5[:, 0]).tolist())
        k = r5.shape[1]
        for a, b in zip(r5, c5):
            self.top5_overlap.append(len(set(a.tolist()) & set(b.tolist())) / k)

    def summary(self) -> dict:
        return {
            "top1_agreement": float(np.mean(self.top1_same)) if self.top1_same else float("nan"),
            "top5_overlap": float(np.mean(self.top5_overlap)) if self.top5_overlap else float("nan"),
            "samples": len(self.top1_same),
            **({"per_position": True} if self.per_position else {}),
        }


@dataclass
class EmbeddingStats:
    """Cosine of each embedding to its reference, and nearest-neighbour agreement across the set."""

    ref: list[np.ndarray] = field(default_factory=list)
    cand: list[np.ndarray] = field(default_factory=list)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64)
        self.ref.append(r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1))
        self.cand.append(c.reshape(c.shape[0], -1) if c.ndim >= 2 else c.reshape(1, -1))

    def summary(self) -> dict:
        if not self.ref:
            return {}
        r = np.concatenate(self.ref)
        c = np.concatenate(self.cand)
        cos = per_sample_cosine(r, c)
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "nn_agreement": nearest_neighbour_agreement(r, c),
            "samples": int(r.shape[0]),
        }


def nearest_neighbour_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same in both spaces."""
    if ref.shape[0] < 2:
        return float("nan")

    def nn(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        u = x / np.where(norms > 0, norms, 1.0)
        sim = u @ u.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(nn(ref) == nn(cand)))
