"""MIL shape and indexing ops in numpy (iOS 17/18 semantics)."""

from __future__ import annotations

import numpy as np


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _reshape(x, shape):
    x = np.asarray(x)
    target = _ints(shape)
    out = list(target)
    # iOS 17: a 0 copies the input dimension at the same place counted from the right
    for i, d in enumerate(target):
        if d == 0:
            j = x.ndim - (len(target) - i)
            out[i] = x.shape[j] if j >= 0 else 1
    return x.reshape(out)


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    b, e = _ints(begin), _ints(end)
    n = len(b)
    s = _ints(stride) if stride is not None else [1] * n
    bm = list(np.asarray(begin_mask).reshape(-1)) if begin_mask is not None else [False] * n
    em = list(np.asarray(end_mask).reshape(-1)) if end_mask is not None else [False] * n
    sm = list(np.asarray(squeeze_mask).reshape(-1)) if squeeze_mask is not None else [False] * n
    index = []
    for i in range(n):
        if sm[i]:
            index.append(b[i])
            continue
        index.append(slice(None if bm[i] else b[i], None if em[i] else e[i], s[i]))
    return x[tuple(index)]


def _slice_by_size(x, begin, size):
    x = np.asarray(x)
    index = tuple(slice(b, None if z == -1 else b + z) for b, z in zip(_ints(begin), _ints(size)))
    return x[index]


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    axis = int(axis)
    if int(batch_dims) == 0:
        return np.take(x, idx, axis=axis)
    bd = int(batch_dims)
    out = [_gather(x[i], idx[i], axis - 1, bd - 1) for i in range(x.shape[0])]
    return np.stack(out)


def _gather_along_axis(x, indices, axis=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[int(axis)], idx)
    return np.take_along_axis(x, idx, axis=int(axis))


def _gather_nd(x, indices, batch_dims=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    if int(batch_dims):
        return np.stack([_gather_nd(x[i], idx[i], int(batch_dims) - 1) for i in range(x.shape[0])])
    k = idx.shape[-1]
    return x[tuple(np.moveaxis(idx, -1, 0))] if k else np.broadcast_to(x, idx.shape[:-1] + x.shape)


def _squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_ints(axes)))


def _expand_dims(x, axes):
    x = np.asarray(x)
    out_rank = x.ndim + len(_ints(axes))
    return np.expand_dims(x, tuple(a + out_rank if a < 0 else a for a in _ints(axes)))


def _concat(values, axis, interleave=False):
    vals = [np.asarray(v) for v in values]
    if interleave:
        stacked = np.stack(vals, axis=int(axis) + 1)
        shape = list(vals[0].shape)
        shape[int(axis)] *= len(vals)
        return stacked.reshape(shape)
    return np.concatenate(vals, axis=int(axis))


def _split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    if split_sizes is not None:
        return np.split(x, np.cumsum(_ints(split_sizes))[:-1], axis=int(axis))
    return np.split(x, int(num_splits), axis=int(axis))


def _pad(x, pad, mode="constant", constant_val=0.0):
    x = np.asarray(x)
    p = _ints(pad)
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val).astype(x.dtype))
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[str(mode)])


def _reverse(x, axes=None):
    x = np.asarray(x)
    return np.flip(x, axis=None if axes is None else tuple(_ints(axes)))


def _pixel_shuffle(x, upscale_factor):
    x, f = np.asarray(x), int(upscale_factor)
    n, c, h, w = x.shape
    return x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (f * f), h * f, w * f)


def _pixel_unshuffle(x, downscale_factor):
    x, f = np.asarray(x), int(downscale_factor)
    n, c, h, w = x.shape
    return x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * f * f, h // f, w // f)


OPS = {
    "reverse": _reverse,
    "pixel_shuffle": _pixel_shuffle,
    "pixel_unshuffle": _pixel_unshuffle,
    "stack": lambda values, axis: np.stack([np.asarray(v) for v in values], axis=int(axis)),
    "shape": lambda x: np.array(np.asarray(x).shape, np.int32),
    "reshape": _reshape,
    "transpose": lambda x, perm: np.transpose(x, _ints(perm)),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "gather": _gather,
    "gather_along_axis": _gather_along_axis,
    "gather_nd": _gather_nd,
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "fill": lambda shape, value=0.0: np.full(_ints(shape), value),
    "range_1d": lambda end, start, step: np.arange(np.asarray(start).item(), np.asarray(end).item(),
                                                   np.asarray(step).item()),
    "split": _split,
    "tile": lambda x, reps: np.tile(x, _ints(reps)),
    "pad": _pad,
}
