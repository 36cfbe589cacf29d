"""Shape and indexing ops: Shape, Size, Reshape, Transpose, Concat, Slice, Gather*, Squeeze, Unsqueeze,
Expand, Range, Flatten, ConstantOfShape, Split, Tile, Pad.

Known values were folded before these run; what reaches them has at least one input that
depends on the model's inputs. Symbolic (flexible) dimensions become MIL ``shape`` arithmetic.
"""

from __future__ import annotations

import numpy as np

from targets.coreml.lower.context import Context, LoweringError, attr_str, attrs, is_known
from targets.coreml.lower.registry import lowers

_I32_MAX = np.iinfo(np.int32).max


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _axes(ctx: Context, node, ins, index: int) -> list[int] | None:
    """Axes from the input at ``index`` (opset 13+) or the ``axes`` attribute; None when absent."""
    if len(ins) > index and ins[index] is not None:
        if not is_known(ins[index]):
            raise LoweringError(node, "axes computed at run time are not supported", hint="fix the input shapes")
        return _ints(ins[index])
    a = attrs(node).get("axes")
    return None if a is None else [int(i) for i in a]


@lowers("Shape")
def _shape(ctx, node, ins):
    x = ins[0]
    a = attrs(node)
    rank = ctx.rank(x)
    start = int(a.get("start", 0))
    end = int(a.get("end", rank))
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    start, end = max(0, min(start, rank)), max(0, min(end, rank))
    dims = ctx.shape(x)[start:end]
    if all(d is not None for d in dims):
        return [np.array(dims, dtype=np.int64)]
    full = ctx.mb.shape(x=x)
    if start == 0 and end == rank:
        return [full]
    return [ctx.mb.slice_by_index(x=full, begin=np.array([start], np.int32), end=np.array([end], np.int32))]


@lowers("Size")
def _size(ctx, node, ins):
    dims = ctx.shape(ins[0])
    if all(d is not None for d in dims):
        return [np.array(int(np.prod(dims)), np.int64)]
    return [ctx.mb.reduce_prod(x=ctx.mb.shape(x=ins[0]), axes=[0], keep_dims=False)]


@lowers("Reshape")
def _reshape(ctx, node, ins):
    x, shape = ins
    allowzero = int(attrs(node).get("allowzero", 0))
    if not is_known(shape):
        k, rank = ctx.shape(shape)[0], ctx.rank(x)
        if allowzero or k == rank:
            return [ctx.mb.reshape(x=x, shape=shape)]  # same rank: MIL's 0 copies the same axis as ONNX's
        if k is None:
            raise LoweringError(node, "Reshape to a shape of run-time length is not supported")
        # ONNX's 0 copies the input axis at the same index, MIL's (iOS 17) the one at the same place
        # from the right: put x's own dims where the target has a 0
        dims = ctx.mb.shape(x=x)
        if k < rank:
            dims = ctx.mb.slice_by_index(x=dims, begin=np.array([0], np.int32), end=np.array([k], np.int32))
        elif k > rank:
            dims = ctx.mb.concat(values=[dims, np.ones(k - rank, np.int32)], axis=0)
        shape = ctx.mb.cast(x=shape, dtype="int32") if ctx.np_dtype(shape) != np.int32 else shape
        zero = ctx.mb.equal(x=shape, y=np.int32(0))
        return [ctx.mb.reshape(x=x, shape=ctx.mb.select(cond=zero, a=dims, b=shape))]
    target = _ints(shape)
    xs = ctx.shape(x)
    dyn = False
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i < len(xs) and xs[i] is not None:
                target[i] = xs[i]
            else:
                dyn = True
    if not dyn:
        return [ctx.mb.reshape(x=x, shape=np.array(target, np.int32))]
    if len(target) == len(xs):  # iOS 17 reshape: a 0 copies the input dimension at the same place
        return [ctx.mb.reshape(x=x, shape=np.array(target, np.int32))]
    full = ctx.mb.shape(x=x)
    parts = []
    for i, d in enumerate(target):
        if d == 0:
            parts.append(ctx.mb.slice_by_index(x=full, begin=np.array([i], np.int32), end=np.array([i + 1], np.int32)))
        else:
            parts.append(np.array([d], np.int32))
    return [ctx.mb.reshape(x=x, shape=ctx.mb.concat(values=[ctx.var(p) for p in parts], axis=0))]


