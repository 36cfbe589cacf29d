"""The ML program of a saved ``.mlpackage``, read straight from its protobuf for the executor.

coremltools' own loader (``milproto.load``) rebuilds a PyMIL ``Program`` and re-runs every op's
type inference on the way, which took 2.5 s of MiniLM's 3.4 s load (symbolic reshape shapes,
mostly). Running the program needs none of that: each operation's type, its arguments (value
names or constants) and its outputs' declared dtypes are in the protobuf. Constant values are
decoded with coremltools' value reader, the same code its loader uses (immediate values, packed
sub-byte integers, the ``weights/`` blob file).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq._quiet import quiet
from edgeq.errors import InputError, UnsupportedError

# MIL data types as numpy holds them (4-bit integers are unpacked into bytes)
_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "INT8": np.int8, "INT16": np.int16,
           "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
           "BOOL": np.bool_, "INT4": np.int8, "UINT4": np.uint8, "UINT1": np.uint8, "UINT2": np.uint8,
           "UINT3": np.uint8, "UINT6": np.uint8}


@dataclass(frozen=True)
class Value:
    name: str
    dtype: type | None  # numpy dtype; None for strings and non-tensor values
    mil_dtype: str  # the MIL type name, e.g. FLOAT16
    state: bool = False  # a state (iOS 18): a tensor kept across predictions, read and written by ops
    shape: tuple | None = None  # a state's fixed shape (states have no flexible axes)
    rank: int | None = None  # a tensor's rank, as the program declares it


@dataclass
class Operation:
    op_type: str
    name: str
    inputs: dict  # parameter -> value name | Const | list of them (tuple parameters)
    outputs: list[Value]
    val: object = None  # a const op's value


@dataclass(frozen=True)
class Const:
    """A constant bound directly to a parameter (not through a const op)."""

    val: object


@dataclass
class Program:
    inputs: dict[str, Value]
    outputs: list[str]
    operations: list[Operation] = field(default_factory=list)


def weights_dir(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights"


def load_spec(package: str | os.PathLike):
    """The Core ML spec (protobuf) of a saved ``.mlpackage``, checked to hold an ML program."""
    p = Path(package)
    if not (p / "Manifest.json").exists():
        raise InputError(f"{p} is not an .mlpackage (no Manifest.json)", hint="give the .mlpackage folder")
    with quiet():
        import coremltools as ct

        spec = ct.utils.load_spec(str(p))
    if spec.WhichOneof("Type") != "mlProgram":
        raise InputError(f"{p} holds a {spec.WhichOneof('Type')} model, not an ML program")
    return spec


def read_program(package: str | os.PathLike, function: str = "main") -> tuple[Program, object]:
    """The ``function`` of a saved package's ML program, and the package's Core ML spec."""
    p = Path(package)
    spec = load_spec(p)
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext
        from coremltools.proto import MIL_pb2
    if function not in spec.mlProgram.functions:
        raise InputError(f"{p} has no function {function!r}",
                         hint=f"its functions: {', '.join(spec.mlProgram.functions)}")
    fspec = spec.mlProgram.functions[function]
    reader = _Reader(TranscriptionContext(str(weights_dir(p))), MIL_pb2)
    inputs = {v.name: reader.value_type(v) for v in fspec.inputs}
    block = fspec.block_specializations[fspec.opset]
    ops = [reader.operation(o) for o in block.operations]
    return Program(inputs, list(block.outputs), ops), spec


class _Reader:
    def __init__(self, context, mil_pb2):
        self._context = context
        self._pb = mil_pb2

    def value_type(self, named) -> Value:
        kind = named.type.WhichOneof("type")
        if kind == "stateType":  # iOS 18 state: a wrapped tensor of fixed shape
            wrapped = named.type.stateType.wrappedType
            if wrapped.WhichOneof("type") != "tensorType":
                raise UnsupportedError(f"MIL state {named.name!r} wraps a {wrapped.WhichOneof('type')}, "
                                       "which the reference executor does not run")
            dims = wrapped.tensorType.dimensions
            if any(d.WhichOneof("dimension") != "constant" for d in dims):
                raise UnsupportedError(f"MIL state {named.name!r} has a flexible shape (Core ML states are fixed)")
            name = self._pb.DataType.Name(wrapped.tensorType.dataType)
            return Value(named.name, _DTYPES.get(name), name, state=True,
                         shape=tuple(int(d.constant.size) for d in dims))
        if kind != "tensorType":
            raise UnsupportedError(f"MIL value {named.name!r} has a {kind}, which the reference executor does not run",
                                   hint="package for Android instead (--targets android)")
        name = self._pb.DataType.Name(named.type.tensorType.dataType)
        return Value(named.name, _DTYPES.get(name), name, rank=int(named.type.tensorType.rank))

    def constant(self, value_spec):
        from coremltools.converters.mil.frontend.milproto.load import _load_value

        return _load_value(self._context, value_spec)

    def operation(self, spec) -> Operation:
        if spec.blocks:
            raise UnsupportedError(f"MIL op {spec.type!r} has nested blocks (control flow), which the reference "
                                   "executor does not run", hint="fix the shapes that feed the condition "
                                   "(edgeq package --shape AXIS=N) so the branch folds away, or package for Android")
        name_attr = spec.attributes.get("name")
        name = self.constant(name_attr) if name_attr is not None else spec.outputs[0].name
        outputs = [self.value_type(o) for o in spec.outputs]
        if spec.type == "const":
            return Operation("const", name, {}, outputs, val=self.constant(spec.attributes["val"]))
        tuples = _tuple_parameters(spec.type)
        inputs = {}
        if spec.type.startswith("constexpr_"):  # iOS 16/17 constexpr ops carry their parameters as attributes
            inputs.update({k: Const(self.constant(v)) for k, v in spec.attributes.items() if k != "name"})
        for param, argument in spec.inputs.items():
            bound = [b.name if b.WhichOneof("binding") == "name" else Const(self.constant(b.value))
                     for b in argument.arguments]
            inputs[param] = bound if (len(bound) > 1 or param in tuples) else bound[0]
        return Operation(spec.type, name, inputs, outputs)


@functools.cache
def _tuple_parameters(op_type: str) -> frozenset[str]:
    """Parameters that take a list of values even when given one (e.g. ``concat``'s ``values``)."""
    from coremltools.converters.mil.mil.input_type import TupleInputType
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    try:
        cls = SSAOpRegistry._get_core_op_cls(op_type)  # how coremltools' own loader decides it
    except ValueError:  # an op coremltools does not define: a list only where there are several values
        return frozenset()
    return frozenset(k for k, t in cls.input_spec.input_types.items() if isinstance(t, TupleInputType))
