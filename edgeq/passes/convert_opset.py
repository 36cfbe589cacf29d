"""Bring a model to the opset edgeq writes: per-axis DequantizeLinear needs 13, blocked int4 21."""

from __future__ import annotations

import dataclasses

import onnx
import onnx.version_converter
import onnx_ir as ir

from edgeq.errors import InputError, first_line

# onnx.version_converter serializes the model: protobuf stops at 2 GiB.
_PROTO_LIMIT_BYTES = 2**31 - 2**26


@dataclasses.dataclass
class ConvertOpsetResult(ir.passes.PassResult):
    from_opset: int | None = None  # the default-domain opset before (None: the model imports none)
    to_opset: int | None = None
    adapted: dict[str, int] = dataclasses.field(default_factory=dict)  # op type -> nodes whose op changed version


class ConvertOpsetPass(ir.passes.InPlacePass):
    """Convert the default-domain (``ai.onnx``) opset up to ``opset`` with onnx's version converter.

    Rules:

    - A model importing ``ai.onnx`` at a version below ``opset`` is converted (every graph,
      subgraphs included; other domains are left as they are) and its IR version raised to the
      one that opset needs. A model at ``opset`` or above, or importing no ``ai.onnx``, is kept.
    - When the converter fails, :class:`~edgeq.errors.InputError` names the node whose op it could
      not convert (found by converting the nodes one at a time) and what the user can do.
    """

    def __init__(self, opset: int):
        super().__init__()
        self.opset = opset

    def requires(self, model: ir.Model) -> None:
        if not 7 <= self.opset <= onnx.defs.onnx_opset_version():
            raise ir.passes.PreconditionError(f"opset {self.opset} is not one onnx {onnx.__version__} converts to")

    def call(self, model: ir.Model) -> ConvertOpsetResult:
        current = _default_opset(model)
        if current is None or current >= self.opset:
            return ConvertOpsetResult(model, modified=False, from_opset=current, to_opset=current)
        nbytes = sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
                     if v.const_value is not None)
        if nbytes > _PROTO_LIMIT_BYTES:
            raise InputError(f"the model is at opset {current} and too large ({nbytes / 2**30:.1f} GiB) for onnx's "
                             f"version converter", hint=_hint(self.opset))
        proto = ir.to_proto(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.opset)
        except Exception as e:  # the converter raises RuntimeError/ValueError with a C++ assertion text
            raise _conversion_error(proto, current, self.opset, e) from e
        new = ir.from_proto(converted)
        adapted = _adapted_ops(model, current, self.opset)
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        needed = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()], ignore_unknown=True)
        model.ir_version = max(model.ir_version or 0, needed)
        return ConvertOpsetResult(model, modified=True, from_opset=current, to_opset=self.opset, adapted=adapted)

    def ensures(self, model: ir.Model) -> None:
        current = _default_opset(model)
        if current is not None and current < self.opset:
            raise ir.passes.PostconditionError(f"the model is still at opset {current}")


def _default_opset(model: ir.Model) -> int | None:
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx"))


def _adapted_ops(model: ir.Model, old: int, new: int) -> dict[str, int]:
    """Nodes whose op has a newer definition between ``old`` and ``new``, by op type."""
    counts: dict[str, int] = {}
    since: dict[str, bool] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type not in since:
            try:
                since[node.op_type] = (onnx.defs.get_schema(node.op_type, old).since_version
                                       != onnx.defs.get_schema(node.op_type, new).since_version)
            except onnx.defs.SchemaError:  # removed from the newer opset (e.g. Upsample, Scatter)
                since[node.op_type] = True
        if since[node.op_type]:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _hint(opset: int) -> str:
    return (f"export the model again at opset {opset} or newer (torch.onnx.export(..., opset_version={opset}), "
            f"paddle2onnx --opset_version {opset}, tf2onnx --opset {opset})")


def _reason(e: Exception) -> str:
    return first_line(e, limit=10_000).split(" failed: ", 1)[-1][:300]  # drop the C++ file and assertion


def _conversion_error(proto: onnx.ModelProto, old: int, new: int, error: Exception) -> InputError:
    reason = _reason(error)
    node = _failing_node(proto, new, reason)
    if node is None:
        where = "the model"
    else:
        where = f"node {node.name!r}" if node.name else f"the node computing {node.output[0]!r}"
        where += f" ({node.op_type}, opset {old})"
    return InputError(f"onnx's version converter cannot bring {where} from opset {old} to {new}: {reason}",
                      hint=f"{_hint(new)}, or change that node")


def _failing_node(proto: onnx.ModelProto, target: int, reason: str) -> onnx.NodeProto | None:
    """The first node that fails alone with the same reason (the converter does not say which)."""
    types = {v.name: v for v in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]}
    inits = {t.name: t for t in proto.graph.initializer}
    tried: set[bytes] = set()
    for node in _nodes(proto.graph):
        if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            continue
        key = node.op_type.encode() + b"".join(a.SerializeToString() for a in node.attribute)
        if key in tried:
            continue
        tried.add(key)
        names = [n for n in node.input if n]
        graph = onnx.helper.make_graph(
            [node], "one_node",
            [types.get(n) or onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
             for n in names if n not in inits],
            [types.get(n) or onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n],
            initializer=[inits[n] for n in names if n in inits])
        one = onnx.helper.make_model(graph, opset_imports=[op for op in proto.opset_import], ir_version=proto.ir_version)
        try:
            onnx.version_converter.convert_version(one, target)
        except Exception as e:  # noqa: BLE001 - any failure with the model's reason identifies the node
            if _reason(e) == reason:
                return node
    return None


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            for g in a.graphs:
                yield from _nodes(g)
