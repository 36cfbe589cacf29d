"""Tensor specs: the names, shapes, dtypes and dynamic axes of a model's inputs.

A dimension is an ``int`` (fixed) or a ``str`` (a named dynamic axis such as ``"batch"``).
The text form, used on the command line, is ``name:dtype[d0,d1,...]``, for example
``input_ids:int64[batch,sequence]`` or ``image:float32[batch,3,224,224]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeq.errors import InputError

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}

_SPEC_RE = re.compile(r"^\s*(?P<name>[^:\[\]\s]+)\s*:\s*(?P<dtype>\w+)\s*\[(?P<dims>[^\]]*)\]\s*$")

# Size given to a dynamic axis in example and random inputs when the user does not choose one.
# Not 0 or 1: torch.export specializes those sizes, which would silently freeze the axis.
DEFAULT_DYNAMIC_SIZE = 2


@dataclass(frozen=True)
class TensorSpec:
    """One model input (or output): name, shape with named dynamic axes, dtype.

    ``low``/``high`` bound the values of random inputs (``high`` exclusive for integers), so
    that e.g. token ids stay inside a vocabulary and masks stay at 1.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(
                f"input {self.name!r}: unknown dtype {self.dtype!r}",
                hint=f"use one of {', '.join(DTYPES)}",
            )
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
                raise InputError(f"input {self.name!r}: bad dimension {d!r} in shape {self.shape}")

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse ``name:dtype[d0,d1,...]``; a non-numeric dimension is a named dynamic axis."""
        m = _SPEC_RE.match(text)
        if not m:
            raise InputError(
                f"cannot read input spec {text!r}",
                hint="write it as name:dtype[dims], e.g. image:float32[batch,3,224,224]",
            )
        dims: list[int | str] = []
        for part in (p.strip() for p in m["dims"].split(",")):
            if not part:
                continue
            if part.isdigit():
                dims.append(int(part))
            elif part.isidentifier():
                dims.append(part)
            else:
                raise InputError(
                    f"input spec {text!r}: dimension {part!r} is neither a size nor an axis name",
                    hint="use a non-negative integer or a name such as batch",
                )
        return cls(m["name"], tuple(dims), m["dtype"])

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, sizes: Mapping[str, int] | None = None) -> tuple[int, ...]:
        sizes = sizes or {}
        return tuple(d if isinstance(d, int) else int(sizes.get(d, DEFAULT_DYNAMIC_SIZE)) for d in self.shape)

    def random(self, rng: np.random.Generator, sizes: Mapping[str, int] | None = None) -> np.ndarray:
        """A random array of this spec (normal floats, integers in [low, high))."""
        shape = self.concrete_shape(sizes)
        dt = DTYPES[self.dtype]
        if dt.kind == "f":
            x = rng.standard_normal(shape)
            if self.low is not None or self.high is not None:
                lo = -1.0 if self.low is None else self.low
                hi = 1.0 if self.high is None else self.high
                x = rng.uniform(lo, hi, shape)
            return x.astype(dt)
        if dt.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        lo = 0 if self.low is None else int(self.low)
        hi = 10 if self.high is None else int(self.high)
        return rng.integers(lo, hi, shape).astype(dt)


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, where: str = "feed",
               finite: bool = False) -> None:
    """Raise :class:`InputError` if ``feed`` does not match ``specs`` (names, dtypes, shapes).

    Named dynamic axes must agree across inputs (one ``batch`` size per feed), and no input may
    have 0 on axis 0: an empty batch has nothing to measure and breaks metrics and calibration
    later, far from the file at fault (other axes may be 0: a decoder's empty past key/value
    cache). With ``finite``, float inputs must hold no NaN or infinity (calibration data: one
    NaN poisons every range it reaches).
    """
    if not isinstance(feed, Mapping):
        raise InputError(f"{where}: expected a mapping of input name to array, got {type(feed).__name__}")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(map(str, extra))}")
        raise InputError(f"{where}: {'; '.join(parts)}", hint=f"the model takes {', '.join(names)}")
    axis_sizes: dict[str, int] = {}
    for spec in specs:
        arr = feed[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"{where}: input {spec.name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype != DTYPES[spec.dtype]:
            raise InputError(
                f"{where}: input {spec.name!r} has dtype {arr.dtype} but the model expects {spec.dtype}",
                hint=f"convert it with .astype(np.{spec.dtype})",
            )
        if arr.ndim != len(spec.shape):
            raise InputError(
                f"{where}: input {spec.name!r} has shape {list(arr.shape)} but the model expects "
                f"{len(spec.shape)} dimensions {list(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(want, int):
                if want != got:
                    raise InputError(
                        f"{where}: input {spec.name!r} has shape {list(arr.shape)} but the model expects "
                        f"{list(spec.shape)} (axis {axis} must be {want})"
                    )
            else:
                seen = axis_sizes.setdefault(want, got)
                if seen != got:
                    raise InputError(
                        f"{where}: axis {want!r} is {seen} in one input but {got} in {spec.name!r}",
                        hint="inputs that share a named axis must agree on its size",
                    )
        if arr.ndim and arr.shape[0] == 0:
            raise InputError(f"{where}: input {spec.name!r} is empty: shape {list(arr.shape)} has no samples on axis 0",
                             hint="drop the empty batch, or save at least one sample in it")
        if finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise InputError(f"{where}: input {spec.name!r} has {bad} NaN or infinite values",
                             hint="calibration data must be finite; clean or drop that batch")


def check_feeds(feeds: Iterable[Mapping[str, np.ndarray]], specs: Sequence[TensorSpec], *, source: str,
                finite: bool = False) -> list[dict]:
    """Materialize and check every feed before any model runs; return them as a list."""
    out = []
    for i, feed in enumerate(feeds):
        where = feed.pop("__source__", None) if isinstance(feed, dict) else None
        check_feed(feed, specs, where=where or f"{source} feed {i}", finite=finite)
        out.append(dict(feed))
    if not out:
        raise InputError(f"{source}: no inputs to run", hint="give at least one feed")
    return out
