"""Ops with weights or windows: MatMul, Gemm, Conv, ConvTranspose, BatchNormalization, pooling, Resize."""

from __future__ import annotations

import numpy as np

from targets.coreml.lower.context import FP16_MAX, Context, LoweringError, attr_str, attrs, is_known
from targets.coreml.lower.registry import lowers


@lowers("MatMul")
def _matmul(ctx, node, ins):
    return [ctx.mb.matmul(x=ctx.var(ins[0]), y=ctx.var(ins[1]))]


@lowers("Gemm")
def _gemm(ctx, node, ins):
    a = attrs(node)
    x, w = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    y = ctx.mb.matmul(x=ctx.var(x), y=ctx.var(w), transpose_x=bool(a.get("transA", 0)),
                      transpose_y=bool(a.get("transB", 0)))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = ctx.mb.mul(x=y, y=ctx.float_np(alpha))
    if c is not None:
        if is_known(c):
            c = ctx.const(np.asarray(c, np.float32) * beta)
        elif beta != 1.0:
            c = ctx.mb.mul(x=c, y=ctx.float_np(beta))
        y = ctx.mb.add(x=y, y=c)
    return [y]


def _spatial(node, n: int) -> dict:
    """strides, dilations and MIL padding for an n-d window op."""
    a = attrs(node)
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dilations = [int(d) for d in a.get("dilations", [1] * n)]
    auto = attr_str(node, "auto_pad", "NOTSET")
    out = {"strides": np.array(strides, np.int32), "dilations": np.array(dilations, np.int32)}
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out["pad_type"] = "same" if auto == "SAME_UPPER" else "same_lower"
    elif auto == "VALID":
        out["pad_type"] = "valid"
    else:
        pads = [int(p) for p in a.get("pads", [0] * (2 * n))]
        mil = []
        for i in range(n):  # ONNX [b1, b2, e1, e2] -> MIL [b1, e1, b2, e2]
            mil += [pads[i], pads[i + n]]
        out["pad_type"] = "custom"
        out["pad"] = np.array(mil, np.int32)
    return out


def _window_check(node, deployment):
    auto = attr_str(node, "auto_pad", "NOTSET")
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"auto_pad {auto!r} is not supported"
    return None


