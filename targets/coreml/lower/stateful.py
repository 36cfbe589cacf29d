"""A causal LM's KV cache as Core ML state (iOS 18): the stateful form of edgeq's explicit-cache graph.

edgeq exports a causal LM as one graph with its cache as I/O (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``,
:mod:`edgeq.export.causal_lm`). The stateful program keeps the same graph and changes only where
the cache lives:

- each ``past_key_values.{i}.key|value`` becomes a state ``key_cache_{i}`` / ``value_cache_{i}``,
  fp16 (Core ML states must be), of fixed shape ``[1, kv_heads, max_context, head_dim]``, zeros
  when the app makes it;
- the past length ``P`` is ``attention_mask``'s length minus ``input_ids``' (the app feeds the
  mask of the whole sequence so far, as it does to the explicit-cache graph); every
  ``Shape(past_key_values...)`` of the graph becomes ``[1, kv_heads, P, head_dim]``;
- the ``Concat(past, new)`` that makes ``present`` writes ``new`` into the state at
  ``[P, P + n)`` (``read_state`` → ``slice_update`` → ``coreml_update_state``) and reads back
  the prefix ``[0, P + n)``: attention runs over the state's valid prefix with the graph's own
  mask, which is exactly what the explicit-cache graph attends over (Apple's stateful Llama
  example slices the cache the same way). The outputs are ``logits`` only.

So prefill (``P = 0``, ``n`` prompt tokens) and decode (``n = 1``) are the same function with
flexible ``sequence`` and ``total_sequence`` axes (1..max_context).

fp32 regions in an fp16 program (:func:`fp32_regions`): the rotary angles — ``position * inv_freq``
rounded to fp16 loses up to a quarter of a radian at position 1000 (fp16 has 11 significant bits),
so the ``Cos``/``Sin`` tables are computed in fp32 and rounded once — and the RMSNorm statistics,
whose ``x²`` overflows fp16 for hidden values beyond 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.errors import InputError
from edgeq.export.causal_lm import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, is_causal_lm_io, past_names, present_names
from targets.coreml.lower.context import Context, LoweringError, axis_name

DEFAULT_MAX_CONTEXT = 2048
STATE_NAMES = ("key_cache_{i}", "value_cache_{i}")


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache of an explicit-cache causal LM graph, as states of ``max_context`` positions."""

    num_layers: int
    kv_heads: int
    head_dim: int
    max_context: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_context, self.head_dim)

    def state_name(self, past_name: str) -> str:
        """``past_key_values.3.value`` → ``value_cache_3``."""
        _, layer, kind = past_name.split(".")
        return f"{kind}_cache_{layer}"

    def states(self) -> list[dict]:
        return [{"name": self.state_name(p), "onnx_input": p, "dtype": "float16", "shape": list(self.shape)}
                for p in past_names(self.num_layers)]

    def as_dict(self) -> dict:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "max_context": self.max_context}