@lowers("Transpose")
def _transpose(ctx, node, ins):
    x = ins[0]
    perm = attrs(node).get("perm")
    perm = list(range(ctx.rank(x)))[::-1] if perm is None else [int(p) for p in perm]
    return [ctx.mb.transpose(x=x, perm=perm)]


@lowers("Concat")
def _concat(ctx, node, ins):
    axis = int(attrs(node)["axis"])
    vals = [v for v in ins if v is not None and not (is_known(v) and v.size == 0 and v.ndim == 1)]
    if len(vals) == 1:
        return [vals[0]]
    return [ctx.mb.concat(values=[ctx.var(v) for v in vals], axis=axis)]


@lowers("Slice")
def _slice(ctx, node, ins):
    x, starts, ends = ins[0], ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 else None
    steps = ins[4] if len(ins) > 4 else None
    rank = ctx.rank(x)
    if axes is not None and not is_known(axes) or steps is not None and not is_known(steps):
        raise LoweringError(node, "Slice axes/steps computed at run time are not supported")
    n = _length(ctx, starts if is_known(starts) else ends)
    axes_l = _ints(axes) if axes is not None else list(range(n))
    axes_l = [a + rank if a < 0 else a for a in axes_l]
    steps_l = _ints(steps) if steps is not None else [1] * len(axes_l)
    if any(s < 0 for s in steps_l):
        raise LoweringError(node, "Slice with negative steps is not supported")
    dims = ctx.shape(x)
    begin_mask, end_mask = [True] * rank, [True] * rank
    stride = [1] * rank
    begin_parts: list = [np.array([0], np.int32)] * rank
    end_parts: list = [np.array([0], np.int32)] * rank
    for k, ax in enumerate(axes_l):
        stride[ax] = steps_l[k]
        b = _pick(ctx, starts, k)
        e = _pick(ctx, ends, k)
        if is_known(b):
            bv = int(b[0])
            if bv != 0:
                begin_mask[ax] = False
                begin_parts[ax] = np.array([max(min(bv, _I32_MAX), -_I32_MAX)], np.int32)
        else:
            begin_mask[ax] = False
            begin_parts[ax] = b
        if is_known(e):
            ev = int(e[0])
            huge = ev >= _I32_MAX or (dims[ax] is not None and ev >= dims[ax])
            if not huge:
                end_mask[ax] = False
                end_parts[ax] = np.array([max(ev, -_I32_MAX)], np.int32)
        else:
            end_mask[ax] = False
            end_parts[ax] = e
    begin = _vector(ctx, begin_parts)
    end = _vector(ctx, end_parts)
    return [ctx.mb.slice_by_index(x=x, begin=begin, end=end, stride=np.array(stride, np.int32),
                                  begin_mask=begin_mask, end_mask=end_mask)]


def _length(ctx, v) -> int:
    return int(np.asarray(v).size) if is_known(v) else int(v.shape[0])


def _pick(ctx: Context, v, k: int):
    if is_known(v):
        return np.asarray(v).reshape(-1)[k : k + 1].astype(np.int64)
    if ctx.shape(v) == (1,) and k == 0:
        return v
    return ctx.mb.slice_by_index(x=v, begin=np.array([k], np.int32), end=np.array([k + 1], np.int32))


def _vector(ctx: Context, parts: list):
    if all(is_known(p) for p in parts):
        return np.concatenate(parts).astype(np.int32)
    return ctx.mb.concat(values=[ctx.var(p.astype(np.int32)) if is_known(p) else p for p in parts], axis=0)


def _via_int(ctx: Context, data, fn):
    """Run a MIL gather op on bool data through int32 (the gathers take no bool)."""
    data = ctx.var(data)
    if not ctx.is_bool(data):
        return fn(data)
    return ctx.mb.cast(x=fn(ctx.mb.cast(x=data, dtype="int32")), dtype="bool")


