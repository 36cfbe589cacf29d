"""MIL matmul, linear, convolution, pooling and resampling ops in numpy (float32 arithmetic)."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from targets.coreml.executor import parallel
from targets.coreml.executor.ops_math import f32


def _ints(v, n=None, default=1) -> list[int]:
    if v is None:
        return [default] * n
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = f32(x), f32(y)
    if transpose_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    # contiguous operands: numpy's matmul only calls BLAS on them (strided views take a slow loop)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if x.ndim > 2 and y.ndim == 2:  # one 2-d product: much faster here than numpy's batched loop
        return _matmul_2d(x.reshape(-1, x.shape[-1]), y).reshape(*x.shape[:-1], y.shape[-1])
    if x.ndim == 2 and y.ndim == 2:
        return _matmul_2d(x, y)
    if x.ndim == y.ndim > 2 and x.shape[:-2] == y.shape[:-2]:  # e.g. attention: blocks of the batch in parallel
        lead = x.shape[:-2]
        out = parallel.batched_matmul(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
        return out.reshape(*lead, *out.shape[-2:])
    return np.matmul(x, y)


_SMALL_K = 16


def _matmul_2d(x, y):
    # OpenBLAS takes milliseconds for a reduction over a few channels (e.g. the low-rank
    # "protected channels" products); numpy's own loop is many times faster there
    if x.shape[1] <= _SMALL_K:
        return np.einsum("ik,kj->ij", x, y)
    return parallel.matmul_2d(x, y)


def _linear(x, weight, bias=None):
    y = f32(x) @ f32(weight).T
    return y if bias is None else y + f32(bias)


def _pads(sizes, keff, strides, pad_type, pad) -> list[tuple[int, int]]:
    n = len(sizes)
    if pad_type == "custom":
        p = _ints(pad, 2 * n, 0)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type == "valid":
        return [(0, 0)] * n
    out = []
    for size, k, s in zip(sizes, keff, strides):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        half = total // 2
        out.append((half, total - half) if pad_type == "same" else (total - half, half))
    return out


def _as_2d(fn):
    """Run a 2-d spatial kernel on 1-d input by adding a unit height axis."""

    def run(x, *args, **kw):
        x = np.asarray(x)
        if x.ndim == 3:
            kw2 = {k: _lift(k, v) for k, v in kw.items()}
            if "weight" in kw2:
                kw2["weight"] = np.asarray(kw["weight"])[:, :, None, :]
            return fn(x[:, :, None, :], *args, **kw2)[:, :, 0, :]
        return fn(x, *args, **kw)

    return run


def _lift(key, v):
    if key in ("strides", "dilations", "kernel_sizes") and v is not None:
        return np.array([1, *_ints(v)])
    if key == "pad" and v is not None:
        return np.array([0, 0, *_ints(v)])
    if key == "output_shape" and v is not None:
        o = _ints(v)
        return np.array([*o[:2], 1, *o[2:]])
    return v


def _windows(xp, kh, kw, dh, dw, sh, sw, oh, ow):
    """Every kernel offset's strided view of the padded input: (kh*kw) arrays of (N, C, oh, ow)."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]


_DEPTHWISE_BYTES = 1 << 17  # per accumulator: it and its temporary fit in a 1 MiB L2 cache with the input rows


