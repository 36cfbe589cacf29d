"""Streaming statistics of one tensor beyond its range: what the algorithms ask calibration for.

Each is fed every calibration batch of its tensor (``update``) and keeps a bounded summary; the
calibration loop (:mod:`edgeq.quant.calibrate`) knows nothing about what they compute. Range
observers (:mod:`edgeq.quant.observers`) follow the same protocol.

- :class:`ChannelAbsMax`: ``max |x|`` per channel of the last axis (outlier protection, smoothing).
- :class:`ChannelMean`: the mean per axis-1 channel, NCHW / ``[N, K]`` (bias correction).
- :class:`Gram`: ``E[x xᵀ]`` over the last-axis rows (GPTQ, AWQ).
- :class:`~edgeq.quant.rounding.PatchMoments`: a Conv's input patch moments (Conv rounding).

Masking constants (``|x| >= MASK_THRESHOLD``, e.g. attention masks of ``finfo.min``) never enter
a statistic: they are skipped (and flagged where it matters).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeq.quant.observers import MASK_THRESHOLD


class Statistic(Protocol):
    """What calibration feeds: one batch of one tensor at a time."""

    def update(self, x: np.ndarray) -> None: ...

    def state_nbytes(self) -> int: ...

    def result(self) -> object:
        """What the algorithms read once the pass is over (None: nothing usable was seen)."""


class ChannelAbsMax:
    """The largest magnitude per channel of the last axis; masking constants are skipped (``masked``)."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None
        self.masked = False

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32))
        keep = a < MASK_THRESHOLD
        if not keep.all():
            self.masked = True
        a = np.where(keep, a, 0.0).reshape(-1, a.shape[-1]).max(axis=0)
        self.value = a if self.value is None else np.maximum(self.value, a)

    def result(self) -> np.ndarray | None:
        """None for a tensor that carried masking constants: it stays float later anyway, leave it alone."""
        return None if self.masked else self.value

    def state_nbytes(self) -> int:
        return 0 if self.value is None else self.value.nbytes


class ChannelMean:
    """The mean per axis-1 channel (``[N, C, ...]`` or ``[N, K]``); None when axis 1 is no channel axis."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._count = 0
        self.unusable = False  # axis 1 changed size between batches: not a channel axis

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim < 2 or self.unusable:
            return
        if self._sum is not None and self._sum.shape[0] != x.shape[1]:
            self.unusable = True
            return
        other = tuple(i for i in range(x.ndim) if i != 1)
        part = np.add.reduce(x, axis=other, dtype=np.float64)
        self._sum = part if self._sum is None else self._sum + part
        self._count += x.size // x.shape[1]

    @property
    def value(self) -> np.ndarray | None:
        if self._sum is None or self.unusable:
            return None
        return (self._sum / self._count).astype(np.float32)

    def result(self) -> np.ndarray | None:
        return self.value

    def state_nbytes(self) -> int:
        return 0 if self._sum is None else self._sum.nbytes


class Gram:
    """``E[x xᵀ]`` over the rows of the last axis (float64 ``[K, K]``); rows holding masking constants are left out."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.rows = 0
        self.bad = False  # the last axis changed size between batches

    def update(self, x: np.ndarray) -> None:
        if self.bad:
            return
        x = np.asarray(x, np.float32)
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        rows = rows[np.all(np.abs(rows) < MASK_THRESHOLD, axis=1)]
        if self._sum is not None and self._sum.shape[0] != rows.shape[1]:
            self.bad = True
            return
        # float32 product per batch (BLAS speed), float64 sum across batches
        part = (rows.T @ rows).astype(np.float64)
        self._sum = part if self._sum is None else self._sum + part
        self.rows += rows.shape[0]

    @property
    def value(self) -> np.ndarray | None:
        if self._sum is None or self.bad or self.rows == 0:
            return None
        return self._sum / self.rows

    def result(self) -> np.ndarray | None:
        return self.value

    def state_nbytes(self) -> int:
        return 0 if self._sum is None else self._sum.nbytes