def is_causal_lm_graph(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    return is_causal_lm_io([i.name for i in model.graph.input if i.name not in inits],
                           [o.name for o in model.graph.output])


def cache_spec(model: onnx.ModelProto, max_context: int | None, max_positions: int | None) -> KVCacheSpec:
    """The cache of ``model`` (an explicit-cache causal LM graph) as states of ``max_context``
    positions (default: :data:`DEFAULT_MAX_CONTEXT` or the model's ``max_positions``, the smaller)."""
    if not is_causal_lm_graph(model):
        raise InputError("the model is not a causal LM with an explicit KV cache (inputs input_ids, attention_mask, "
                         "position_ids, past_key_values.N.key|value; outputs logits, present.N.key|value)",
                         hint="export it with `edgeq export`, or package it without max_context")
    by_name = {vi.name: vi for vi in model.graph.input}
    layers = sum(1 for n in by_name if n.startswith("past_key_values.") and n.endswith(".key"))
    dims = {tuple(_dim(d) for d in by_name[p].type.tensor_type.shape.dim) for p in past_names(layers)}
    if len(dims) != 1:
        raise InputError("the KV cache inputs have different shapes; a state per layer needs one shape",
                         hint="export the model with `edgeq export`")
    shape = dims.pop()
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
        raise InputError(f"the KV cache inputs have shape {list(shape)}; expected [batch, kv_heads, past, head_dim] "
                         "with fixed kv_heads and head_dim", hint="export the model with `edgeq export`")
    default = min(DEFAULT_MAX_CONTEXT, max_positions) if max_positions else DEFAULT_MAX_CONTEXT
    ctx_len = default if max_context is None else int(max_context)
    if ctx_len < 2:
        raise InputError(f"max_context must be at least 2, got {ctx_len}", hint="e.g. --max-context 2048")
    if max_positions and ctx_len > max_positions:
        raise InputError(f"max_context {ctx_len} is beyond the model's {max_positions} positions",
                         hint=f"use --max-context {max_positions} or less")
    return KVCacheSpec(layers, shape[1], shape[3], ctx_len)


def _dim(d):
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param


def axis_ranges(model: onnx.ModelProto, spec: KVCacheSpec) -> dict[str, int | tuple[int, int]]:
    """The stateful program's axes: batch 1 (the states hold one sequence); the token axes of
    ``input_ids``, ``attention_mask`` and ``position_ids`` 1..max_context."""
    inputs = {vi.name: vi for vi in model.graph.input}
    out: dict[str, int | tuple[int, int]] = {}
    for name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS):
        dims = inputs[name].type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                out[axis_name(name, i, d)] = 1 if i == 0 else (1, spec.max_context)
    return out


