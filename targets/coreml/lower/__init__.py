"""ONNX (QDQ) → MIL lowering: a registry of op lowerings, one module per op family.

``lower_model`` walks the (topologically sorted) ONNX graph once. For each node:

1. ``DequantizeLinear`` of constant integers becomes a constexpr weight op carrying the QDQ
   graph's integers and float32 scales unchanged (see :mod:`.quant`); activation
   ``QuantizeLinear``/``DequantizeLinear`` become MIL ``quantize``/``dequantize``.
2. A node whose inputs are all known at conversion time is folded in numpy (ONNX reference
   semantics): with fixed input shapes, every Shape-driven subgraph disappears this way.
3. Anything else goes to the lowering registered for its op type, which emits MIL ops.

Every failure names the ONNX node; :func:`unsupported_nodes` lists, without building anything,
the nodes no lowering exists for (the target's pre-flight).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.onnx_io import default_opset

# importing the families fills the registry
from targets.coreml.lower import context, control, elementwise, linear, norm, quant, recurrent, shape, stateful  # noqa: F401
from targets.coreml.lower.context import (
    Context,
    LoweringError,
    WeightRecord,
    axis_name,
    is_known,
    mil_name,
    symbol_names,
)
from targets.coreml.lower.registry import CHECKS, LOWERINGS, fold

NEVER_FOLDED = quant.HANDLED | {"If"}  # lowered by their own rules even when every input is known
# inputs of ops that take constant weights in their own layout (folded to float, not constexpr)
_FLOAT_WEIGHT_INPUTS = {"GRU": (1, 2, 3), "LSTM": (1, 2, 3, 7)}


@dataclass(frozen=True)
class IOSpec:
    name: str  # ONNX name
    mil_name: str  # Core ML feature name
    onnx_dtype: str  # numpy dtype name as the ONNX model declares it
    coreml_dtype: str  # float32 | int32
    shape: tuple  # ints, "name" for a flexible axis


@dataclass
class Lowered:
    program: object  # coremltools MIL Program
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    flexible: dict[str, tuple[int, int]]  # flexible axis name -> (lower, upper)
    weights: list[WeightRecord] = field(default_factory=list)
    folded: int = 0
    mil_ops: dict[str, int] = field(default_factory=dict)
    kv_cache: stateful.KVCacheSpec | None = None  # the KV cache as states (a stateful causal LM)


DEFAULT_RANGE = (1, 1024)


def _all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of every subgraph (If branches), depth first."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def unsupported_nodes(model: onnx.ModelProto, *, deployment: int,
                      shapes: Mapping | None = None) -> list[tuple[onnx.NodeProto, str, str]]:
    """(node, reason, hint) for every node that cannot be lowered, from its op type and attributes,
    and for every ``If`` whose condition cannot fold (``shapes``: the fixed axis sizes)."""
    problems = []
    inits = {i.name: i for i in model.graph.initializer}
    fixed = {k: v for k, v in (shapes or {}).items() if isinstance(v, int)}
    problems += control.if_problems(model, fixed)
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            hint = ("quantize for this target: edgeq quantize --profile ios18"
                    if node.op_type == "GatherBlockQuantized" else "")
            problems.append((node, f"custom-domain op {node.domain}.{node.op_type} has no Core ML lowering", hint))
            continue
        if node.op_type not in LOWERINGS:
            problems.append((node, f"no Core ML lowering for ONNX {node.op_type}",
                             "build for Android only (--targets android), or replace the op in the model"))
            continue
        check = CHECKS.get(node.op_type)
        reason = check(node, deployment) if check else None
        if reason:
            problems.append((node, reason, context.DEFAULT_HINT))
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            init = inits[node.input[0]]
            why = quant.weight_problem(init, deployment) or quant.scale_problem(node, init, inits.get(node.input[1]))
            if why:
                problems.append((node, why[0], why[1]))

    return problems


def _known_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16",
}


def lower_model(
    model: onnx.ModelProto,
    *,
    compute: str = "fp16",
    deployment: int = 18,
    shapes: Mapping[str, int | tuple[int, int]] | None = None,
    kv_cache: stateful.KVCacheSpec | None = None,
) -> Lowered:
    """Build the MIL program for ``model``.

    ``kv_cache`` (iOS 18, an explicit-cache causal LM graph): keep the cache as states instead
    of inputs and outputs (:mod:`.stateful`); batch 1, token axes 1..max_context by default.

    ``shapes`` maps a named dynamic axis (``dim_param``) to a fixed size (folds every
    Shape-driven subgraph) or to a ``(lower, upper)`` range. Axes not listed stay flexible in
    :data:`DEFAULT_RANGE` (an ML program needs a finite upper bound).
    """
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types
    from coremltools.converters.mil.mil.program import get_new_symbol

    shapes = dict(shapes or {})
    if kv_cache is not None:
        if deployment < 18:
            raise LoweringError(None, "a KV cache as Core ML state needs iOS 18", hint="package for ios18")
        shapes = {**stateful.axis_ranges(model, kv_cache), **shapes}
    target = {17: ct.target.iOS17, 18: ct.target.iOS18}[deployment]
    opset = default_opset(model, 21)
    ctx = Context(mb=mb, types=types, compute=compute, opset=opset, deployment=deployment)
    inits = _known_inputs(model)

    cache_inputs = set(stateful.past_names(kv_cache.num_layers)) if kv_cache is not None else set()
    graph_inputs = [vi for vi in model.graph.input if vi.name not in inits and vi.name not in cache_inputs]
    ctx.fold_outputs = _float_weight_outputs(model)
    # dynamic axes by name (a dim_param, or <input>_dim<i> for placeholders such as "?" or -1), each
    # a MIL symbol with a valid, distinct name
    names = symbol_names(dict.fromkeys(axis_name(vi.name, i, d) for vi in graph_inputs
                                       for i, d in enumerate(vi.type.tensor_type.shape.dim) if not _static(d)))
    symbols: dict[str, object] = {}
    flexible: dict[str, tuple[int, int]] = {}
    placeholders, in_specs = {}, []
    for vi in graph_inputs:
        tt = vi.type.tensor_type
        np_dtype = _ONNX_TO_NP.get(tt.elem_type)
        if np_dtype is None:
            raise LoweringError(None, f"input {vi.name!r} has ONNX type {onnx.TensorProto.DataType.Name(tt.elem_type)}, "
                                      "which Core ML inputs cannot carry")
        dims, spec_dims = [], []
        for i, d in enumerate(tt.shape.dim):
            if _static(d):
                dims.append(int(d.dim_value))
                spec_dims.append(int(d.dim_value))
                continue
            axis = axis_name(vi.name, i, d)
            want = shapes.get(axis)
            if isinstance(want, int):
                dims.append(want)
                spec_dims.append(want)
                continue
            if axis not in symbols:
                symbols[axis] = get_new_symbol(names[axis])
                flexible[axis] = tuple(int(w) for w in want) if want is not None else DEFAULT_RANGE
            dims.append(symbols[axis])
            spec_dims.append(axis)
        coreml_dtype = "float32" if np_dtype.startswith("float") else "int32"
        mil_dtype = types.fp32 if coreml_dtype == "float32" else types.int32
        # Core ML has no rank-0 inputs: a scalar is fed as [1] and squeezed inside
        placeholders[mil_name(vi.name)] = mb.placeholder(shape=tuple(dims) or (1,), dtype=mil_dtype)
        in_specs.append(IOSpec(vi.name, mil_name(vi.name), np_dtype, coreml_dtype, tuple(spec_dims)))

    for past in sorted(cache_inputs, key=lambda n: kv_cache.state_name(n)):
        placeholders[kv_cache.state_name(past)] = mb.state_tensor_placeholder(shape=kv_cache.shape, dtype=types.fp16)

    out_specs: list[IOSpec] = []
    with Function(placeholders, opset_version=target) as func:
        for spec in in_specs:
            ctx.name_free(spec.mil_name)
            v = func.inputs[spec.mil_name]
            if spec.onnx_dtype.startswith("float") and compute == "fp16":
                v = mb.cast(x=v, dtype="fp16", name=f"{spec.mil_name}_to_fp16")
            elif spec.onnx_dtype == "bool":
                v = mb.cast(x=v, dtype="bool", name=f"{spec.mil_name}_to_bool")
            if not spec.shape:
                v = mb.squeeze(x=v, axes=[0], name=f"{spec.mil_name}_scalar")
            ctx.set(spec.name, v)
        for name, arr in inits.items():
            ctx.set(name, arr)
        if kv_cache is not None:
            for past in cache_inputs:
                ctx.name_free(kv_cache.state_name(past))
            ctx.cache = stateful.StatefulCache(ctx, kv_cache, {p: func.inputs[kv_cache.state_name(p)]
                                                               for p in cache_inputs}, model)
            if compute == "fp16":
                ctx.fp32_nodes, ctx.fp32_exits = stateful.fp32_regions(model)
        ctx.folded += lower_nodes(ctx, model.graph.node)
        outs = []
        for vo in model.graph.output:
            if kv_cache is not None and vo.name.startswith("present."):
                continue  # kept in the states
            v = ctx.get(vo.name)
            name = mil_name(vo.name)
            np_dtype = _ONNX_TO_NP.get(vo.type.tensor_type.elem_type, "float32")
            if is_known(v):
                v = ctx.const(v)
            coreml_dtype = "float32" if ctx.is_float(v) else "int32"
            want = "fp32" if coreml_dtype == "float32" else "int32"
            if types.builtin_to_string(v.dtype) != want:
                v = mb.cast(x=v, dtype=want, name=name)
            elif v.name != name or v in outs or v in func.inputs.values():
                v = mb.identity(x=v, name=name)
            dims = tuple(_dim_name(d, symbols) for d in v.shape)
            out_specs.append(IOSpec(vo.name, name, np_dtype, coreml_dtype, dims))
            outs.append(v)
        func.set_outputs(outs)
    prog = Program()
    prog.add_function("main", func)
    counts: dict[str, int] = {}
    for op in func.operations:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return Lowered(prog, in_specs, out_specs, flexible, ctx.weights, ctx.folded, counts, kv_cache)


def _dim_name(d, symbols: dict) -> int | str:
    for axis, sym in symbols.items():
        if d is sym or str(d) == str(sym):
            return axis
    try:
        return int(d)
    except TypeError:
        return str(d)


def _static(dim) -> bool:
    return dim.HasField("dim_value") and dim.dim_value > 0


def _float_weight_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs of constant DequantizeLinear nodes that feed GRU/LSTM weights (see Context.fold_outputs)."""
    wanted = {n.input[i] for n in _all_nodes(model.graph) for i in _FLOAT_WEIGHT_INPUTS.get(n.op_type, ())
              if len(n.input) > i and n.input[i]}
    return {n.output[0] for n in _all_nodes(model.graph) if n.op_type == "DequantizeLinear" and n.output[0] in wanted}


