"""Biases, decided from the weight codes: bias correction, and W8A8's int32 biases.

- *Bias correction* (Nagel et al., 2019, "Data-Free Quantization", empirical form): a Conv or
  Gemm with a constant bias gets ``b - (Ŵ - W) · E[x]``, so quantizing the weight does not shift
  the output's mean; ``E[x]`` from the calibration data, for a Conv per input channel *and kernel
  tap* over the output positions, the zero padding included (:class:`TapMean`): on silero-vad's
  encoder (kernel 3, padding 1, 4 frames per window) half the outputs read a padded zero at one
  tap, and a per-channel mean over-corrected them (speech-probability cosine 0.9889 with the
  correction, 0.9925 without it, 0.9969 with per-tap means; SQNR 17.6 / 19.4 / 22.2 dB).
- *int32 biases* (W8A8): a Conv or Gemm whose input is quantized (scale ``s_in``) and whose weight
  is int8 (scale ``s_w`` per channel) stores its bias as ``int32`` at scale ``s_in · s_w``, the form
  ONNX Runtime folds into QLinearConv / QGemm. A near-dead channel (tiny weights, real bias) would
  need a bias past int32 — ORT would clip it — so that channel's weight scale is raised until the
  bias fits and its codes are requantized (recorded); a bias that still cannot fit stays float.

Both run after every weight has its codes (:mod:`edgeq.quant.handlers` orders them last).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from edgeq.quant import formats
from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result
from edgeq.quant.plan import AlgorithmResult, IntegerBias, NodeNote, QuantPlan, WeightDecision
from edgeq.quant.recipes import BiasCorrectionConfig, IntegerBiasConfig
from edgeq.quant.stats import ChannelMean

INT32_MAX = 2**31 - 1
BIAS_LIMIT = 2**30  # int32 biases stay below this: headroom for the accumulation on top


class TapMean:
    """``E[x]`` per input channel and kernel tap of a Conv: the mean over batch and output positions of the
    input value each tap reads, a padded position reading 0. ``[C, *kernel]``; None if the input's rank
    does not fit the kernel."""

    def __init__(self, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...],
                 pads: tuple[int, ...] | None, auto_pad: str = "NOTSET"):
        self.kernel, self.strides, self.dilations, self.pads, self.auto_pad = kernel, strides, dilations, pads, auto_pad
        self._sum: np.ndarray | None = None
        self._count = 0
        self.unusable = False

    def _taps(self, size: int, a: int) -> tuple[int, list[np.ndarray]]:
        """Output positions along spatial axis ``a`` of length ``size``, and the input indices each tap reads there."""
        k, s, d = self.kernel[a], self.strides[a], self.dilations[a]
        span = d * (k - 1) + 1
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
            total = max((out - 1) * s + span - size, 0)
            begin = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin = 0 if self.pads is None or self.auto_pad == "VALID" else self.pads[a]
            end = 0 if self.pads is None or self.auto_pad == "VALID" else self.pads[a + len(self.kernel)]
            out = (size + begin + end - span) // s + 1
        reads = []
        for t in range(k):
            i = np.arange(max(out, 0)) * s + t * d - begin
            reads.append(i[(i >= 0) & (i < size)])
        return max(out, 0), reads

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if self.unusable or x.ndim != len(self.kernel) + 2:
            self.unusable = True
            return
        total = np.add.reduce(x, axis=0, dtype=np.float64)  # [C, *spatial]: the batch summed first
        geo = [self._taps(x.shape[2 + a], a) for a in range(len(self.kernel))]
        part = np.empty((x.shape[1], *self.kernel))
        for taps in np.ndindex(*self.kernel):
            sub = total
            for a, t in enumerate(taps):
                sub = np.take(sub, geo[a][1][t], axis=1 + a)
            part[(slice(None), *taps)] = sub.reshape(sub.shape[0], -1).sum(axis=1)
        if self._sum is not None and self._sum.shape != part.shape:
            self.unusable = True
            return
        self._sum = part if self._sum is None else self._sum + part
        self._count += x.shape[0] * int(np.prod([o for o, _ in geo]))

    def result(self) -> np.ndarray | None:
        if self._sum is None or self.unusable or not self._count:
            return None
        return self._sum / self._count

    def state_nbytes(self) -> int:
        return 0 if self._sum is None else self._sum.nbytes


def tap_mean_for(node: ir.Node) -> TapMean:
    """A :class:`TapMean` with the geometry of ``node``, a Conv with a constant weight (a correction site)."""
    w = node.inputs[1].const_value
    kernel = tuple(int(k) for k in w.shape[2:])
    ones = (1,) * len(kernel)
    pads = node.attributes.get_ints("pads", None)
    return TapMean(kernel, tuple(node.attributes.get_ints("strides", ones)),
                   tuple(node.attributes.get_ints("dilations", ones)),
                   tuple(pads) if pads is not None else None, node.attributes.get_string("auto_pad", "NOTSET"))


def correction_sites(model: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """node -> the input tensor whose channel means bias correction needs (Conv/Gemm with a constant bias)."""
    nodes = {n.name: n for n in model.graph}
    out = {}
    for d in plan.weights:
        n = nodes[d.node]
        if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2 and n.inputs[2] is not None \
                and n.inputs[2].const_value is not None and n.inputs[0] is not None and n.inputs[0].const_value is None:
            out[d.node] = n.inputs[0].name
    return out


def corrected_bias(node: ir.Node, w: np.ndarray, q: formats.QuantizedTensor, d: WeightDecision,
                   mean: np.ndarray) -> np.ndarray | None:
    """``b - (Ŵ - W) · E[x]`` for one Conv/Gemm (``w`` as stored in the graph), or None where it does not apply."""
    b = node.inputs[2]
    delta = q.dequantize().astype(np.float64)
    if d.transpose:
        delta = delta.T
    delta -= w
    mu = mean.astype(np.float64)
    if node.op_type == "Gemm":
        shift = delta @ mu if node.attributes.get_int("transB", 0) else mu @ delta
    else:  # mean: [C] per channel, or [C, *kernel] per channel and tap (TapMean)
        groups = node.attributes.get_int("group", 1)
        out_ch, in_per_group = delta.shape[:2]
        if mu.shape[0] != in_per_group * groups or mu.ndim not in (1, delta.ndim - 1) or \
                mu.ndim > 1 and mu.shape[1:] != delta.shape[2:]:
            return None
        group_of = np.arange(out_ch) // (out_ch // groups)
        mu_g = mu.reshape(groups, in_per_group, -1)[group_of]  # [O, I/g, taps or 1]
        shift = (delta.reshape(out_ch, in_per_group, -1) * mu_g).sum(axis=(1, 2))
    bias = b.const_value.numpy().astype(np.float64)
    if shift.shape != bias.shape:
        return None
    return (bias - shift).astype(np.float32)


class BiasCorrectionHandler(Algorithm):
    """Bias correction (config :class:`~edgeq.quant.recipes.BiasCorrectionConfig`)."""

    name = "bias_correction"
    config_type = BiasCorrectionConfig

    def _sites(self, ctx: Context, plan: QuantPlan) -> dict[str, str]:
        return {n: t for n, t in correction_sites(ctx.model, plan).items() if ctx.settings(n).bias_correction is not None}

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        nodes = ctx.nodes()
        out = []
        for n, t in sorted(self._sites(ctx, plan).items()):
            if nodes[n].op_type == "Conv":
                out.append(Request(f"taps/{n}", t, lambda node=nodes[n]: tap_mean_for(node)))
            else:
                out.append(Request("mean", t, ChannelMean))
        return out

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        sites = self._sites(ctx, plan)
        if not sites:
            return self.skipped(plan, "nothing to do: no Conv/Gemm with a constant bias and quantized weights")
        nodes = ctx.nodes()
        biases = dict(plan.biases)
        for d in plan.weights:
            t = sites.get(d.node)
            mean = None if t is None else stats.get(f"taps/{d.node}" if nodes[d.node].op_type == "Conv" else "mean", t)
            if mean is None:
                continue
            node = nodes[d.node]
            w = node.inputs[d.input_index].const_value.numpy().astype(np.float32)
            b = corrected_bias(node, w, plan.codes[d.weight], d, mean)
            if b is not None:
                biases[d.node] = b
        done = [n for n in biases if n not in plan.biases]
        result = AlgorithmResult(self.name, f"{len(done)} of {len(sites)} Conv/Gemm biases absorb the mean output "
                                            "error of weight rounding", nodes=tuple(done))
        return add_result(replace(plan, biases=MappingProxyType(biases)), result)


class IntegerBiasHandler(Algorithm):
    """W8A8 int32 biases, with near-dead channels' weight scales raised (config :class:`~edgeq.quant.recipes.IntegerBiasConfig`)."""

    name = "integer_bias"
    config_type = IntegerBiasConfig
    needs_data = False

    def enabled(self, recipe) -> bool:
        return recipe.quantizes_activations and super().enabled(recipe)

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        graph = ctx.model.graph
        values = {v.name: v for v in graph.inputs}
        values.update({o.name: o for n in graph for o in n.outputs})
        nodes = ctx.nodes()
        s_in_of: dict[str, float] = {}  # consumer reading a quantized activation at input 0 -> its scale
        for a in plan.activations:
            x = values.get(a.tensor)
            for c in a.consumers:
                node = nodes[c]
                if node.inputs and node.inputs[0] is x:
                    s_in_of[c] = a.scale
        codes = dict(plan.codes)
        weight_of = {d.node: d.weight for d in plan.weights if d.input_index == 1}
        integer: list[IntegerBias] = []
        raised: list[NodeNote] = []
        kept_float: list[NodeNote] = []
        for name, s_in in s_in_of.items():
            node = nodes[name]
            if node.op_type not in ("Conv", "Gemm") or len(node.inputs) <= 2 or node.inputs[2] is None:
                continue
            q = codes.get(weight_of.get(name, ""))
            bias = plan.biases.get(name)
            if bias is None and node.inputs[2].const_value is not None:
                bias = node.inputs[2].const_value.numpy().astype(np.float32)
            if bias is None or q is None or q.dtype != "int8" or q.block_size is not None:
                continue
            s_w = q.scale.astype(np.float32)
            need = np.abs(bias.astype(np.float64)) / (float(np.float32(s_in)) * BIAS_LIMIT)
            if np.any(need > s_w):
                cfg = ctx.settings(node).integer_bias
                q = _raise_scale(q, need) if cfg is not None and cfg.raise_scales else None
                if q is None:
                    kept_float.append(NodeNote(name, "", "bias kept float: it does not fit int32 at scale s_in*s_w"))
                    continue
                count = int(np.sum(q.scale.reshape(-1) > codes[weight_of[name]].scale.reshape(-1)))
                codes[weight_of[name]] = q
                s_w = q.scale.astype(np.float32)
                raised.append(NodeNote(name, "", f"weight scale raised on {count} channel(s) so the int32 bias fits "
                                                 "(near-dead channels)"))
            scale = (np.float32(s_in) * s_w).astype(np.float32)
            if scale.size == 1:
                scale = np.full(bias.shape, scale.reshape(()), np.float32)
            data = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
            if np.abs(data).max(initial=0) > INT32_MAX:
                kept_float.append(NodeNote(name, "", "bias kept float: it does not fit int32 at scale s_in*s_w"))
                continue
            integer.append(IntegerBias(name, data.astype(np.int32), scale))
        summary = f"{len(integer)} Conv/Gemm biases stored as int32" + (
            f"; weight scales raised on {len(raised)} layers so their biases fit" if raised else "") + (
            f"; {len(kept_float)} kept float" if kept_float else "")
        plan = replace(plan, codes=MappingProxyType(codes), integer_biases=tuple(integer),
                       notes=plan.notes + tuple(raised), floats=plan.floats + tuple(kept_float))
        return add_result(plan, AlgorithmResult(self.name, summary, nodes=tuple(b.node for b in integer),
                                                ran=bool(integer)))


def _raise_scale(q: formats.QuantizedTensor, need: np.ndarray) -> formats.QuantizedTensor | None:
    """``q`` (int8) with its scale raised to at least ``need`` per channel and its codes requantized from the old codes."""
    codes = q.data.astype(np.float64)
    old = q.scale.astype(np.float64)
    if old.size == 1:
        new = np.array(max(float(old.reshape(())), float(need.max())), np.float32)
        shape = ()
    else:
        if old.shape != need.shape:
            return None
        new = np.maximum(old, need).astype(np.float32)
        shape = [1] * codes.ndim
        shape[q.axis] = -1
    requantized = np.clip(np.rint(codes * old.reshape(shape) / new.astype(np.float64).reshape(shape)), -127, 127)
    return formats.QuantizedTensor(requantized.astype(np.int8), new, q.zero_point, q.axis, None, "int8")
