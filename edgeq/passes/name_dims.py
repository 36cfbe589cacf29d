"""Dynamic dimensions every runtime accepts: named like identifiers, never ``-1`` or ``?``.

Exporters write dynamic dims in many ways: paddle2onnx ``p2o.DynamicDimension.0`` and ``?``,
old exporters ``-1`` or no name at all, tf2onnx ``unk__749``, torch ``Min(512, sequence)`` on
intermediate values. Core ML symbols must start with a letter; ONNX forbids negative sizes.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import onnx_ir as ir

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_UNKNOWN = ("", "?")  # names that mean "no name"
_GENERATED = re.compile(r"unk__[0-9]+\Z")  # what ONNX shape inference and tf2onnx call an unknown dim
# what an expression between dims may contain (torch/sympy writes Min, Max, floor, ...)
_EXPRESSION_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Load,
                     ast.operator, ast.unaryop)


@dataclasses.dataclass
class NameDimsResult(ir.passes.PassResult):
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # odd name -> valid name
    named: dict[str, str] = dataclasses.field(default_factory=dict)  # "value[axis]" -> name given to an unknown dim
    cleared: int = 0  # negative sizes / "?" on intermediate values made unknown


class NameDimsPass(ir.passes.InPlacePass):
    """Make every dynamic dimension of the model's inputs and outputs a valid, distinct name.

    Rules:

    - Fixed sizes stay. A name that is an identifier starting with a letter (``batch``,
      ``unk__749``) stays.
    - Any other name (``p2o.DynamicDimension.0``, ``batch size``, ``_n``) is renamed wherever it
      occurs (all graphs, all values) to the same new name: each run of characters other than
      letters, digits and ``_`` becomes ``_``, leading and trailing ``_`` go, a name that does not
      start with a letter gets ``dim_`` in front, and ``_1``, ``_2``, ... make it differ from every
      other dim name of the model. Names are handled in order of first appearance (inputs,
      outputs, then values in graph order), so the result is deterministic.
    - An arithmetic expression of names (``Min(512, sequence)``: torch writes these on
      intermediate values) is a relation, not a name: kept on intermediate values, renamed when it
      is a dim of a graph input or output.
    - An unknown dim (no name, ``?``, empty, or a negative size such as ``-1``) of a main-graph
      input or output becomes ``{value name}_dim{axis}`` (made valid as above): each is its own
      axis, since nothing says two unknowns are equal (``edgeq.onnx_io.io_specs`` names them the
      same way). On any other value it becomes unknown (no name): a negative size is not ONNX.
    - A generated name (``unk__749``: ONNX shape inference, tf2onnx) on a main-graph input or
      output is named like an unknown dim at its first place there, and renamed the same way
      everywhere else, so dims it made equal stay equal.
    """

    def call(self, model: ir.Model) -> NameDimsResult:
        main_io = [*model.graph.inputs, *model.graph.outputs]
        io_ids = {id(v) for v in main_io}
        values = _all_values(model)
        taken = {d.value for v in values for d in _dims(v) if isinstance(d, ir.SymbolicDim) and _is_identifier(d.value)}
        renamed: dict[str, str] = {}
        for v in values:  # main inputs and outputs come first
            for axis, d in enumerate(_dims(v)):
                name = d.value if isinstance(d, ir.SymbolicDim) else None
                if name is None or name in _UNKNOWN or name in renamed:
                    continue
                if id(v) in io_ids and _GENERATED.match(name):
                    renamed[name] = _unique(_valid(f"{v.name}_dim{axis}"), taken)
                elif not _is_identifier(name) and (id(v) in io_ids or not _is_expression(name)):
                    renamed[name] = _unique(_valid(name), taken)
        named: dict[str, str] = {}
        cleared = 0
        for v in values:
            dims = _dims(v)
            if not dims:
                continue
            new = []
            for axis, d in enumerate(dims):
                name = d.value if isinstance(d, ir.SymbolicDim) else None
                unknown = (isinstance(d, int) and d < 0) or (isinstance(d, ir.SymbolicDim) and (name is None or name in _UNKNOWN))
                if unknown and id(v) in io_ids:
                    given = _unique(_valid(f"{v.name}_dim{axis}"), taken)
                    named[f"{v.name}[{axis}]"] = given
                    new.append(ir.SymbolicDim(given))
                elif unknown:
                    cleared += name is not None or isinstance(d, int)
                    new.append(ir.SymbolicDim(None))
                elif name is not None and name in renamed:
                    new.append(ir.SymbolicDim(renamed[name]))
                else:
                    new.append(d)
            if any(a is not b for a, b in zip(new, dims)):
                v.shape = ir.Shape(new)
        return NameDimsResult(model, modified=bool(renamed or named or cleared), renamed=renamed, named=named,
                              cleared=cleared)

    def ensures(self, model: ir.Model) -> None:
        for v in [*model.graph.inputs, *model.graph.outputs]:
            for d in _dims(v):
                if isinstance(d, int) and d < 0 or isinstance(d, ir.SymbolicDim) and not _is_identifier(d.value):
                    raise ir.passes.PostconditionError(f"{v.name} has dim {d!r}, not a size or a valid name")


def _all_values(model: ir.Model) -> list[ir.Value]:
    """Main inputs and outputs first, then every other value of every graph, each once."""
    seen: set[int] = set()
    out: list[ir.Value] = []

    def add(v: ir.Value | None) -> None:
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            out.append(v)

    for v in [*model.graph.inputs, *model.graph.outputs]:
        add(v)
    for graph in model.graphs():
        for v in [*graph.inputs, *graph.outputs, *graph.initializers.values()]:
            add(v)
        for node in graph:
            for v in node.outputs:
                add(v)
    return out


def _dims(v: ir.Value) -> tuple:
    return tuple(v.shape) if v.shape is not None else ()


def _is_identifier(name: str | None) -> bool:
    return name is not None and _IDENTIFIER.match(name) is not None


def _is_expression(name: str) -> bool:
    """An arithmetic expression whose names are all identifiers, e.g. ``Min(512, sequence)``."""
    try:
        tree = ast.parse(name, mode="eval")
    except SyntaxError:
        return False
    nodes = list(ast.walk(tree))
    return (all(isinstance(n, _EXPRESSION_NODES) for n in nodes)
            and all(_is_identifier(n.id) for n in nodes if isinstance(n, ast.Name))
            and any(isinstance(n, (ast.BinOp, ast.UnaryOp, ast.Call)) for n in nodes))


def _valid(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    return s if _is_identifier(s) else f"dim_{s}" if s else "dim"


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
