"""Recurrent layers checked on their own outputs: each LSTM/GRU/RNN gets the cheapest int8 weight form that
keeps the layer faithful, else float weights, by measurement.

A recurrent layer feeds its output back through its weights at every step, so a weight error that
is small for a feed-forward layer can grow over a sequence. resemblyzer's GE2E speaker encoder
(3 LSTM layers over 160 linear-mel frames) is the case measured. Its first layer's input weights
``W [1024, 40]`` span 7..61 across the mel bands: the quiet high bands (rms 0.001-0.03) carry the large
weights that set each row's int8 step, while 80 % of the rounding error comes from the loud low
bands (rms 1.0-2.5), whose small weights get few levels. Per-row codes (42 dB on the weights, 40.9 dB on
the gate pre-activations at the first step) leave the layer's own output at 16.6 dB after one step
(an absolute gate error of ~0.03 against outputs of rms 0.07) and 8.1 dB after 160 (the recurrence
adds ~8 dB); the embedding falls to 11.8 dB. Finer steps cannot rescue that weight: blocks of 8
along the input give the layer 27.9 dB, equalising the input bands (``x / s``, ``W · s``, s = band
rms) 21.7 dB. Its recurrent weights ``R`` are fine alone per row (32.4 dB with W float) but still
cost the model its cosine gate (0.99894 < 0.999 for w8a16); in blocks of 32 along the hidden axis
they give 38.5 dB and the model 30.2 dB / 0.99953. Layers 2 and 3 keep 37.8 / 38.7 dB per row,
silero-vad's LSTM 36.7 dB over its sequences.

So after the codes are chosen, each recurrent node with int8 weights is run alone (ONNX Runtime,
the one node) on the inputs calibration recorded for it, with its float weights and with the
dequantized codes, trying cheaper forms first (:meth:`RecurrentCheck._forms`): per-row codes (as planned); all
weights in int8 blocks of :data:`BLOCK` along the reduction axis (a scale per direction, row and
block: +12.5 % bytes on those weights); one weight float and the others in blocks (the largest
weights kept int8 first); all float. The first form whose outputs reach :data:`MIN_LAYER_SQNR_DB`
is kept, with the measured numbers as the reason (ONNX Runtime runs these layers in float either
way: the int8 weights only save file size).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result
from edgeq.quant.plan import AlgorithmResult, NodeNote, QuantPlan, WeightDecision
from edgeq.quant.recipes import WeightFormat
from edgeq.quant.weights import quantize_weight
from edgeq.validate.metrics import sqnr_db

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# A layer's own output (all steps, final states) against float: GE2E layer 1 per-row int8 8.9 dB
# (model 11.8 dB, fails), layers 2-3 37.8 / 38.7 dB, silero-vad 36.7 dB (models within their gates).
# 30 dB leaves the rest of the model room under the w8a16 floor (25 dB) and the w8a8 floor (15 dB).
MIN_LAYER_SQNR_DB = 30.0
# Blocks along the reduction axis for a layer per-row codes break (MatMulNBits' default block).
BLOCK = 32
_WHICH = {1: "W", 2: "R"}  # the weights of LSTM/GRU/RNN by input index
MAX_SAMPLE_VALUES = 1 << 22  # per recorded input (16 MB of float32; the first batch always): enough to judge
_RUNTIME_INPUTS = (0, 4, 5, 6)  # X, sequence_lens, initial_h, initial_c (LSTM; GRU/RNN stop at 5)


class Samples:
    """The batches a tensor took during calibration, up to :data:`MAX_SAMPLE_VALUES` values."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.values = 0
        self.full = False

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if self.full or self.values + x.size > MAX_SAMPLE_VALUES and self.batches:
            self.full = True
            return
        self.batches.append(np.array(x, copy=True))
        self.values += x.size

    def state_nbytes(self) -> int:
        return sum(b.nbytes for b in self.batches)

    def result(self) -> list[np.ndarray] | None:
        return self.batches or None