@lowers("Gather")
def _gather(ctx, node, ins):
    data, idx = ins
    axis = int(attrs(node).get("axis", 0))
    rank = ctx.rank(data)
    axis = axis + rank if axis < 0 else axis
    if is_known(idx):
        dim = ctx.shape(data)[axis]
        idx = np.asarray(idx).astype(np.int64)
        if dim is not None:
            idx = np.where(idx < 0, idx + dim, idx)
        idx = idx.astype(np.int32)
    return [_via_int(ctx, data, lambda d: ctx.mb.gather(x=d, indices=ctx.var(idx), axis=axis))]


@lowers("GatherElements")
def _gather_elements(ctx, node, ins):
    data, idx = ins
    axis = int(attrs(node).get("axis", 0))
    rank = ctx.rank(data)
    axis = axis + rank if axis < 0 else axis
    ds, is_ = ctx.shape(data), ctx.shape(idx)
    data = ctx.var(data)
    if any(i != axis and a != b for i, (a, b) in enumerate(zip(ds, is_))):
        if any(d is None for i, d in enumerate(is_) if i != axis):
            raise LoweringError(node, "GatherElements with smaller flexible index dims is not supported")
        end = [d if i != axis else 0 for i, d in enumerate(is_)]
        data = ctx.mb.slice_by_index(x=data, begin=np.zeros(rank, np.int32), end=np.array(end, np.int32),
                                     end_mask=[i == axis for i in range(rank)])
    return [_via_int(ctx, data, lambda d: ctx.mb.gather_along_axis(x=d, indices=ctx.var(idx), axis=axis))]


@lowers("GatherND")
def _gather_nd(ctx, node, ins):
    data, idx = ins
    bd = int(attrs(node).get("batch_dims", 0))
    return [_via_int(ctx, data, lambda d: ctx.mb.gather_nd(x=d, indices=ctx.var(idx), batch_dims=bd))]


@lowers("Squeeze")
def _squeeze(ctx, node, ins):
    x = ins[0]
    axes = _axes(ctx, node, ins, 1)
    if axes is None:
        dims = ctx.shape(x)
        if any(d is None for d in dims):
            raise LoweringError(node, "Squeeze without axes on a flexible shape",
                                hint="fix the input shapes (edgeq package --shape AXIS=N), "
                                     "or build for Android only (--targets android)")
        axes = [i for i, d in enumerate(dims) if d == 1]
    dims = ctx.shape(x)
    axes = [a + len(dims) if a < 0 else a for a in axes]
    if any(dims[a] is None for a in axes):
        # MIL's squeeze keeps a flexible axis in its result type (it cannot know the size is 1), which
        # breaks every op after it: reshape to the kept dims instead, read at run time
        kept = np.array([i for i in range(len(dims)) if i not in axes], np.int32)
        return [ctx.mb.reshape(x=x, shape=ctx.mb.gather(x=ctx.mb.shape(x=x), indices=kept, axis=0))]
    return [ctx.mb.squeeze(x=x, axes=axes)]


@lowers("Unsqueeze")
def _unsqueeze(ctx, node, ins):
    x = ins[0]
    axes = _axes(ctx, node, ins, 1)
    out_rank = ctx.rank(x) + len(axes)
    axes = sorted(a + out_rank if a < 0 else a for a in axes)
    return [ctx.mb.expand_dims(x=x, axes=axes)]


def _ones_like_shape(ctx: Context, shape, kind: str):
    value = {"f": ctx.float_np(1.0), "b": True}.get(kind, np.int32(1))
    if is_known(shape):
        arr = np.ones(_ints(shape), dtype=ctx.float_np if kind == "f" else (bool if kind == "b" else np.int32))
        return ctx.const(arr)
    return ctx.mb.fill(shape=shape, value=value)


@lowers("Expand")
def _expand(ctx, node, ins):
    x, shape = ins
    kind = ctx.np_dtype(x).kind
    xs = ctx.static_shape(x)
    if is_known(shape) and xs is not None:
        out = np.broadcast_shapes(tuple(xs), tuple(_ints(shape)))
        if tuple(out) == tuple(xs):
            return [x]
    if is_known(x):
        x = ctx.var(x)
    ones = _ones_like_shape(ctx, shape if not is_known(shape) else shape.astype(np.int64), kind)
    if kind == "b":
        return [ctx.mb.logical_and(x=x, y=ones)]
    return [ctx.mb.mul(x=x, y=ones)]


