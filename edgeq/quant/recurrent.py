"""Recurrent layers checked on their own outputs: int8 LSTM/GRU/RNN weights that break the layer stay float.

A recurrent layer feeds its output back through its weights at every step, so a weight error that
is small for a feed-forward layer can grow over a sequence. resemblyzer's GE2E speaker encoder
(3 LSTM layers over 160 linear-mel frames) is the case measured: its first layer's input weights
``W [1024, 40]`` span 7..61 across the mel bands (the quiet high bands carry the large weights),
and per-row int8 codes — 42 dB on the weights, 40.5 dB on the gate pre-activations — leave the
layer's own output at 8.9 dB over the calibration sequences; the model's embedding falls to
11.8 dB (cosine 0.967). Layers 2 and 3 keep 37.8 / 38.7 dB, silero-vad's LSTM 36.7 dB over its
sequences and 54.1 dB for one streaming step.

So after the codes are chosen, each recurrent node with int8 weights is run alone (ONNX Runtime,
the one node) on the inputs calibration recorded for it, with its float weights and with the
dequantized codes; a node whose outputs fall below :data:`MIN_LAYER_SQNR_DB` keeps its weights
float, with the measured number as the reason (ONNX Runtime runs these layers in float either
way: the int8 weights only save file size).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result
from edgeq.quant.plan import AlgorithmResult, NodeNote, QuantPlan
from edgeq.quant.recipes import WeightFormat
from edgeq.validate.metrics import sqnr_db

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# A layer's own output (all steps, final states) against float: GE2E layer 1 per-row int8 8.9 dB
# (model 11.8 dB, fails), layers 2-3 37.8 / 38.7 dB, silero-vad 36.7 dB (models within their gates).
# 30 dB leaves the rest of the model room under the w8a16 floor (25 dB) and the w8a8 floor (15 dB).
MIN_LAYER_SQNR_DB = 30.0
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


class RecurrentCheck(Algorithm):
    """Run each recurrent node with int8 weights alone on its calibration inputs; keep it float below the floor."""

    name = "recurrent_check"

    def _nodes(self, ctx: Context, plan: QuantPlan) -> dict[str, ir.Node]:
        int8 = {d.node for d in plan.weights if d.op_type in RECURRENT_OPS and d.format == WeightFormat.INT8}
        return {n.name: n for n in ctx.model.graph if n.name in int8}

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        return [Request("samples", v.name, Samples) for n in self._nodes(ctx, plan).values()
                for _, v in _runtime_inputs(n)]

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        nodes = self._nodes(ctx, plan)
        if not nodes:
            return self.skipped(plan, "nothing to do: no LSTM/GRU/RNN with int8 weights")
        checked, dropped, details = {}, [], []
        for name, node in nodes.items():
            inputs = _runtime_inputs(node)
            recorded = [stats.get("samples", v.name) for _, v in inputs]
            if not inputs or any(r is None for r in recorded) or len({len(r) for r in recorded}) != 1:
                details.append(f"{name}: not checked (its inputs were not recorded in calibration)")
                continue
            feeds = [{i: r[b] for (i, _), r in zip(inputs, recorded)} for b in range(len(recorded[0]))]
            ours = [d for d in plan.weights if d.node == name]
            quantized = {d.input_index: plan.codes[d.weight].dequantize() for d in ours if d.weight in plan.codes}
            if not quantized:
                continue
            ref = _layer_outputs(node, {}, feeds)
            got = _layer_outputs(node, quantized, feeds)
            checked[name] = sqnr_db(ref, got)
            if not checked[name] >= MIN_LAYER_SQNR_DB:  # NaN (a non-finite output) too
                dropped.append((name, ours))
        if not checked:
            return add_result(plan, AlgorithmResult(self.name, "no recurrent node could be checked", ran=False,
                                                    details=tuple(details)))
        codes = dict(plan.codes)
        floats, weighted_float = list(plan.floats), list(plan.weighted_float)
        for name, ours in dropped:
            for d in ours:
                codes.pop(d.weight, None)
                weighted_float.append(name)
            floats.append(NodeNote(name, nodes[name].op_type,
                                   f"weights kept float: with int8 weights this {nodes[name].op_type}'s own outputs "
                                   f"are {checked[name]:.1f} dB from float on the calibration data "
                                   f"(< {MIN_LAYER_SQNR_DB:g} dB; the error grows over the sequence)"))
        gone = {name for name, _ in dropped}
        details += [f"{n}: {db:.1f} dB" + (" -> float" if n in gone else "") for n, db in checked.items()]
        summary = (f"{len(checked)} recurrent layers run alone on their calibration inputs with int8 weights: lowest "
                   f"{min(checked.values()):.1f} dB; " + (f"{len(dropped)} kept float (< {MIN_LAYER_SQNR_DB:g} dB)"
                                                          if dropped else f"all ≥ {MIN_LAYER_SQNR_DB:g} dB"))
        plan = replace(plan, weights=tuple(d for d in plan.weights if d.node not in gone),
                       codes=MappingProxyType(codes), floats=tuple(floats), weighted_float=tuple(weighted_float))
        return add_result(plan, AlgorithmResult(self.name, summary, nodes=tuple(gone), details=tuple(details)))
