"""The state of one ONNX → MIL lowering: values by ONNX name, the compute precision, helpers.

Partial evaluation: an ONNX value is either *known* at conversion time (a numpy array: an
initializer, a ``Constant``, or anything computed only from those and from static shapes) or
a MIL ``Var`` of the program being built. Op lowerings fold known inputs with numpy and emit MIL
only for what depends on the model's inputs; so with fixed input shapes every Shape-driven
subgraph becomes a constant, and with flexible ones it becomes MIL shape arithmetic.

Types in the program: float tensors are in the compute dtype (fp16 by default, fp32 on
request), ONNX int64 is int32 (Core ML has no int64 tensors), bool stays bool. Quantized weights
are the exception: their integers and float32 scales are stored exactly as the QDQ ONNX holds
them, and the dequantized tensor is cast to the compute dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.errors import UnsupportedError

FP16_MAX = 65504.0
# what a user can do about a node the lowering cannot take (a specific hint replaces it)
DEFAULT_HINT = ("build for Android only (--targets android); if the node depends on dynamic input shapes, "
                "fixing them may let it fold away (edgeq package --shape AXIS=N)")
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


class LoweringError(UnsupportedError):
    """One ONNX node cannot be lowered; carries the node so callers can name it."""

    def __init__(self, node: onnx.NodeProto | None, message: str, *, hint: str | None = None):
        where = f"node {node.name!r} ({node.op_type}): " if node is not None else ""
        super().__init__(where + message, hint=hint or DEFAULT_HINT)
        self.node = node
        self.reason = message


# names coremltools renames on save (its NameSanitizer appends "_workaround"): MIL type names and "state"
_RESERVED = frozenset({"any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string",
                       "bf16", "fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                       "uint32", "uint64", "state"})


def mil_name(name: str) -> str:
    """The MIL name edgeq gives an ONNX value (letters, digits and underscores only; a reserved word
    such as ``state`` gets a trailing underscore, so the saved package keeps the name edgeq chose)."""
    safe = re.sub(r"[^0-9A-Za-z_]", "_", name)
    safe = safe if safe and not safe[0].isdigit() else f"v_{safe}"
    return f"{safe}_" if safe in _RESERVED else safe


def axis_name(input_name: str, index: int, dim) -> str:
    """The name of a dynamic axis: its ``dim_param`` when that names one (has a letter), else
    ``<input>_dim<index>`` (for ``?``, ``-1``, empty or numeric placeholders, which name nothing)."""
    param = dim.dim_param.strip()
    return param if re.search(r"[A-Za-z]", param) else f"{input_name}_dim{index}"


def symbol_names(axes) -> dict[str, str]:
    """A distinct MIL symbol name per axis name: letters, digits and underscores, starting with a
    letter (coremltools' rule), e.g. ``p2o.DynamicDimension.0`` -> ``p2o_DynamicDimension_0``."""
    out, used = {}, set()
    for axis in axes:
        base = re.sub(r"[^0-9A-Za-z_]", "_", axis)
        base = base if base[:1].isalpha() else f"d{base}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        out[axis] = name
    return out


def is_known(x) -> bool:
    return isinstance(x, np.ndarray)


@dataclass
class WeightRecord:
    """A quantized weight as written into the program (read back by the bit-exactness test)."""

    onnx_node: str  # the DequantizeLinear node
    mil_op: str  # the constexpr op's name
    dtype: str  # int8 | uint8 | int4
    shape: tuple[int, ...]
    block_size: int | None
    padded: int = 0  # zero codes appended along the block axis to make whole blocks


@dataclass
class Context:
    """Everything an op lowering needs: the builder, values, precision, opset."""

    mb: object  # coremltools.converters.mil.Builder
    types: object  # coremltools.converters.mil.mil.types
    compute: str  # "fp16" | "fp32"
    opset: int
    deployment: int  # 17 or 18 (iOS major version)
    values: dict = field(default_factory=dict)
    weights: list[WeightRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folded: int = 0  # ONNX nodes evaluated at conversion time
    # DequantizeLinear outputs evaluated to float at conversion (weights of ops that take constants
    # in their own layout, e.g. GRU/LSTM), instead of becoming constexpr ops
    fold_outputs: set = field(default_factory=set)
    # those folded DequantizeLinear nodes and their inputs by output name: iOS 18 stores the integers
    # (gate rows reordered) as constexpr ops feeding the op (lower.recurrent)
    folded_dequantize: dict = field(default_factory=dict)
    # a causal LM's KV cache as states (lower.stateful.StatefulCache), and the nodes it runs in fp32
    cache: object = None
    fp32_nodes: set = field(default_factory=set)  # first outputs of nodes lowered in fp32 in an fp16 program
    fp32_exits: set = field(default_factory=set)  # their outputs read outside the region (rounded to fp16)
    fp32_values: dict = field(default_factory=dict)  # the fp32 values of the region (and widened inputs)
    _taken: set = field(default_factory=set)

    # --- values ----------------------------------------------------------------------------

    def get(self, name: str):
        if name == "":
            return None
        try:
            return self.values[name]
        except KeyError:
            raise UnsupportedError(f"value {name!r} is read before it is written (graph not sorted?)") from None

    def set(self, name: str, value) -> None:
        self.values[name] = value

    @property
    def float_np(self):
        return np.float16 if self.compute == "fp16" else np.float32

    def const(self, arr: np.ndarray, *, name: str | None = None, keep_float32: bool = False):
        """A known array as a MIL const of the program's type for it."""
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            if keep_float32 or self.compute == "fp32":
                arr = arr.astype(np.float32)
            else:
                arr = to_fp16(arr)
        elif arr.dtype == np.int64 or arr.dtype.kind in "iu" and arr.dtype not in (np.int8, np.uint8, np.int32):
            if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
                arr = np.clip(arr, np.iinfo(np.int32).min, np.iinfo(np.int32).max)  # INT64_MAX slice ends
            arr = arr.astype(np.int32)
        elif arr.dtype.kind == "b":
            arr = arr.astype(bool)
        kwargs = {"name": name} if name else {}
        return self.mb.const(val=arr, **kwargs)

    def var(self, x):
        """``x`` as a MIL Var (known arrays become consts)."""
        if is_known(x):
            return self.const(x)
        return x

    def fresh_name(self, base: str) -> str:
        """A MIL name no other value has (``base``, else ``base_2``, ``base_3``, ...), claimed."""
        name, k = base, 1
        while not self.name_free(name):
            k += 1
            name = f"{base}_{k}"
        return name

    def name_free(self, name: str) -> bool:
        """Claim ``name`` for one MIL value (False if another value has it)."""
        if name in self._taken:
            return False
        self._taken.add(name)
        return True

    # --- MIL types --------------------------------------------------------------------------

    def np_dtype(self, x) -> np.dtype:
        """The numpy dtype of a value as the program holds it."""
        if is_known(x):
            return x.dtype
        return np.dtype(self.types.nptype_from_builtin(x.dtype))

    def is_float(self, x) -> bool:
        return self.np_dtype(x).kind == "f"

    def is_bool(self, x) -> bool:
        return self.np_dtype(x).kind == "b"

    def shape(self, x) -> tuple:
        """Static shape: ints, or None for a symbolic dimension."""
        if is_known(x):
            return tuple(int(d) for d in x.shape)
        return tuple(None if self.types.symbolic.is_symbolic(d) else int(d) for d in x.shape)

    def rank(self, x) -> int:
        return len(x.shape)

    def static_shape(self, x) -> tuple[int, ...] | None:
        s = self.shape(x)
        return None if any(d is None for d in s) else s


def to_fp16(arr: np.ndarray) -> np.ndarray:
    """float → fp16, saturating finite values to ±65504 (an fp32 "minus infinity" mask stays finite)."""
    a = np.asarray(arr, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    over = np.isfinite(a) & ~np.isfinite(h)
    if over.any():
        h = np.where(over, np.sign(a) * np.float16(FP16_MAX), h).astype(np.float16)
    return h


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    v = attrs(node).get(name, default)
    return v.decode() if isinstance(v, bytes) else v
