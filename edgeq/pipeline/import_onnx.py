"""The import stage: every ONNX model entering edgeq (a user's file, every export) goes through it.

It turns what exporters write into one form the rest of the flow relies on: weights are
initializers (not ``Constant`` nodes, not computed from constants), the opset is one the QDQ
formats need, BatchNormalization is folded into the weights edgeq will quantize, Identity and
inference Dropout are gone, dynamic dims are valid names and every node has a unique name. Each
step says what it did, with counts, for the plan, ``quantize --explain`` and the report.

A model that is already clean (edgeq's own exports) comes out unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from edgeq import onnx_io
from edgeq.errors import EdgeqError, InputError, UnsupportedError, first_line
from edgeq.passes.convert_opset import ConvertOpsetPass, ConvertOpsetResult
from edgeq.passes.fold_batchnorm import FoldBatchNormPass, FoldBatchNormResult
from edgeq.passes.fold_constants import FoldConstantsPass, FoldConstantsResult
from edgeq.passes.name_dims import NameDimsPass, NameDimsResult
from edgeq.passes.name_nodes import NameNodesPass, NameNodesResult
from edgeq.passes.remove_identity import RemoveIdentityPass, RemoveIdentityResult
from edgeq.quant.plan import ImportStep

DEFAULT_OPSET = 21  # blocked int4 DequantizeLinear needs 21; per-axis DequantizeLinear 13
_SHOWN = 4  # names listed in a step's detail before "..."


@dataclass(frozen=True)
class ImportResult:
    """The imported model and its steps, in the order :func:`import_onnx` reports them."""

    model: ir.Model
    steps: tuple[ImportStep, ...]

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.steps)

    def step(self, name: str) -> ImportStep:
        return next(s for s in self.steps if s.name == name)


def import_onnx(model: ir.Model | str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> ImportResult:
    """Bring an ONNX model (a path, or an ``onnx_ir`` model, changed in place) into edgeq's form.

    Steps, in order: convert the opset (models below ``opset``; ``ai.onnx`` only), name nodes,
    remove Identity/Dropout, fold constants into initializers, fold BatchNormalization, name
    dynamic dims (nodes are named again at the end for nodes the steps created). Raises
    :class:`InputError` for an unreadable file or an opset the converter cannot reach,
    :class:`UnsupportedError` if a step fails on the model.
    """
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 13 <= opset <= max_opset:
        raise InputError(f"cannot import to opset {opset!r}",
                         hint=f"use an opset from 13 (per-channel DequantizeLinear) to {max_opset}")
    source = "the model"
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model = onnx_io.load_ir(model)
    elif not isinstance(model, ir.Model):
        raise InputError(f"expected an ONNX file path or an onnx_ir.Model, got {type(model).__name__}")
    check_graph(model, source)
    have = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if have > max_opset:
        raise InputError(f"{source} uses ONNX opset {have}, newer than the installed onnx knows (up to {max_opset})",
                         hint="export it at opset 21, or upgrade onnx")

    def run(name: str, p: ir.passes.PassBase) -> ir.passes.PassResult:
        try:
            return p(model)
        except EdgeqError as e:
            raise type(e)(f"{source}: {e.message}", hint=e.hint) from e
        except Exception as e:
            raise UnsupportedError(f"{source}: the import step {name!r} failed: {type(e).__name__}: {first_line(e)}",
                                   hint="check the model with onnx.checker; if it runs in ONNX Runtime, report this") from e

    steps = []
    converted = run("convert opset", ConvertOpsetPass(opset))
    steps.append(_opset_step(converted, opset))
    names_before = run("name nodes", NameNodesPass())  # before folding, which names nodes generically
    steps.append(_identity_step(run("remove Identity/Dropout", RemoveIdentityPass())))
    # dims before folding, whose shape inference then spreads the input names through the graph,
    # and after it, which may write what inference found (-1 from a Reshape, unk__N)
    dims_before = run("name dynamic dims", NameDimsPass())
    steps.append(_constants_step(run("fold constants", FoldConstantsPass())))
    steps.append(_batchnorm_step(run("fold BatchNormalization", FoldBatchNormPass())))
    steps.append(_dims_step(dims_before, run("name dynamic dims", NameDimsPass())))
    steps.append(_names_step(model, names_before, run("name nodes", NameNodesPass())))
    return ImportResult(model=model, steps=tuple(steps))


def check_graph(model: ir.Model, source: str) -> None:
    """Every tensor a node reads is made somewhere: a graph input, an initializer, an earlier node, or (in
    a branch or loop body) a value of the graph around it. A dangling input fails here, naming the file,
    the node and the tensor, not as a broken output after quantization. (onnx's full checker is stricter
    than the runtimes — it rejects, e.g., graph outputs without a shape — so only this is checked.)"""

    def walk(graph: ir.Graph, known: set[int]) -> None:
        known = known | {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        for node in graph:
            for v in node.inputs:
                if v is not None and id(v) not in known and v.const_value is None:
                    raise InputError(f"{source}: node {node.name or node.op_type!r} ({node.op_type}) reads "
                                     f"tensor {v.name!r}, which no node, input or initializer makes",
                                     hint="the file is damaged or was edited by hand; export it again")
            for attr in node.attributes.values():
                for sub in (attr.value if attr.type == ir.AttributeType.GRAPHS else
                            [attr.value] if attr.type == ir.AttributeType.GRAPH else []):
                    walk(sub, known)
            known |= {id(o) for o in node.outputs}

    walk(model.graph, set())


def _listed(items: list[str] | tuple[str, ...] | dict, fmt: Callable = str) -> str:
    items = list(items.items()) if isinstance(items, dict) else list(items)
    shown = ", ".join(fmt(i) for i in items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _kept(kept: tuple[tuple[str, str], ...]) -> str:
    """``(name, reason)`` pairs grouped by reason: "kept 3: 2 because ... (e.g. a), 1 because ... (b)"."""
    by_reason: dict[str, list[str]] = {}
    for name, why in kept:
        by_reason.setdefault(why, []).append(name)
    groups = [f"{len(names)} because {why} (e.g. {names[0]})" if len(names) > 1 else f"{names[0]}: {why}"
              for why, names in by_reason.items()]
    return f"kept {len(kept)}: " + "; ".join(groups)


def _opset_step(r: ConvertOpsetResult, opset: int) -> ImportStep:
    if not r.modified:
        at = f"already at opset {r.from_opset}" if r.from_opset is not None else "no ai.onnx opset imported"
        return ImportStep("convert opset", 0, f"kept: {at} (target {opset})")
    n = sum(r.adapted.values())
    ops = ", ".join(f"{op} ×{k}" for op, k in sorted(r.adapted.items(), key=lambda kv: -kv[1]))
    return ImportStep("convert opset", n, f"opset {r.from_opset} → {r.to_opset} with onnx's version converter; "
                                          f"{n} nodes of ops redefined since: {ops or 'none'}")


def _identity_step(r: RemoveIdentityResult) -> ImportStep:
    n = sum(r.removed.values())
    text = "removed " + ", ".join(f"{k} ×{v}" for k, v in sorted(r.removed.items())) if n else "nothing to remove"
    if r.kept:
        text += "; " + _kept(r.kept)
    return ImportStep("remove Identity/Dropout", n, text)


def _constants_step(r: FoldConstantsResult) -> ImportStep:
    parts = []
    if r.lifted:
        parts.append(f"{r.lifted} Constant nodes became initializers")
    if r.absorbed:
        parts.append(f"{r.absorbed} Constant nodes were folded into other results or read by nothing")
    if r.folded:
        parts.append(f"{r.folded} nodes computed from constants were folded")
    if r.unlisted_inputs:
        parts.append(f"{r.unlisted_inputs} initializers are no longer graph inputs")
    text = "; ".join(parts) if parts else "no Constant nodes and nothing computed from constants"
    text += f" ({r.initializers} initializers)"
    if r.shapes_inferred:
        text += f"; shapes inferred for {r.shapes_inferred} values that had none"
    n = r.lifted + r.absorbed + r.folded + r.unlisted_inputs + r.shapes_inferred
    return ImportStep("fold constants", n, text)


def _batchnorm_step(r: FoldBatchNormResult) -> ImportStep:
    n = sum(r.folded.values())
    if n:
        text = "folded into " + ", ".join(f"{k} ×{v}" for k, v in sorted(r.folded.items()))
        text = f"{n} BatchNormalization {text}"
    else:
        text = "no BatchNormalization folded"
    if r.kept:
        text += "; " + _kept(r.kept)
    return ImportStep("fold BatchNormalization", n, text)


def _dims_step(before: NameDimsResult, after: NameDimsResult) -> ImportStep:
    renamed = {**before.renamed, **after.renamed}
    named = {**before.named, **after.named}
    cleared = before.cleared + after.cleared
    parts = []
    if renamed:
        parts.append(f"renamed {len(renamed)}: " + _listed(renamed, lambda kv: f"{kv[0]!r} → {kv[1]}"))
    if named:
        parts.append(f"named {len(named)} unknown: " + _listed(named, lambda kv: f"{kv[0]} → {kv[1]}"))
    if cleared:
        parts.append(f"{cleared} negative or '?' dims of intermediate values made unknown")
    n = len(renamed) + len(named) + cleared
    return ImportStep("name dynamic dims", n, "; ".join(parts) if parts else "all dynamic dims already have valid names")


def _names_step(model: ir.Model, before: NameNodesResult, after: NameNodesResult) -> ImportStep:
    # names given before folding count only if a node still has them (most unnamed nodes are Constants)
    given = {*before.names, *after.names}
    changed = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name in given]
    text = f"{len(changed)} unnamed or duplicate-named nodes named: " + _listed(changed) \
        if changed else "all node names already unique"
    return ImportStep("name nodes", len(changed), text)