class StatefulCache:
    """Lowers the cache nodes of one explicit-cache graph into state reads and writes (see the module)."""

    def __init__(self, ctx: Context, spec: KVCacheSpec, states: dict, model: onnx.ModelProto):
        self.ctx, self.spec, self.states = ctx, spec, states  # states: past name -> MIL state var
        self.past = set(past_names(spec.num_layers))
        self.present = set(present_names(spec.num_layers))
        mb = ctx.mb
        n = mb.slice_by_index(x=mb.shape(x=ctx.get(INPUT_IDS)), begin=[1], end=[2], name=ctx.fresh_name("new_tokens"))
        total = mb.slice_by_index(x=mb.shape(x=ctx.get(ATTENTION_MASK)), begin=[1], end=[2], name=ctx.fresh_name("total_tokens"))
        self.past_len = mb.sub(x=total, y=n, name=ctx.fresh_name("past_tokens"))
        zero = np.zeros(1, np.int32)
        self.begin = mb.concat(values=[zero, zero, self.past_len, zero], axis=0, name=ctx.fresh_name("cache_write_begin"))
        self.end = mb.concat(values=[np.array([1, spec.kv_heads], np.int32), total,
                                     np.array([spec.head_dim], np.int32)], axis=0, name=ctx.fresh_name("cache_write_end"))
        self.past_shape = mb.concat(values=[np.array([1, spec.kv_heads], np.int32), self.past_len,
                                            np.array([spec.head_dim], np.int32)], axis=0, name=ctx.fresh_name("past_cache_shape"))
        self._check_uses(model)

    def _check_uses(self, model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            used = [n for n in node.input if n in self.past]
            if not used:
                continue
            if node.op_type == "Shape":
                continue
            if node.op_type == "Concat" and node.input[0] in self.past and len(node.input) == 2 \
                    and node.output[0] in self.present and _attr(node, "axis") in (2, -2):
                continue
            raise LoweringError(node, f"reads the KV cache input {used[0]!r} in a way the stateful lowering does "
                                      "not know (only Shape and Concat(past, new) along the sequence axis)",
                                hint="export the model with `edgeq export` (its cache is read only by Shape and Concat)")

    def handles(self, node: onnx.NodeProto) -> bool:
        return any(n in self.past for n in node.input)

    def lower(self, node: onnx.NodeProto):
        """The MIL values of ``node``'s outputs (a Shape of a cache input, or the cache Concat)."""
        mb = self.ctx.mb
        if node.op_type == "Shape":
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            if start == 0 and end is None:
                return [self.past_shape]
            return [mb.slice_by_index(x=self.past_shape, begin=[start], end=[end if end is not None else 4],
                                      end_mask=[end is None])]
        state = self.states[node.input[0]]
        new = self.ctx.get(node.input[1])
        if self.ctx.compute != "fp16":
            new = mb.cast(x=new, dtype="fp16")
        name = self.spec.state_name(node.input[0])
        full = mb.read_state(input=state, name=self.ctx.fresh_name(f"{name}_read"))
        written = mb.slice_update(x=full, update=new, begin=self.begin, end=self.end, name=self.ctx.fresh_name(f"{name}_written"))
        written = mb.coreml_update_state(state=state, value=written, name=self.ctx.fresh_name(f"{name}_updated"))
        present = mb.slice_by_index(x=written, begin=[0, 0, 0, 0], end=self.end, name=self.ctx.fresh_name(f"{name}_valid"))
        if self.ctx.compute != "fp16":
            present = mb.cast(x=present, dtype=self.ctx.compute)
        return [present]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def fp32_regions(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """The nodes a causal LM runs in fp32 in an fp16 program, by first output name, and the values
    they hand back to fp16 nodes (rounded once there):

    - rotary angles: the nodes computing ``Cos``/``Sin`` from ``position_ids`` and constants;
    - RMSNorm statistics: ``Pow(x, 2)`` (or ``Mul(x, x)``) → ``ReduceMean`` and what follows it with
      constants only (``+ eps``, ``Sqrt``, ``Reciprocal``): ``x²`` of a hidden state beyond 256 is
      beyond fp16 (SmolLM2's residual stream reaches thousands), and ``1/sqrt(mean)`` is an fp16
      number again.
    """
    nodes = list(model.graph.node)
    consts = {i.name for i in model.graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    region = _rotary(nodes, consts, producer) | _norm_statistics(nodes, consts, producer, consumers)
    inside = {o for n in nodes if n.output and n.output[0] in region for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    exits = {v for v in inside if v in graph_outputs
             or any(not (c.output and c.output[0] in region) for c in consumers.get(v, []))}
    return region, exits


def _rotary(nodes, consts, producer) -> set[str]:
    derived = {POSITION_IDS}
    for node in nodes:
        ins = [i for i in node.input if i and i not in consts]
        if ins and all(i in derived for i in ins) and node.op_type not in ("Cos", "Sin"):
            derived.update(node.output)
    tables = [n for n in nodes if n.op_type in ("Cos", "Sin") and n.input[0] in derived]
    region: set[str] = {t.output[0] for t in tables}
    stack = [t.input[0] for t in tables]
    while stack:  # back from the tables to position_ids
        node = producer.get(stack.pop())
        if node is None or node.output[0] in region:
            continue
        region.add(node.output[0])
        stack.extend(i for i in node.input if i in derived and i != POSITION_IDS)
    return region


_NORM_TAIL = ("Add", "Sqrt", "Reciprocal", "Div", "Mul")


def _norm_statistics(nodes, consts, producer, consumers) -> set[str]:
    region: set[str] = set()
    for node in nodes:
        if node.op_type != "ReduceMean":
            continue
        sq = producer.get(node.input[0])
        squares = sq is not None and (
            (sq.op_type == "Pow" and len(sq.input) == 2 and sq.input[1] in consts) or
            (sq.op_type == "Mul" and sq.input[0] == sq.input[1]))
        if not squares:
            continue
        region |= {sq.output[0], node.output[0]}
        v = node.output[0]
        while len(consumers.get(v, [])) == 1:
            nxt = consumers[v][0]
            if nxt.op_type not in _NORM_TAIL or any(i != v and i not in consts for i in nxt.input):
                break
            region.add(nxt.output[0])
            v = nxt.output[0]
    return region