def _runtime_inputs(node: ir.Node) -> list[tuple[int, ir.Value]]:
    """The inputs of a recurrent node that come from the graph at run time (X, lengths, initial states)."""
    return [(i, node.inputs[i]) for i in _RUNTIME_INPUTS
            if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].const_value is None]


def _layer_outputs(node: ir.Node, weights: dict[int, np.ndarray], feeds: list[dict[int, np.ndarray]]) -> np.ndarray:
    """All outputs of ``node`` run alone in ONNX Runtime with ``weights`` (input index -> array) over ``feeds``."""
    import onnx
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from edgeq.runtime import ort_session

    names, inits, dynamic = [], [], []
    for i, v in enumerate(node.inputs):
        if v is None:
            names.append("")
        elif i in weights or v.const_value is not None:
            arr = weights[i] if i in weights else v.const_value.numpy()
            names.append(f"c{i}")
            inits.append(nh.from_array(np.asarray(arr), f"c{i}"))
        else:
            names.append(f"x{i}")
            dynamic.append(i)
    attrs = {a.name: a.value for a in node.attributes.values()}
    outs = ["y", "y_h", "y_c"][: len(node.outputs)]
    graph = oh.make_graph([oh.make_node(node.op_type, names, outs, **attrs)], "layer",
                          [oh.make_tensor_value_info(f"x{i}", onnx.helper.np_dtype_to_tensor_dtype(feeds[0][i].dtype), None)
                           for i in dynamic],
                          [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    sess = ort_session(model.SerializeToString(), what=f" (recurrent node {node.name} alone)")
    return np.concatenate([np.concatenate([r.reshape(-1) for r in sess.run(None, {f"x{i}": f[i] for i in dynamic})])
                           for f in feeds])


def _blocked(d: WeightDecision) -> WeightDecision:
    """``d`` as int8 in blocks of :data:`BLOCK` along the reduction (last) axis of ``W``/``R``."""
    return replace(d, axis=len(d.shape) - 1, block=BLOCK)


class RecurrentCheck(Algorithm):
    """Run each recurrent node with int8 weights alone on its calibration inputs; keep the cheapest weight form
    (per row, blocks, some weights float) that meets the floor."""

    name = "recurrent_check"

    def _nodes(self, ctx: Context, plan: QuantPlan) -> dict[str, ir.Node]:
        int8 = {d.node for d in plan.weights if d.op_type in RECURRENT_OPS and d.format == WeightFormat.INT8}
        return {n.name: n for n in ctx.model.graph if n.name in int8}

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        return [Request("samples", v.name, Samples) for n in self._nodes(ctx, plan).values()
                for _, v in _runtime_inputs(n)]

    def _forms(self, node: ir.Node, ours: list[WeightDecision], codes: dict):
        """The candidate forms, cheapest first: (label, decisions kept, their codes); weights not listed stay float."""
        yield "int8 per row", ours, {d.weight: codes[d.weight] for d in ours}
        blocked = [_blocked(d) for d in ours]
        block_codes = {d.weight: quantize_weight(node.inputs[d.input_index].const_value.numpy().astype(np.float32), d)
                       for d in blocked}
        yield f"int8 blocks of {BLOCK}", blocked, block_codes
        if len(ours) > 1:  # one weight float, the largest weights first kept int8
            for gone in sorted(blocked, key=lambda d: int(np.prod(d.shape))):
                kept = [d for d in blocked if d is not gone]
                yield f"{_WHICH.get(gone.input_index, gone.weight)} float, the rest int8 blocks of {BLOCK}", kept, \
                    {d.weight: block_codes[d.weight] for d in kept}

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        nodes = self._nodes(ctx, plan)
        if not nodes:
            return self.skipped(plan, "nothing to do: no LSTM/GRU/RNN with int8 weights")
        checked, changed, details = {}, {}, []
        for name, node in nodes.items():
            inputs = _runtime_inputs(node)
            recorded = [stats.get("samples", v.name) for _, v in inputs]
            if not inputs or any(r is None for r in recorded) or len({len(r) for r in recorded}) != 1:
                details.append(f"{name}: not checked (its inputs were not recorded in calibration)")
                continue
            feeds = [{i: r[b] for (i, _), r in zip(inputs, recorded)} for b in range(len(recorded[0]))]
            ours = [d for d in plan.weights if d.node == name and d.weight in plan.codes]
            if not ours:
                continue
            ref = _layer_outputs(node, {}, feeds)
            tried = []
            for label, kept, kept_codes in self._forms(node, ours, plan.codes):
                got = _layer_outputs(node, {d.input_index: kept_codes[d.weight].dequantize() for d in kept}, feeds)
                tried.append((label, sqnr_db(ref, got)))
                if tried[-1][1] >= MIN_LAYER_SQNR_DB:  # NaN (a non-finite output) fails
                    break
            else:
                label, kept, kept_codes = "float", [], {}
            checked[name] = tried[0][1]
            if label != "int8 per row":
                changed[name] = (label, ours, kept, kept_codes, tried)
        if not checked:
            return add_result(plan, AlgorithmResult(self.name, "no recurrent node could be checked", ran=False,
                                                    details=tuple(details)))
        return self._apply(plan, nodes, checked, changed, details)

    def _apply(self, plan: QuantPlan, nodes, checked, changed, details) -> QuantPlan:
        codes = dict(plan.codes)
        floats, weighted_float = list(plan.floats), list(plan.weighted_float)
        replaced: dict[tuple[str, int], WeightDecision | None] = {}
        for name, (label, ours, kept, kept_codes, tried) in changed.items():
            op = nodes[name].op_type
            measured = "; ".join(f"{lab} {db:.1f} dB" for lab, db in tried)
            why = (f"{op} run alone on the calibration data, outputs vs float: {measured} "
                   f"(floor {MIN_LAYER_SQNR_DB:g} dB; the error grows over the sequence)")
            by_index = {d.input_index: d for d in kept}
            for d in ours:
                new = by_index.get(d.input_index)
                if new is None:
                    codes.pop(d.weight, None)
                    weighted_float.append(name)
                    replaced[(name, d.input_index)] = None
                else:
                    codes[d.weight] = kept_codes[d.weight]
                    replaced[(name, d.input_index)] = replace(new, reason=f"{d.reason}; {label}: {why}")
            if len(kept) < len(ours):
                which = ", ".join(_WHICH.get(d.input_index, d.weight) for d in ours if d.input_index not in by_index)
                floats.append(NodeNote(name, op, f"weights kept float ({which}): {why}"))
        weights = tuple(replaced.get((d.node, d.input_index), d) for d in plan.weights)
        weights = tuple(d for d in weights if d is not None)
        details += [f"{n}: {db:.1f} dB per row" + (f" -> {changed[n][0]} ({changed[n][4][-1][1]:.1f} dB)"
                                                   if n in changed and changed[n][0] != "float" else
                                                   " -> float" if n in changed else "") for n, db in checked.items()]
        forms = Counter(c[0] for c in changed.values())
        summary = (f"{len(checked)} recurrent layers run alone on their calibration inputs with int8 weights: lowest "
                   f"{min(checked.values()):.1f} dB per row; " +
                   (f"{len(changed)} below {MIN_LAYER_SQNR_DB:g} dB per row, now " +
                    ", ".join(f"{k}: {label}" for label, k in forms.most_common()) if changed
                    else f"all ≥ {MIN_LAYER_SQNR_DB:g} dB"))
        plan = replace(plan, weights=weights, codes=MappingProxyType(codes), floats=tuple(floats),
                       weighted_float=tuple(weighted_float))
        return add_result(plan, AlgorithmResult(self.name, summary, nodes=tuple(changed), details=tuple(details)))
