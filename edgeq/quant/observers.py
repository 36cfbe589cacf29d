"""Streaming activation statistics for range calibration.

One ONNX Runtime session streams the calibration batches; every tensor to quantize has an
observer, updated batch by batch, that is asked for a clip range at the end. Memory is bounded
by the statistics (two floats, or a histogram with a fixed number of bins), never by the data set.

Conventions:

- Values that are not finite, or whose magnitude is >= ``MASK_THRESHOLD``, are skipped and
  counted in ``ignored``: attention masks add constants such as ``finfo(float32).min``, which
  must never set a range. ``seen`` counts the values that entered the statistics.
- ``range()`` returns the chosen clip ``(lo, hi)``; it need not contain 0 (the quantization
  format widens it).
- Deterministic: the same batches in the same order give the identical range. The histogram is
  moreover independent of batch order and batching (see :class:`HistogramObserver`).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import numpy as np

from edgeq.errors import InputError

MASK_THRESHOLD = 1e30

_UINT8_LEVELS = 256
_MIN_LEVEL = -1000  # bin width 2**-1000 is still a normal float64
_RESOLUTION_BITS = 40  # finest bin is 2**-40 of |x|max; only (near-)constant tensors reach it
_F32_EXACT_INT = 2**24  # integers below this are exact in float32
_SCALAR_NBYTES = 64  # seen, ignored, min, max, level, origin, bins, zeros


def _as_float_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype in (np.float32, np.float64):
        return a
    if (a.dtype.kind == "f" and a.dtype.itemsize < 4) or a.dtype.kind == "V":
        try:  # float16 and the ml_dtypes floats (bfloat16, float8 ...) widen exactly to float32
            return a.astype(np.float32)
        except (TypeError, ValueError):
            pass
    elif a.dtype.kind in "fiub":
        return a.astype(np.float64)
    raise InputError(
        f"observer for tensor '{name}' got values of dtype {a.dtype}",
        hint="calibration statistics need real numbers",
    )


class Observer(ABC):
    """Streaming statistics of one tensor that choose its clip range.

    ``name`` is the tensor's name (used in messages); ``seen`` and ``ignored`` count values
    kept and skipped; ``minimum``/``maximum`` are the exact extremes of the kept values.
    """

    method: str = ""

    def __init__(self, name: str = ""):
        self.name = name
        self.seen = 0
        self.ignored = 0
        self._min = math.inf
        self._max = -math.inf

    @property
    def minimum(self) -> float:
        return self._min

    @property
    def maximum(self) -> float:
        return self._max

    def update(self, x: np.ndarray) -> None:
        """Fold one batch (any shape, any real dtype) into the statistics."""
        values = _as_float_array(x, self.name).reshape(-1)
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())  # NaN propagates into both
        if -MASK_THRESHOLD < lo and hi < MASK_THRESHOLD:  # the common case: nothing to drop, no copy
            self.seen += values.size
            self._min = min(self._min, lo)
            self._max = max(self._max, hi)
            self._accumulate(values)
            return
        # One comparison drops NaN, ±inf and masking constants alike (NaN compares False).
        keep = np.abs(values) < MASK_THRESHOLD
        kept = int(np.count_nonzero(keep))
        self.ignored += values.size - kept
        if kept == 0:
            return
        if kept < values.size:
            values = values[keep]
        self.seen += kept
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        self._accumulate(values)

    def range(self) -> tuple[float, float]:
        """The chosen clip ``(lo, hi)``, with ``minimum <= lo <= hi <= maximum``."""
        self._require_data()
        if self._min == self._max:
            return self._min, self._max
        lo, hi = self._range()
        return float(lo), float(hi)

    def _require_data(self) -> None:
        if self.seen == 0:
            raise InputError(
                f"tensor '{self.name}' received no finite calibration value "
                f"({self.ignored} values were NaN, infinite or masking constants >= {MASK_THRESHOLD:g})",
                hint="check that the calibration data reaches this tensor, or keep it in float",
            )

    @abstractmethod
    def state_nbytes(self) -> int:
        """Bytes held by the statistics; constant over updates."""

    @abstractmethod
    def _accumulate(self, values: np.ndarray) -> None:
        """Fold finite, unmasked, flat values in (min/max/seen already updated)."""

    @abstractmethod
    def _range(self) -> tuple[float, float]:
        """The clip range; called only when at least two distinct values were seen."""


class MinMaxObserver(Observer):
    """The exact running minimum and maximum."""

    method = "minmax"

    def state_nbytes(self) -> int:
        return _SCALAR_NBYTES

    def _accumulate(self, values: np.ndarray) -> None:
        pass  # the base already tracks the exact extremes

    def _range(self) -> tuple[float, float]:
        return self._min, self._max


def _layout(lo: float, hi: float, bins: int) -> tuple[int, int]:
    """``(level, origin)`` of the canonical window holding ``[lo, hi]``.

    Bin ``i`` covers ``[(origin + i) * 2**level, (origin + i + 1) * 2**level)``; ``origin`` is a
    multiple of ``bins // 2``. The level is the smallest that fits, but not finer than
    ``2**-_RESOLUTION_BITS * |x|max``. Both are functions of ``(lo, hi)`` only, and grow
    monotonically with ``[lo, hi]``, which is what makes the histogram order-independent.
    """
    half = bins // 2
    absmax = max(-lo, hi)
    floor_level = _MIN_LEVEL
    if absmax > 0:
        floor_level = max(_MIN_LEVEL, math.frexp(absmax)[1] - _RESOLUTION_BITS)
    level = floor_level
    span = hi - lo
    if span > 0:
        # 2**level <= span / bins cannot fit; start one below that to be safe from rounding.
        level = max(floor_level, math.frexp(span / bins)[1] - 2)
    while True:
        width = math.ldexp(1.0, level)
        # x / 2**level is exact, so these floors are exact integers.
        origin = (math.floor(lo / width) // half) * half
        if math.floor(hi / width) < origin + bins:
            return level, origin
        level += 1


class HistogramObserver(Observer):
    """A streaming histogram with a fixed number of bins whose range grows as needed.

    Bins lie on a grid anchored at 0 with power-of-two width ``2**level``; the window of
    ``bins`` bins starts at a multiple of ``bins // 2`` bins. Window and width are chosen from
    the exact min/max only (:func:`_layout`): when a batch falls outside, the width grows by the
    smallest sufficient ``2**k`` and old bins merge exactly into new ones (sums of groups of
    ``2**k``). The counts therefore equal a one-shot histogram of all data on the same grid:
    the histogram depends neither on batch order nor on batching. The occupied data span always
    covers at least about ``bins / 4`` bins (unless the tensor is near-constant). Exact zeros
    are counted apart as well (``zeros``): the zero point represents them exactly.
    """

    method = "histogram"

    def __init__(self, name: str = "", *, bins: int = 2048):
        super().__init__(name)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16 or bins % 2:
            raise InputError(f"observer for tensor '{name}': bins must be an even integer >= 16, got {bins!r}")
        self.bins = bins
        self._counts = np.zeros(bins, dtype=np.int64)
        self._level = 0
        self._origin = 0
        self.zeros = 0

    def state_nbytes(self) -> int:
        return self._counts.nbytes + _SCALAR_NBYTES

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self._level)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)``: a copy of the bin counts and their ``bins + 1`` edges."""
        edges = (self._origin + np.arange(self.bins + 1)) * self.bin_width
        return self._counts.copy(), edges

    def quantile(self, q):
        """Quantile(s) ``q`` in [0, 1], interpolated within a bin, never beyond the exact min/max."""
        self._require_data()
        edges, counts = self._segments()
        cum = np.concatenate(([0.0], np.cumsum(counts)))
        rank = np.asarray(q, dtype=np.float64) * cum[-1]
        j = np.clip(np.searchsorted(cum, rank, side="left") - 1, 0, counts.size - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(counts[j] > 0, (rank - cum[j]) / counts[j], 0.0)
        x = np.clip(edges[j] + frac * (edges[j + 1] - edges[j]), self._min, self._max)
        return float(x) if x.ndim == 0 else x

    def _segments(self) -> tuple[np.ndarray, np.ndarray]:
        """Edges and float counts of the occupied bins, outer edges pulled in to the exact min/max.

        The density is taken as uniform within each segment.
        """
        w = self.bin_width
        first = math.floor(self._min / w) - self._origin
        last = math.floor(self._max / w) - self._origin
        counts = self._counts[first : last + 1].astype(np.float64)
        edges = (self._origin + np.arange(first, last + 2)) * w
        edges[0], edges[-1] = self._min, self._max
        return edges, counts

    # Batches larger than this are histogrammed on an even stride through them (a view, no copy);
    # min and max stay exact. A million values per batch choose the same ranges as all of them on
    # the samples (EfficientNet-Lite0 W8A8 19.7 dB either way; at 2**18 values one evaluation crop
    # of 96 flipped), and the cost stops growing with the activation size (early EfficientNet
    # layers hold 3.2 M values per batch of 8).
    max_values_per_batch = 1 << 20

    def _accumulate(self, values: np.ndarray) -> None:
        if values.size > self.max_values_per_batch:
            values = values[:: -(-values.size // self.max_values_per_batch)]
        level, origin = _layout(self._min, self._max, self.bins)
        if (level, origin) != (self._level, self._origin):
            self._regrid(level, origin)
        self._counts += np.bincount(self._bin_index(values), minlength=self.bins)
        self.zeros += int(np.count_nonzero(values == 0))

    def _regrid(self, level: int, origin: int) -> None:
        shift = level - self._level
        occupied = np.flatnonzero(self._counts)
        if occupied.size:
            if shift < 0:
                raise RuntimeError(f"histogram of '{self.name}' would shrink (internal error)")
            # Global index g >> shift is floor(g / 2**shift): the coarse bin holding fine bin g.
            # |g| < 2**42, so a shift of 62 already maps everything to 0 or -1.
            target = ((self._origin + occupied) >> min(shift, 62)) - origin
            if target[0] < 0 or target[-1] >= self.bins:
                raise RuntimeError(f"histogram of '{self.name}' lost data on regrid (internal error)")
            counts = np.zeros(self.bins, dtype=np.int64)
            np.add.at(counts, target, self._counts[occupied])
            self._counts = counts
        self._level, self._origin = level, origin

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        level, origin = self._level, self._origin
        # Scaling by 2**-level is exact and so are floor and the integer subtraction, in float32
        # too while the indices stay below 2**24: bin assignment is exact, not rounded.
        if values.dtype == np.float32 and -120 < level < 120 and abs(origin) + self.bins < _F32_EXACT_INT:
            t = values * np.float32(math.ldexp(1.0, -level))
        else:
            t = np.multiply(values, math.ldexp(1.0, -level), dtype=np.float64)
        np.floor(t, out=t)
        t -= origin
        idx = t.astype(np.intp)
        # Only float32 underflow of values 2**149 times smaller than a bin can step outside.
        np.clip(idx, 0, self.bins - 1, out=idx)
        return idx


class PercentileObserver(HistogramObserver):
    """Cuts equal tails: ``lo = quantile(1 - p/100)``, ``hi = quantile(p/100)`` of the histogram."""

    method = "percentile"

    def __init__(self, name: str = "", *, percentile: float = 99.99, bins: int = 2048):
        super().__init__(name, bins=bins)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise InputError(f"observer for tensor '{name}': percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        lo, hi = self.quantile([1.0 - p, p])
        return lo, hi


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


class EntropyObserver(HistogramObserver):
    """TensorRT-style threshold search minimising KL(P||Q) for 8-bit (256-level) quantization.

    Choice for signed data: one threshold ``T`` on the ``|x|`` scale (as TensorRT) defines the
    window ``[-T, T]`` intersected with ``[min, max]`` on the signed histogram, and that window
    is split into 256 levels. So symmetric data gets MXNet's symmetric search, one-signed data
    (ReLU) gets all 256 levels on ``[0, T]``, and a side that never reaches ``T`` is not clipped.

    As in TensorRT/MXNet: P is the window's histogram with the mass outside folded into the two
    edge bins; Q merges the window's own (unfolded) bins into 256 groups and spreads each group's
    mass evenly over its bins where P is nonzero. Q lacks the folded mass, which is what makes
    clipping cost. Where Q is 0 but P is not, Q is ``1e-4`` counts (their smoothing). Windows of
    fewer than 256 bins are not searched (KL cannot see rounding inside a bin), so the
    histogram's resolution bounds how tight the clip can get; ``bins`` defaults higher than
    the base's 2048 for that reason: with 8192 the tightest threshold searched on symmetric
    data is ``|x|max / 32 .. / 8``, around TensorRT's ``/ 16``. Exact zeros are left out of P and Q: the zero point represents them exactly.

    All candidate thresholds are scored at once from prefix sums, O(candidates x 256).
    """

    method = "entropy"
    _EPS = 1e-4
    _CHUNK = 512  # candidates scored per vectorised step: bounds temporaries to a few MB

    def __init__(self, name: str = "", *, bins: int = 8192):
        super().__init__(name, bins=bins)
        if bins < 4 * _UINT8_LEVELS:
            raise InputError(f"observer for tensor '{name}': entropy needs bins >= {4 * _UINT8_LEVELS}, got {bins}")

    def _range(self) -> tuple[float, float]:
        levels = _UINT8_LEVELS
        w = self.bin_width
        gmin, gmax = math.floor(self._min / w), math.floor(self._max / w)  # global bin indices
        h = self._counts[gmin - self._origin : gmax - self._origin + 1].astype(np.float64)
        if gmin <= 0 <= gmax:
            # Exact zeros (a ReLU's spike) cost nothing to quantize; left in, Q's averaging of
            # that spike would dominate KL (pytorch-quantization sets bins[0] = bins[1] for this).
            h[-gmin] -= self.zeros
        total = h.sum()
        if total == 0:
            return self._min, self._max

        # Thresholds t (in bins) whose window [max(-t, gmin), min(t, gmax + 1)) is nonempty.
        t_first = 1 if gmin < 0 <= gmax else (gmin + 1 if gmin >= 0 else -gmax)
        t_last = max(-gmin, gmax + 1)
        t = np.arange(t_first, t_last + 1)
        a = np.maximum(-t, gmin) - gmin  # window start / stop, local in h
        b = np.minimum(t, gmax + 1) - gmin
        ok = b - a >= levels
        t, a, b = t[ok], a[ok], b[ok]
        if t.size == 0:
            return self._min, self._max

        hc = np.concatenate(([0.0], np.cumsum(h)))
        nzc = np.concatenate(([0], np.cumsum(h > 0)))
        hlc = np.concatenate(([0.0], np.cumsum(_xlogx(h))))
        kl = np.concatenate(
            [
                self._kl(h, hc, nzc, hlc, total, a[i : i + self._CHUNK], b[i : i + self._CHUNK], levels)
                for i in range(0, t.size, self._CHUNK)
            ]
        )
        best = t[int(np.argmin(kl))] * w  # first minimum: ties go to the tighter window
        return max(self._min, -best), min(self._max, best)

    def _kl(self, h, hc, nzc, hlc, total, a, b, levels) -> np.ndarray:
        """KL(P||Q) of each window ``[a, b)``; vectorised over windows."""
        n = b - a
        bounds = a[:, None] + (np.arange(levels + 1)[None, :] * n[:, None]) // levels
        group_sum = hc[bounds[:, 1:]] - hc[bounds[:, :-1]]
        group_nz = (nzc[bounds[:, 1:]] - nzc[bounds[:, :-1]]).astype(np.float64)
        left_out, right_out = hc[a], total - hc[b]
        h_first, h_last = h[a], h[b - 1]
        # A zero edge bin becomes nonzero in P when outliers fold into it.
        group_nz[:, 0] += (h_first == 0) & (left_out > 0)
        group_nz[:, -1] += (h_last == 0) & (right_out > 0)
        p_first, p_last = h_first + left_out, h_last + right_out
        sum_plogp = hlc[b] - hlc[a] - _xlogx(h_first) - _xlogx(h_last) + _xlogx(p_first) + _xlogx(p_last)

        p_group = group_sum.copy()
        p_group[:, 0] += left_out
        p_group[:, -1] += right_out
        with np.errstate(divide="ignore", invalid="ignore"):
            log_q = np.where(group_sum > 0, np.log(group_sum / np.maximum(group_nz, 1.0)), math.log(self._EPS))
        sum_plogq = np.sum(np.where(p_group > 0, p_group * log_q, 0.0), axis=1)
        inside = hc[b] - hc[a]
        with np.errstate(divide="ignore"):
            kl = (sum_plogp - sum_plogq) / total - math.log(total) + np.log(inside)
        return np.where(inside > 0, kl, np.inf)


class MSEObserver(HistogramObserver):
    """The clip minimising the expected squared error of uint8 affine quantization.

    Error of a clip ``(lo, hi)``, from the histogram (uniform density within a bin):
    ``step**2 / 12`` per in-range value (rounding) plus ``(x - clip)**2`` for every value
    outside, with ``step`` taken over the range widened to contain 0, as the format will.
    Candidates shrink each end independently from the full range toward 0 (clamped into
    ``[min, max]``) by factors ``2**(-k/32)``, k = 0..384 (down to 1/4096, 2.2 % apart); all
    385 x 385 pairs are scored and the first minimum wins, so the result is deterministic.
    """

    method = "mse"
    _STEPS_PER_OCTAVE = 32
    _OCTAVES = 12

    def _range(self) -> tuple[float, float]:
        edges, counts = self._segments()
        if self.zeros:
            # Exact zeros quantize without error and every candidate keeps 0 (the anchor) inside.
            counts[np.searchsorted(edges, 0.0, side="right") - 1 if edges[-1] > 0 else -1] -= self.zeros
        anchor = min(max(0.0, self._min), self._max)
        # Work relative to the anchor: keeps the prefix sums below free of cancellation.
        e = edges - anchor
        shrink = np.exp2(-np.arange(self._STEPS_PER_OCTAVE * self._OCTAVES + 1) / self._STEPS_PER_OCTAVE)
        lo = shrink * e[0]
        hi = shrink * e[-1]
        clip_hi, out_hi = _tail_error(e, counts, hi)
        clip_lo, out_lo = _tail_error(-e[::-1], counts[::-1], -lo)
        step = (np.maximum(hi + anchor, 0.0)[None, :] - np.minimum(lo + anchor, 0.0)[:, None]) / (_UINT8_LEVELS - 1)
        inside = counts.sum() - out_lo[:, None] - out_hi[None, :]
        err = clip_lo[:, None] + clip_hi[None, :] + inside * step * step / 12.0
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return float(lo[i] + anchor), float(hi[j] + anchor)


def _tail_error(edges: np.ndarray, counts: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sum (x - t)**2`` and the count over ``x > t``, for piecewise-uniform segments; per ``t``."""
    length = np.diff(edges)
    mid = 0.5 * (edges[:-1] + edges[1:])
    # Suffix sums over whole segments: count, count*mid, count*E[x^2] (uniform: mid^2 + len^2/12).
    s0 = np.concatenate((np.cumsum(counts[::-1])[::-1], [0.0]))
    s1 = np.concatenate((np.cumsum((counts * mid)[::-1])[::-1], [0.0]))
    s2 = np.concatenate((np.cumsum((counts * (mid * mid + length * length / 12.0))[::-1])[::-1], [0.0]))
    k = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, counts.size - 1)  # segment holding t
    above = k + 1
    sq = s2[above] - 2.0 * t * s1[above] + t * t * s0[above]
    cnt = s0[above].copy()
    # The part of segment k above t.
    part = np.clip(edges[k + 1] - t, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(length[k] > 0, counts[k] / length[k], 0.0)
    sq += density * part**3 / 3.0
    cnt += density * part
    # t below the first edge: every value lies above it.
    below = t < edges[0]
    sq = np.where(below, s2[0] - 2.0 * t * s1[0] + t * t * s0[0], sq)
    cnt = np.where(below, s0[0], cnt)
    return np.maximum(sq, 0.0), cnt


_METHODS: dict[str, type[Observer]] = {
    cls.method: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)
}


def make_observer(method: str, name: str = "", **options) -> Observer:
    """A fresh observer for ``method``: "minmax" | "percentile" | "entropy" | "mse"."""
    cls = _METHODS.get(method)
    if cls is None:
        raise InputError(
            f"unknown calibration method {method!r} for tensor '{name}'",
            hint=f"use one of: {', '.join(_METHODS)}",
        )
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(
            f"calibration method '{method}' has no option {unknown[0]!r}",
            hint=f"its options: {', '.join(accepted)}" if accepted else "it takes no options",
        )
    return cls(name, **options)