@lowers("Conv", check=_window_check)
def _conv(ctx, node, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = ctx.rank(x) - 2
    kw = _spatial(node, n)
    kw["groups"] = int(attrs(node).get("group", 1))
    if b is not None:
        kw["bias"] = ctx.var(b)
    return [ctx.mb.conv(x=ctx.var(x), weight=ctx.var(w), **kw)]


@lowers("ConvTranspose", check=_window_check)
def _conv_transpose(ctx, node, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    a = attrs(node)
    n = ctx.rank(x) - 2
    kw = _spatial(node, n)
    kw["groups"] = int(a.get("group", 1))
    if "output_shape" in a or any(int(p) for p in a.get("output_padding", [])):
        xs = ctx.static_shape(x)
        ws = ctx.shape(w)
        if xs is None:
            raise LoweringError(node, "ConvTranspose with output_padding needs fixed input shapes")
        if "output_shape" in a:
            spatial = [int(s) for s in a["output_shape"]][-n:]
        else:
            op = [int(p) for p in a.get("output_padding", [0] * n)]
            pads = kw.get("pad", np.zeros(2 * n, np.int32))
            k = [(ws[2 + i] - 1) * int(kw["dilations"][i]) + 1 for i in range(n)]
            spatial = [int(kw["strides"][i]) * (xs[2 + i] - 1) + op[i] + k[i] - int(pads[2 * i]) - int(pads[2 * i + 1])
                       for i in range(n)]
        kw["output_shape"] = np.array([xs[0], ws[1] * kw["groups"], *spatial], np.int32)
    if b is not None:
        kw["bias"] = ctx.var(b)
    return [ctx.mb.conv_transpose(x=ctx.var(x), weight=ctx.var(w), **kw)]


@lowers("BatchNormalization")
def _batch_norm(ctx, node, ins):
    x, scale, bias, mean, var = ins[:5]
    if not all(is_known(v) for v in (scale, bias, mean, var)):
        raise LoweringError(node, "BatchNormalization needs constant statistics (training mode is not supported)")
    eps = float(attrs(node).get("epsilon", 1e-5))
    stats = [np.asarray(v, np.float32) for v in (scale, bias, mean, var)]
    if ctx.compute == "fp16" and max(float(np.abs(v).max(initial=0)) for v in stats) > FP16_MAX:
        # statistics beyond fp16 (paddle detectors carry variances of 1e8): the same normalisation
        # with them folded into the scale and shift in float32, so no constant saturates
        s, b, m, v = stats
        scale = s / np.sqrt(v + np.float32(eps))
        bias, mean, var = b - m * scale, np.zeros_like(m), np.full_like(v, 1 - eps)
    return [ctx.mb.batch_norm(x=x, mean=ctx.const(mean), variance=ctx.const(var), gamma=ctx.const(scale),
                              beta=ctx.const(bias), epsilon=ctx.float_np(eps))]


def _pool_check(node, deployment):
    why = _window_check(node, deployment)
    if why:
        return why
    if any(int(d) != 1 for d in attrs(node).get("dilations", [])):
        return "pooling with dilations is not supported"
    return None


@lowers("MaxPool", "AveragePool", check=_pool_check)
def _pool(ctx, node, ins):
    x = ins[0]
    a = attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise LoweringError(node, "MaxPool indices output is not supported")
    kernel = [int(k) for k in a["kernel_shape"]]
    kw = _spatial(node, len(kernel))
    kw.pop("dilations")
    kw["ceil_mode"] = bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        return [ctx.mb.max_pool(x=x, kernel_sizes=kernel, **kw)]
    exclude = not bool(a.get("count_include_pad", 0))
    return [ctx.mb.avg_pool(x=x, kernel_sizes=kernel, exclude_padding_from_average=exclude, **kw)]


@lowers("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx, node, ins):
    x = ins[0]
    axes = list(range(2, ctx.rank(x)))
    op = ctx.mb.reduce_mean if node.op_type == "GlobalAveragePool" else ctx.mb.reduce_max
    return [op(x=x, axes=axes, keep_dims=True)]


def _resize_check(node, deployment):
    mode = attr_str(node, "mode", "nearest")
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        return None
    if mode == "linear":
        if ctm not in ("align_corners", "half_pixel", "pytorch_half_pixel", "asymmetric"):
            return f"Resize linear with coordinate_transformation_mode {ctm!r} is not supported"
        return None
    return f"Resize mode {mode!r} is not supported"


_FIX_SHAPES = ("fix the input shapes (edgeq package --shape AXIS=N) so the sizes fold, "
               "or build for Android only (--targets android)")
# ONNX coordinate_transformation_mode -> MIL resize sampling_mode (coremltools' resize_bilinear notes)
_SAMPLING = {"half_pixel": "UNALIGN_CORNERS", "pytorch_half_pixel": "UNALIGN_CORNERS",
             "align_corners": "STRICT_ALIGN_CORNERS", "asymmetric": "DEFAULT"}


def _resize_to(ctx: Context, node, x, sizes):
    """Bilinear resize of the last two axes to sizes computed at run time (MIL iOS 17 ``resize``)."""
    if attr_str(node, "mode", "nearest") != "linear":
        raise LoweringError(node, "Resize nearest to sizes computed at run time is not supported", hint=_FIX_SHAPES)
    if is_known(sizes):
        hw = ctx.const(np.asarray(sizes, np.int64)[2:].astype(np.int32))
    else:
        hw = ctx.mb.slice_by_index(x=sizes, begin=np.array([2], np.int32), end=np.array([4], np.int32))
        hw = ctx.mb.cast(x=hw, dtype="int32") if ctx.np_dtype(hw) != np.int32 else hw
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    return ctx.mb.resize(x=x, shape=hw, resized_dims=np.uint32(2), interpolation_mode="LINEAR",
                         sampling_mode=_SAMPLING[ctm])


@lowers("Resize", check=_resize_check)
def _resize(ctx, node, ins):
    x = ins[0]
    scales = ins[2] if len(ins) > 2 and ins[2] is not None and (not is_known(ins[2]) or ins[2].size) else None
    sizes = ins[3] if len(ins) > 3 else None
    xs = ctx.shape(x)
    if ctx.rank(x) != 4:
        raise LoweringError(node, "Resize is lowered for 4-d NCHW tensors only")
    if scales is not None:
        if not is_known(scales):
            raise LoweringError(node, "Resize scales computed at run time are not supported")
        sh, sw = float(scales[2]), float(scales[3])
        if float(scales[0]) != 1 or float(scales[1]) != 1:
            raise LoweringError(node, "Resize of the batch or channel axis is not supported")
    elif sizes is not None and is_known(sizes) and xs[2] is not None and xs[3] is not None:
        sh, sw = int(sizes[2]) / xs[2], int(sizes[3]) / xs[3]
    elif sizes is not None:  # sizes known only at run time (e.g. a skip tensor's): iOS 17 resize
        return [_resize_to(ctx, node, x, sizes)]
    else:
        raise LoweringError(node, "Resize with scales computed at run time is not supported",
                            hint=_FIX_SHAPES)
    mode = attr_str(node, "mode", "nearest")
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        nearest = attr_str(node, "nearest_mode", "round_prefer_floor")
        if not (float(sh).is_integer() and float(sw).is_integer()):
            raise LoweringError(node, "Resize nearest with non-integer scales is not supported")
        if ctm != "asymmetric" and nearest not in ("floor", "round_prefer_ceil") and ctm not in ("half_pixel",):
            raise LoweringError(node, f"Resize nearest with {ctm}/{nearest} is not supported")
        return [ctx.mb.upsample_nearest_neighbor(x=x, scale_factor_height=sh, scale_factor_width=sw)]
    align = ctm == "align_corners"
    half = ctm in ("half_pixel", "pytorch_half_pixel")
    return [ctx.mb.upsample_bilinear(x=x, scale_factor_height=sh, scale_factor_width=sw, align_corners=align,
                                     half_pixel_centers=half)]
