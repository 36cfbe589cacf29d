"""Weights as initializers: fold what is computed from constants, lift Constant nodes.

paddle2onnx and several other exporters store every weight in a ``Constant`` node, and some
compute weights at run time from constants (a Transpose, Slice, Concat or Unsqueeze of an
initializer feeding an LSTM or a MatMul). The quantizer looks for weights among initializers;
this pass puts them there, with the folding of onnxscript's optimizer and onnx-ir's passes.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

# onnxscript's default (8192 elements) keeps it from computing anything that reads a real weight;
# the output limit below, with its size-neutral exception, is what bounds the stored results.
NO_INPUT_SIZE_LIMIT = 2**62
# Results up to this many elements are stored even when they grow the model (onnxscript's default).
OUTPUT_SIZE_LIMIT = 512 * 512


@dataclasses.dataclass
class FoldConstantsResult(ir.passes.PassResult):
    lifted: int = 0  # Constant nodes that became initializers
    absorbed: int = 0  # Constant nodes folded into other results, or read by nothing
    folded: int = 0  # other nodes computed from constants and replaced by their result
    unlisted_inputs: int = 0  # initializers that were also graph inputs (IR < 4 files)
    shapes_inferred: int = 0  # values without a shape that got one from the folder's shape inference
    initializers: int = 0  # initializers of the main graph afterwards


class FoldConstantsPass(ir.passes.InPlacePass):
    """Turn constant weights and everything computed only from constants into initializers.

    Rules, in order:

    1. An initializer also listed as a graph input (files of IR version < 4 list them all) stops
       being an input, so it counts as a constant (onnx-ir ``RemoveInitializersFromInputsPass``).
    2. onnxscript constant folding in every graph, subgraphs included: a deterministic node whose
       inputs are all constant is replaced by its result when the result has at most
       ``output_size_limit`` elements or no more than the single-use constants it consumes (so a
       Transpose/Slice/Concat/Cast/Unsqueeze of a weight is folded at any size; a broadcast that
       would grow the file is not), except a node reading a weight that other nodes read too (a
       tied embedding / output table: folding its Transpose would store the table twice). Shape
       computations fold where shapes are static, an ``If``
       whose condition is constant is replaced by its branch, Identity and inference Dropout
       disappear. Quantize/DequantizeLinear and ConstantOfShape are never folded. The folder's
       shape inference gives a shape to values that had none (counted).
    3. Nodes whose outputs nothing reads are removed (onnx-ir ``RemoveUnusedNodesPass``), and
       initializers only the dropped branch of a folded ``If`` read.
    4. Every ``Constant`` node left, of any size and kind, becomes an initializer, and initializers
       of subgraphs move to the main graph, where the quantizer finds them (onnx-ir
       ``LiftConstantsToInitializersPass``, ``LiftSubgraphInitializersToMainGraphPass``).

    This is the folding part of ``onnxscript.optimizer.optimize`` (which ``edgeq export`` runs),
    without its pattern rewrites, which would change graphs the exporter already cleaned.
    """

    def __init__(self, *, output_size_limit: int = OUTPUT_SIZE_LIMIT):
        super().__init__()
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> FoldConstantsResult:
        constants_before = _count(model, "Constant")
        shapeless = [v for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs if v.shape is None]
        others_before = _count(model) - constants_before
        inputs_before = len(model.graph.inputs)
        modified = common_passes.RemoveInitializersFromInputsPass()(model).modified
        unlisted = inputs_before - len(model.graph.inputs)
        modified |= onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=True, input_size_limit=NO_INPUT_SIZE_LIMIT,
            output_size_limit=self.output_size_limit, should_fold=_keep_shared_weights).modified
        modified |= _detach_dropped_readers(model)
        modified |= common_passes.RemoveUnusedNodesPass()(model).modified
        constants_left = _count(model, "Constant")
        for p in (common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                  common_passes.LiftSubgraphInitializersToMainGraphPass()):
            modified |= p(model).modified
        constants_after = _count(model, "Constant")
        alive = {id(v) for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs}
        inferred = sum(1 for v in shapeless if v.shape is not None and id(v) in alive)
        return FoldConstantsResult(
            model, modified=modified or bool(inferred), lifted=constants_left - constants_after,
            absorbed=constants_before - constants_left,
            folded=max(others_before - (_count(model) - constants_after), 0), unlisted_inputs=unlisted,
            shapes_inferred=inferred, initializers=len(model.graph.initializers))

    def ensures(self, model: ir.Model) -> None:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.outputs[0].is_graph_output():
                raise ir.passes.PostconditionError(f"Constant node {node.name!r} was not lifted")


def _detach_dropped_readers(model: ir.Model) -> bool:
    """Remove the uses that nodes no longer in the model hold on its values. The folder replaces an
    ``If`` with a constant condition by one branch and drops the node, but the nodes of the other
    branch still list the outer values they read among those values' uses: an initializer only they
    read looks used, survives ``RemoveUnusedNodesPass`` and loses its last reader when the model is
    saved (silero-vad op15's four LSTM weights, read by the Slices of the dropped branch)."""
    alive = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    values = [*model.graph.inputs, *model.graph.initializers.values(),
              *(o for n in ir.traversal.RecursiveGraphIterator(model.graph) for o in n.outputs)]
    changed = False
    for v in values:
        for node, index in list(v.uses()):
            if id(node) not in alive:
                node.replace_input_with(index, None)
                changed = True
    return changed


SHARED_WEIGHT_ELEMENTS = 1024  # a constant this large read by several nodes is a weight, not a shape


def _keep_shared_weights(node: ir.Node) -> bool | None:
    """Do not fold a node reading a weight that a node computing on run-time data reads too: the result
    would be a second copy of the weight (a language model's output layer reads the embedding table
    through a Transpose while a Gather reads it directly: folding the Transpose makes two tables).
    Readers that fold as well (two Slices of one initializer) replace the weight, they do not copy it.
    None: the folder's own rules decide."""
    for v in node.inputs:
        if v is None or v.const_value is None or v.const_value.size < SHARED_WEIGHT_ELEMENTS:
            continue
        for user, _ in v.uses():
            if user is not node and not all(_is_constant(i) for i in user.inputs):
                return False
    return None


def _is_constant(value: ir.Value | None, depth: int = 8) -> bool:
    """Whether a value is known before run time: an initializer, a Constant node's output, or computed
    from such values only. The folder visits nodes in order, so a reader in a subgraph or later in
    the graph may still see its constant inputs as Constant nodes not yet folded (silero-vad's LSTM
    gate Slices in both If branches)."""
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    if producer.op_type == "Constant":
        return True
    if not producer.inputs or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                  for a in producer.attributes.values()):
        return False  # a random generator or a control-flow node
    return all(_is_constant(i, depth - 1) for i in producer.inputs)


def _count(model: ir.Model, op_type: str | None = None) -> int:
    return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if op_type is None or n.op_type == op_type)