@_as_2d
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    x, w = f32(x), f32(weight)
    sh, sw = _ints(strides, 2)
    dh, dw = _ints(dilations, 2)
    n_out, cg, kh, kw = w.shape
    keff = [(kh - 1) * dh + 1, (kw - 1) * dw + 1]
    pads = _pads(x.shape[2:], keff, (sh, sw), str(pad_type), pad)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    oh = (xp.shape[2] - keff[0]) // sh + 1
    ow = (xp.shape[3] - keff[1]) // sw + 1
    g = int(groups)
    n, c = x.shape[:2]
    og = n_out // g
    out = np.empty((n, n_out, oh, ow), np.float32)

    mult = n_out // c

    def depthwise(a, b):  # one multiply-add per kernel offset, a cache-sized group of channels at a time
        chunk = max(1, _DEPTHWISE_BYTES // ((b - a) * oh * ow * 4))  # channels whose sums stay in cache
        for c0 in range(0, c, chunk):
            xs, ws = xp[a:b, c0 : c0 + chunk], w[c0 * mult : (c0 + chunk) * mult, 0]
            acc = np.zeros((b - a, ws.shape[0], oh, ow), np.float32)
            tmp = np.empty_like(acc)
            for i, j, win in _windows(xs, kh, kw, dh, dw, sh, sw, oh, ow):
                np.multiply(np.repeat(win, mult, axis=1) if mult > 1 else win, ws[:, i, j][None, :, None, None],
                            out=tmp)
                acc += tmp
            out[a:b, c0 * mult : (c0 + chunk) * mult] = acc

    def dense(a, b):  # per group, one product over (channels, kernel rows, kernel columns)
        # every output position's receptive field, as a strided view: (batch, c, oh, ow, kh, kw)
        win = sliding_window_view(xp[a:b], tuple(keff), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        for k in range(g):
            part = np.tensordot(win[:, k * cg : (k + 1) * cg], w[k * og : (k + 1) * og], axes=([1, 4, 5], [1, 2, 3]))
            out[a:b, k * og : (k + 1) * og] = part.transpose(0, 3, 1, 2)

    def pointwise(a, b):  # 1x1, stride 1: W (out, in) times each image's (in, pixels), no copies
        x2 = xp[a:b].reshape(b - a, c, oh * ow)
        o2 = out[a:b].reshape(b - a, n_out, oh * ow)
        for k in range(g):
            np.matmul(w[k * og : (k + 1) * og, :, 0, 0], x2[:, k * cg : (k + 1) * cg], out=o2[:, k * og : (k + 1) * og])

    if g == c > 1 and cg == 1:
        kernel = depthwise
    elif kh == kw == 1 and sh == sw == 1 and xp.shape[2:] == (oh, ow) and cg * kh * kw > 16:
        kernel = pointwise
    else:
        kernel = dense
    # batch blocks on the thread pool (a block computes all of its own outputs)
    parallel.rows(kernel, n, 2 * out.size * cg * kh * kw, parallel.MIN_FLOPS)
    if bias is not None:
        out += f32(bias)[None, :, None, None]
    return out


@_as_2d
def _conv_transpose(x, weight, bias=None, pad=None, output_shape=None, pad_type="valid", strides=None,
                    dilations=None, groups=1):
    x, w = f32(x), f32(weight)
    sh, sw = _ints(strides, 2)
    dh, dw = _ints(dilations, 2)
    n, c, h, wd = x.shape
    g = int(groups)
    cin_g, cout_g, kh, kw = c // g, w.shape[1], w.shape[2], w.shape[3]
    fh, fw = (h - 1) * sh + (kh - 1) * dh + 1, (wd - 1) * sw + (kw - 1) * dw + 1
    full = np.zeros((n, cout_g * g, fh, fw), np.float32)
    for k in range(g):
        xg = x[:, k * cin_g : (k + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", xg, w[k * cin_g : (k + 1) * cin_g, :, i, j])
                full[:, k * cout_g : (k + 1) * cout_g, i * dh : i * dh + (h - 1) * sh + 1 : sh,
                     j * dw : j * dw + (wd - 1) * sw + 1 : sw] += contrib
    p = _ints(pad, 4, 0) if str(pad_type) == "custom" else [0, 0, 0, 0]
    if output_shape is not None:
        th, tw = _ints(output_shape)[2:]
        full = np.pad(full, [(0, 0), (0, 0), (0, max(0, p[0] + th - fh)), (0, max(0, p[2] + tw - fw))])
        out = full[:, :, p[0] : p[0] + th, p[2] : p[2] + tw]
    else:
        out = full[:, :, p[0] : fh - p[1], p[2] : fw - p[3]]
    if bias is not None:
        out = out + f32(bias)[None, :, None, None]
    return out


def _pool(kind):
    @_as_2d
    def run(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False,
            exclude_padding_from_average=False):
        x = f32(x)
        kh, kw = _ints(kernel_sizes)
        sh, sw = _ints(strides, 2)
        pads = _pads(x.shape[2:], (kh, kw), (sh, sw), str(pad_type), pad)
        if ceil_mode:
            extra = []
            for size, (a, b), k, s in zip(x.shape[2:], pads, (kh, kw), (sh, sw)):
                out = math.ceil((size + a + b - k) / s) + 1
                if (out - 1) * s >= size + a:  # the last window must start inside the input
                    out -= 1
                extra.append(max(0, (out - 1) * s + k - (size + a + b)))
            pads = [(a, b + e) for (a, b), e in zip(pads, extra)]
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=fill)
        oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        # one elementwise max / add per kernel offset over strided views: numpy's reductions over the
        # window axes of a sliding view are several times slower (GELU-free CNNs spend most time here)
        views = (v for _, _, v in _windows(xp, kh, kw, 1, 1, sh, sw, oh, ow))
        total = np.array(next(views), dtype=np.float32, copy=True)
        for v in views:
            (np.maximum if kind == "max" else np.add)(total, v, out=total)
        if kind == "max":
            return total
        if exclude_padding_from_average:
            ones = np.pad(np.ones(x.shape[2:], np.float32), pads)
            count = sliding_window_view(ones, (kh, kw))[::sh, ::sw].sum(axis=(-1, -2))
            return total / count
        return total / (kh * kw)

    return run


def _nearest(x, scale_factor_height=1, scale_factor_width=1):
    x = np.asarray(x)
    out = x
    for axis, s in ((-2, float(scale_factor_height)), (-1, float(scale_factor_width))):
        n = x.shape[axis]
        m = math.floor(n * s)
        idx = np.minimum(np.floor(np.arange(m) / s).astype(np.int64), n - 1)
        out = np.take(out, idx, axis=axis)
    return out


def _source(n, m, s, align_corners, half_pixel):
    dst = np.arange(m, dtype=np.float64)
    if align_corners:
        src = dst * ((n - 1) / (m - 1)) if m > 1 else np.zeros(m)
    elif half_pixel:
        src = (dst + 0.5) / s - 0.5
    else:
        src = dst / s
    return np.clip(src, 0, n - 1)


def _bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=True, half_pixel_centers=None):
    x = f32(x)
    half = (not bool(align_corners)) if half_pixel_centers is None else bool(half_pixel_centers)
    out = x
    for axis, s in ((-2, float(scale_factor_height)), (-1, float(scale_factor_width))):
        n = out.shape[axis]
        m = math.floor(n * s)
        src = _source(n, m, s, bool(align_corners), half)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = (src - lo).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = m
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def _grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source coordinates of MIL resize's sampling modes (coremltools' resize_bilinear notes)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            src = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            src = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        src = i * n_in / n_out
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        src = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        src = (i + 0.5) * n_in / n_out - 0.5
    else:
        raise ValueError(f"sampling mode {mode}")
    return np.clip(src, 0, n_in - 1)


def _resize(x, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    x = f32(x)
    if str(interpolation_mode) != "LINEAR":
        raise ValueError(f"resize interpolation {interpolation_mode} is not implemented")
    k = int(resized_dims)
    target = [int(v) for v in np.asarray(shape).reshape(-1)][-k:]
    out = x
    for axis, size in zip(range(x.ndim - k, x.ndim), target):
        n = out.shape[axis]
        m = size or n
        src = _grid(n, m, str(sampling_mode))
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = (src - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


OPS = {
    "resize": _resize,
    "matmul": _matmul,
    "linear": _linear,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "max_pool": _pool("max"),
    "avg_pool": _pool("avg"),
    "upsample_nearest_neighbor": _nearest,
    "upsample_bilinear": _bilinear,
}