def _lower_in_fp32(ctx: Context, node: onnx.NodeProto) -> int:
    """Lower ``node`` in fp32 in an fp16 program (an fp32 region, see :mod:`.stateful`: rotary angles,
    RMSNorm statistics). fp16 inputs from outside the region are widened (once per value); outputs
    read outside it are rounded to fp16 once, the region itself reads the fp32 values."""
    saved = {}
    for name in node.input:
        if name in ctx.fp32_values:
            saved[name] = ctx.values[name]
            ctx.values[name] = ctx.fp32_values[name]
        elif name and not is_known(ctx.values.get(name)) and ctx.is_float(ctx.values[name]) \
                and ctx.np_dtype(ctx.values[name]) == np.float16:
            wide = ctx.mb.cast(x=ctx.values[name], dtype="fp32", name=ctx.fresh_name(f"{mil_name(name)}_fp32"))
            ctx.fp32_values[name] = wide
            saved[name] = ctx.values[name]
            ctx.values[name] = wide
    ctx.compute = "fp32"
    try:
        folded = _lower_plain(ctx, node)
    finally:
        ctx.compute = "fp16"
        ctx.values.update(saved)
    for name in node.output:
        v = ctx.values.get(name)
        if not name or v is None or is_known(v) or not ctx.is_float(v):
            continue
        ctx.fp32_values[name] = v
        if name in ctx.fp32_exits:
            ctx.set(name, ctx.mb.cast(x=v, dtype="fp16", name=ctx.fresh_name(f"{mil_name(name)}_fp16")))
    return folded


