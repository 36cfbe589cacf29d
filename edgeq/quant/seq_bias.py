"""Sequential bias correction: Conv/Gemm biases absorb the mean output shift of the *whole* quantization error.

:class:`~edgeq.quant.bias.BiasCorrectionHandler` cancels the mean shift that weight rounding causes,
``(Ŵ - W) · E[x]`` with the float input ``x``: it never sees activation rounding, nor the shift a layer
inherits from the quantized layers before it. With ``bias_correction = {sequential = true}`` this handler
then runs the quantized graph as the plan will write it (weight codes, activation Q/DQ, int32 biases) on
the calibration feeds and corrects the Conv/Gemm biases one at a time, in topological order: layer ``k``'s
output mean per channel is measured on the graph whose layers before ``k`` are already corrected, and
``bias_k += E[float output] - E[quantized output]`` (an int32 bias is requantized at its own scale
``s_in · s_w``). One build measures it once, on its first target's quantized graph, and every target's
package carries the same integers. Correcting every layer at once from one measurement over-corrects, since
most of a layer's shift is inherited from upstream: EfficientNet-Lite1 held-out logit SQNR 20.7 dB → 4.4 dB
at once, 22.0 dB in order (notes/zoo6.md).

Cost: the graph is cut after the corrected layers into segments (a cut keeps every tensor still needed
later, for every calibration feed, in memory, at most :data:`CUT_BYTES`); each layer's measurement runs
only its own segment's nodes from the cut before it, so the whole correction costs a few passes of the
quantized graph, not one per layer (ONNX Runtime computes every node of a session whatever is fetched).
EfficientNet-Lite1, 200 calibration crops of 240 px: 65 layers in 57 s on 2 cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.errors import EdgeqError
from edgeq.graph import drop_if_unused, nodes_by_name
from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result, fingerprint
from edgeq.quant.bias import BIAS_LIMIT, correction_sites
from edgeq.quant.plan import AlgorithmResult, IntegerBias, QuantPlan
from edgeq.quant.stats import ChannelMean

# A cut (the tensors later layers still need, kept for every calibration feed) is taken after a corrected
# layer only when it fits in this many bytes; else the segment goes on to the next layer. EfficientNet-Lite1,
# 200 feeds of 240 px: the cuts after the project Convs (16-24 channels) fit, those after the 96-channel
# expand Convs at 120 px (1.1 GB) do not.
CUT_BYTES = 512 * 2**20


@dataclass
class _Site:
    """One corrected Conv/Gemm: where its bias enters the quantized graph and what it is now."""

    node: str
    output: str
    bias_input: str  # the graph input that carries its bias (int32 codes, or the float bias)
    target: np.ndarray  # E[float output] per channel
    bias: np.ndarray  # float64: the bias the graph computes with (int32 codes × scale, or the float bias)
    scale: np.ndarray | None = None  # int32 bias: its scale s_in · s_w per channel (float32)
    data: np.ndarray | None = None  # int32 bias: its codes
    shift_before: float = 0.0  # mean |E[float] - E[quantized]| over channels when it was measured
    clipped: int = 0  # channels left at their previous int32 code (the correction would pass the int32 limit)

    def feed(self) -> np.ndarray:
        return self.data if self.data is not None else self.bias.astype(np.float32)

    def add(self, delta: np.ndarray) -> np.ndarray:
        """Move the bias by ``delta`` (per channel); returns the change the graph really sees (int32 rounding)."""
        if self.data is None:
            new = self.bias + delta
        else:
            scale = self.scale.astype(np.float64)
            codes = np.rint((self.bias + delta) / scale)
            # a near-dead channel's weight scale was raised so its bias sits right at the limit (integer_bias)
            fits = np.abs(codes) <= np.maximum(BIAS_LIMIT, np.abs(self.data))
            self.clipped = int(np.sum(~fits))
            self.data = np.where(fits, codes, self.data).astype(np.int32)
            new = self.data.astype(np.float64) * scale
        step, self.bias = new - self.bias, new
        return step


def sequential_sites(ctx: Context, plan: QuantPlan) -> dict[str, str]:
    """node -> its output tensor, for the Conv/Gemm biases the recipe corrects sequentially."""
    nodes = ctx.nodes()
    out = {}
    for n in correction_sites(ctx.model, plan):
        cfg = ctx.settings(n).bias_correction
        if cfg is not None and cfg.sequential:
            out[n] = nodes[n].outputs[0].name
    return out


class SequentialBiasCorrection(Algorithm):
    """Sequential bias correction on the quantized graph (``bias_correction = {sequential = true}``)."""

    name = "sequential_bias_correction"

    def enabled(self, recipe) -> bool:
        return any(a.bias_correction is not None and a.bias_correction.sequential for a in recipe._all_algorithms())

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        # the float means of every Conv/Gemm output with a constant bias: the plan's weight list is not known
        # yet when the main pass is gathered, so the sites are found from the graph
        nodes = ctx.nodes()
        out = []
        for n in ctx.model.graph:
            if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2 and n.inputs[2] is not None \
                    and n.inputs[2].const_value is not None:
                cfg = ctx.settings(nodes[n.name]).bias_correction
                if cfg is not None and cfg.sequential:
                    out.append(Request("mean", n.outputs[0].name, ChannelMean))
        return out

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        sites = sequential_sites(ctx, plan)
        targets = {n: stats.get("mean", t) for n, t in sites.items()}
        sites = {n: t for n, t in sites.items() if targets[n] is not None}
        if not sites:
            return self.skipped(plan, "nothing to do: no Conv/Gemm with a constant bias, quantized weights and a "
                                      "channel mean at its output")
        if ctx.calib_feeds is None or ctx.write_qdq is None:
            return self.skipped(plan, "not run — the calibration feeds are not available to this step")
        # One plan per build: every target carries the same integers. Targets whose plans start from the same
        # weight codes and biases share the correction measured on the first one's quantized graph (Core ML
        # targets quantize fewer activations than ONNX Runtime's: EfficientNet-Lite1 64 of android's 80).
        key = ("sequential_bias", _start_fingerprint(ctx, plan, sites))
        hits = ctx.memo.hits
        try:
            found = ctx.memo.get(key, lambda: (*_correct(*_quantized_graph(ctx, plan, sites, targets), ctx),
                                               plan.profile))
        except (EdgeqError, ValueError, RuntimeError) as e:  # ORT fails on a segment (e.g. an If's outer reads)
            from edgeq.errors import first_line

            return self.skipped(plan, f"not run — the quantized graph could not be run in segments: {first_line(e)}")
        order, segments, feeds, seconds, measured_on = found
        biases = dict(plan.biases)
        integer = {b.node: b for b in plan.integer_biases}
        for s in order:
            biases[s.node] = s.bias.astype(np.float32)
            if s.data is not None:
                integer[s.node] = IntegerBias(s.node, s.data.copy(), integer[s.node].scale)
        before = float(np.mean([s.shift_before for s in order]))
        clipped = sum(s.clipped for s in order)
        where = f"as measured on {measured_on}'s quantized graph (the same integers in every package)" \
            if ctx.memo.hits > hits else "on the quantized graph"
        summary = (f"{len(order)} Conv/Gemm biases corrected in order {where}; {feeds} calibration feeds, "
                   f"{segments} segments, {seconds:.1f} s; mean |output shift| {before:.3g} before correction"
                   + (f"; {clipped} channels kept (int32 limit)" if clipped else ""))
        details = tuple(f"{s.node}: |shift| {s.shift_before:.3g}" for s in
                        sorted(order, key=lambda s: -s.shift_before)[:5])
        plan = replace(plan, biases=MappingProxyType(biases),
                       integer_biases=tuple(integer.get(b.node, b) for b in plan.integer_biases))
        return add_result(plan, AlgorithmResult(self.name, summary, nodes=tuple(s.node for s in order),
                                                details=details))


def _start_fingerprint(ctx: Context, plan: QuantPlan, sites: dict[str, str]) -> str:
    """What the correction starts from: the recipe, every weight's codes and each site's bias (int32 codes and
    scale, or float). The profile is left out on purpose (targets of one build share the correction); the recipe
    is in (a budget search's quantizations differ by their rules, e.g. where activations stay float)."""
    nodes = ctx.nodes()
    integer = {b.node: b for b in plan.integer_biases}
    parts = [repr(ctx.recipe)]
    for d in plan.weights:
        q = plan.codes.get(d.weight)
        if q is not None:
            parts += [d.weight, q.data, np.asarray(q.scale)]
    for n in sorted(sites):
        ib = integer.get(n)
        start = (ib.data, ib.scale) if ib is not None else (plan.biases.get(n, nodes[n].inputs[2].const_value.numpy()),)
        parts += [n, *[np.asarray(a) for a in start]]
    return fingerprint(*parts)


def _quantized_graph(ctx: Context, plan: QuantPlan, sites: dict[str, str], targets: dict[str, np.ndarray]
                     ) -> tuple[onnx.ModelProto, list[_Site]]:
    """The quantized graph as the plan writes it (``ctx.model`` already has the plan's rewrites) with every
    corrected bias a graph input, and the sites in topological order."""
    qdq = ctx.write_qdq(ctx.model, plan)
    graph = qdq.graph
    nodes = nodes_by_name(graph)
    integer = {b.node: b for b in plan.integer_biases}
    found = []
    for name, output in sites.items():
        node = nodes[name]
        b = node.inputs[2]
        dq = b.producer()
        ib = integer.get(name)
        input_name = f"{name}/sequential_bias"
        if ib is not None and dq is not None and dq.op_type == "DequantizeLinear":
            inp = ir.Value(name=input_name, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(list(ib.data.shape)))
            old = dq.inputs[0]
            dq.replace_input_with(0, inp)
            drop_if_unused(graph, old)
            site = _Site(name, output, input_name, targets[name], ib.data.astype(np.float64) * ib.scale,
                         ib.scale, ib.data.copy())
        else:
            value = b.const_value.numpy().astype(np.float64)
            inp = ir.Value(name=input_name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(value.shape)))
            node.replace_input_with(2, inp)
            drop_if_unused(graph, b)
            site = _Site(name, output, input_name, targets[name], value)
        graph.inputs.append(inp)
        found.append(site)
    graph.sort()
    position = {n.name: i for i, n in enumerate(graph)}
    found.sort(key=lambda s: position[s.node])
    proto = ir.to_proto(qdq)
    proto = onnx.shape_inference.infer_shapes(proto)
    return proto, found


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, those its subgraphs (If / Loop bodies) read from outside included."""
    names = [n for n in node.input if n]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
            names += [n for sub in g.node for n in _reads(sub) if n not in inner]
    return names


class _Graph:
    """Which tensors are live (produced, and still read by a node some later site needs) after each node."""

    def __init__(self, proto: onnx.ModelProto, sites: list[_Site]):
        g = proto.graph
        self.nodes = list(g.node)
        inits = {i.name for i in g.initializer}
        self.producer = {i.name: -1 for i in g.input if i.name not in inits}
        self.producer.update({o: k for k, n in enumerate(self.nodes) for o in n.output if o})
        self.position = {s.node: self.producer[s.output] for s in sites}
        need, stack = set(), [self.producer[s.output] for s in sites]
        while stack:
            k = stack.pop()
            if k < 0 or k in need:
                continue
            need.add(k)
            stack += [self.producer[t] for t in _reads(self.nodes[k]) if t in self.producer]
        self.last_read: dict[str, int] = {}
        for k in sorted(need):
            for t in _reads(self.nodes[k]):
                if t in self.producer:
                    self.last_read[t] = max(self.last_read.get(t, -1), k)

    def live(self, after: int, bias_inputs: set[str]) -> list[str]:
        """The tensors produced at or before node ``after`` (-1: the graph inputs) and read after it."""
        return sorted(t for t, last in self.last_read.items()
                      if self.producer[t] <= after < last and t not in bias_inputs)


def _session(extractor: onnx.utils.Extractor, inputs: list[str], outputs: list[str]):
    import onnxruntime as ort

    from edgeq.runtime import ort_session

    part = extractor.extract_model(inputs, outputs)
    so = ort.SessionOptions()
    # constant folding only: the Q/DQ pairs run as written (float emulation of the integer kernels, as the
    # QDQ file's own validation does), and a fetched Conv output is never fused into its neighbours
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort_session(part.SerializeToString(), options=so, what="a segment of the quantized graph", spin=False)


def _run(sess, outputs: list[str], feed: dict, upto: str) -> list[np.ndarray]:
    try:
        return sess.run(outputs, feed)
    except Exception as e:  # ORT's errors are plain Exceptions
        from edgeq.runtime import ort_run_failure

        raise RuntimeError(f"the graph up to {upto} fails in ONNX Runtime: {ort_run_failure(e)}") from e


def _channel_sum(x: np.ndarray) -> np.ndarray:
    """Per axis-1 channel sums over the batch and every position (the float means' ChannelMean axis)."""
    return np.add.reduce(x.reshape(x.shape[0], x.shape[1], -1), axis=(0, 2), dtype=np.float64)


def _correct(proto: onnx.ModelProto, sites: list[_Site], ctx: Context):
    """Correct every site in order; returns (sites, segments, calibration feeds, seconds). Each site is one run of
    its segment's nodes up to it, over every feed."""
    t0 = time.perf_counter()
    feeds = ctx.calib_feeds()
    if not feeds:
        raise ValueError("no calibration feeds left to read (an iterator of feeds is read once: pass a list)")
    graph = _Graph(proto, sites)
    extractor = onnx.utils.Extractor(proto)
    bias_inputs = {s.bias_input for s in sites}
    # bytes per feed of each candidate cut, from the first feed (cut after site i)
    live = {s.node: graph.live(graph.position[s.node], bias_inputs) for s in sites}
    inputs0 = graph.live(-1, bias_inputs)
    probe = sorted({t for names in live.values() for t in names} - set(inputs0))
    sizes = {t: np.asarray(feeds[0][t]).nbytes for t in inputs0}
    if probe:
        sess = _session(extractor, inputs0 + sorted(bias_inputs), probe)
        got = _run(sess, probe, {**{t: feeds[0][t] for t in inputs0}, **{s.bias_input: s.feed() for s in sites}},
                   sites[-1].node)
        sizes.update({t: a.nbytes for t, a in zip(probe, got)})
        del sess, got
    cut_names, cut_at = inputs0, -1
    cut = [{t: f[t] for t in inputs0} for f in feeds]
    del feeds
    segments = 1
    segment: list[_Site] = []
    for i, site in enumerate(ctx.bar(sites, "sequential bias correction", "layer")):
        segment.append(site)
        end = graph.position[site.node]
        last = i == len(sites) - 1
        take_cut = not last and sum(sizes[t] for t in live[site.node]) * len(cut) <= CUT_BYTES
        new_names = [t for t in live[site.node] if graph.producer[t] > cut_at] if take_cut else []
        outputs = [site.output] + [t for t in new_names if t != site.output]
        seg_inputs = cut_names + [s.bias_input for s in segment]
        sess = _session(extractor, seg_inputs, outputs)
        biases = {s.bias_input: s.feed() for s in segment}
        total, count, kept = 0.0, 0, []
        for f in cut:
            got = _run(sess, outputs, {**f, **biases}, site.node)
            y = got[0]
            total = total + _channel_sum(y)
            count += y.size // y.shape[1]
            if take_cut:
                kept.append(dict(zip(outputs, got)))
        del sess
        shift = site.target - total / max(count, 1)
        site.shift_before = float(np.mean(np.abs(shift)))
        step = site.add(shift)
        if take_cut:  # the next segment starts here: carry the tensors made before, correct the site's output
            for f, k in zip(cut, kept):
                if site.output in k:
                    y = k[site.output]
                    k[site.output] = (y + step.reshape(1, -1, *([1] * (y.ndim - 2)))).astype(y.dtype)
                for t in live[site.node]:
                    if t not in k:
                        k[t] = f[t]
                for t in list(k):
                    if t not in live[site.node]:
                        del k[t]
            cut, cut_names, cut_at, segment = kept, live[site.node], end, []
            segments += 1
    return sites, segments, len(cut), time.perf_counter() - t0