@lowers("Range")
def _range(ctx, node, ins):
    start, limit, delta = ins
    return [ctx.mb.range_1d(start=_scalar(ctx, start), end=_scalar(ctx, limit), step=_scalar(ctx, delta))]


def _scalar(ctx: Context, v):
    if is_known(v):
        return ctx.const(np.asarray(v).reshape(()))
    if ctx.rank(v) == 1:
        return ctx.mb.squeeze(x=v, axes=[0])
    return v


@lowers("Flatten")
def _flatten(ctx, node, ins):
    x = ins[0]
    axis = int(attrs(node).get("axis", 1))
    dims = ctx.shape(x)
    axis = axis + len(dims) if axis < 0 else axis
    head, tail = dims[:axis], dims[axis:]
    if None not in tail:
        shape = [-1, int(np.prod(tail))] if head else [1, int(np.prod(tail))]
    elif None not in head:
        shape = [int(np.prod(head)), -1]
    else:  # flexible on both sides: the product of the leading dims, computed at run time
        lead = ctx.mb.slice_by_index(x=ctx.mb.shape(x=x), begin=np.array([0], np.int32),
                                     end=np.array([axis], np.int32))
        rows = ctx.mb.reduce_prod(x=lead, axes=[0], keep_dims=True)
        return [ctx.mb.reshape(x=x, shape=ctx.mb.concat(values=[rows, np.array([-1], np.int32)], axis=0))]
    return [ctx.mb.reshape(x=x, shape=np.array(shape, np.int32))]


@lowers("ConstantOfShape")
def _constant_of_shape(ctx, node, ins):
    value = attrs(node).get("value")
    from onnx import numpy_helper

    v = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    v = ctx.float_np(v) if np.asarray(v).dtype.kind == "f" else (bool(v) if np.asarray(v).dtype.kind == "b" else np.int32(v))
    return [ctx.mb.fill(shape=ins[0], value=v)]


@lowers("Split")
def _split(ctx, node, ins):
    x = ins[0]
    a = attrs(node)
    axis = int(a.get("axis", 0))
    sizes = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("split")
    n = len(node.output)
    if sizes is not None:
        outs = ctx.mb.split(x=x, split_sizes=np.array(_ints(sizes), np.int32), axis=axis)
    else:
        dim = ctx.shape(x)[axis]
        if dim is None or dim % n:
            raise LoweringError(node, "Split into unequal or flexible parts needs explicit sizes")
        outs = ctx.mb.split(x=x, num_splits=n, axis=axis)
    return list(outs)


@lowers("Tile")
def _tile(ctx, node, ins):
    return [ctx.mb.tile(x=ctx.var(ins[0]), reps=ctx.var(ins[1]))]


def _pad_check(node, deployment):
    mode = attr_str(node, "mode", "constant")
    return None if mode in ("constant", "reflect", "edge") else f"Pad mode {mode!r} is not supported"


@lowers("Pad", check=_pad_check)
def _pad(ctx, node, ins):
    x, pads = ins[0], ins[1]
    value = ins[2] if len(ins) > 2 and ins[2] is not None else np.array(0, np.float32)
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
    if not is_known(pads) or not is_known(value):
        raise LoweringError(node, "Pad amounts computed at run time are not supported")
    rank = ctx.rank(x)
    p = _ints(pads)
    ax = _ints(axes) if axes is not None else list(range(rank))
    ax = [a + rank if a < 0 else a for a in ax]
    full = [0] * (2 * rank)
    for k, a in enumerate(ax):
        full[2 * a], full[2 * a + 1] = p[k], p[k + len(ax)]
    first = next((i for i in range(rank) if full[2 * i] or full[2 * i + 1]), rank)
    mil_pad = np.array(full[2 * first :], np.int32)
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[attr_str(node, "mode", "constant")]
    fill = np.asarray(value).reshape(-1)[0]
    fill = np.array(fill, np.float32 if ctx.is_float(x) else np.int32)  # x's dtype (fp16 in fp16 compute)
    return [ctx.mb.pad(x=x, pad=mil_pad, mode=mode, constant_val=ctx.const(fill))]