def lower_nodes(ctx: Context, nodes) -> int:
    """Lower (or fold) ``nodes`` in order; returns how many were folded."""
    return sum(_lower_node(ctx, node) for node in nodes)


def _lower_node(ctx: Context, node: onnx.NodeProto) -> int:
    """Lower (or fold) one node; returns 1 when it was folded."""
    if ctx.cache is not None and ctx.cache.handles(node):
        for name, val in zip(node.output, ctx.cache.lower(node)):
            ctx.set(name, val)
        return 0
    if node.output and node.output[0] in ctx.fp32_nodes:
        return _lower_in_fp32(ctx, node)
    return _lower_plain(ctx, node)


def _lower_plain(ctx: Context, node: onnx.NodeProto) -> int:
    ins = [ctx.get(n) for n in node.input]
    try:
        known = all(x is None or is_known(x) for x in ins)
        if known and (node.op_type not in NEVER_FOLDED or node.output[0] in ctx.fold_outputs):
            outs = fold(node, ins, ctx.opset)
            for name, val in zip(node.output, outs):
                ctx.set(name, val)
            if node.op_type == "DequantizeLinear":
                ctx.folded_dequantize[node.output[0]] = (node, ins)
            return 1
        fn = LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise LoweringError(node, "no Core ML lowering for this op")
        outs = fn(ctx, node, ins)
    except LoweringError:
        raise
    except Exception as e:  # a builder type check: name the node
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LoweringError(node, f"lowering failed: {type(e).__name__}: {first}") from e
    before = {id(v) for v in ins if v is not None and not is_known(v)}
    for name, val in zip(node.output, outs):
        if name:
            if not is_known(val) and id(val) not in before and ctx.name_free(mil_name(name)):
                val.set_name(mil_name(name))  # the ONNX value's name: intermediates can be matched
            ctx.set(name, val)
    return 0
