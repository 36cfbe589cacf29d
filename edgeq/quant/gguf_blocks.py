"""A GGUF file's block-quantized tensors as the integers and scales they hold, found by value in a graph.

llama.cpp stores a weight ``[rows, K]`` row by row, each row in blocks of 32 consecutive values
along K (the input dimension). The three block types edgeq keeps (layouts as ggml defines them;
all scales are float16):

- ``Q4_0`` (18 bytes): ``d``, then 16 bytes holding value ``j`` in the low nibble of byte ``j`` and
  value ``j + 16`` in its high nibble; ``x = d · (q − 8)``.
- ``Q4_1`` (20 bytes): ``d``, ``m``, then the 16 nibble bytes as ``Q4_0``; ``x = d · q + m``.
- ``Q8_0`` (34 bytes): ``d``, then 32 int8 codes; ``x = d · q``.

The K-quants (``Q2_K`` … ``Q6_K``: 256-value super-blocks whose 16- or 32-value sub-blocks carry
6- or 8-bit scales of a float16 super-scale), the I-quants and ``Q5_x`` have no DequantizeLinear or
MatMulNBits form; float tensors are not quantized. Those are re-quantized by the recipe.

Why match by value rather than by name: the float graph holds transformers' reading of the file
(q/k rows un-permuted for RoPE, weights transposed for MatMul, renamed by the exporter, and on
ONNX Runtime profiles q/k/v packed into one MatMul). A row of a graph weight (its values along the
block axis) is found among the file's dequantized rows by its exact float32 bytes, so every
relabelling and packing is followed without knowing it — and a weight whose rows all match is,
by construction, bit for bit the file's integers dequantized the way the float reference was.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import InputError
from edgeq.quant.formats import QuantizedTensor

GGUF_FILE_KEY = "edgeq.gguf_file"  # ONNX metadata the causal-LM export writes: the GGUF the weights came from
BLOCK = 32  # values per block of Q4_0, Q4_1, Q8_0
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_NIBBLE_BYTES = BLOCK // 2


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise InputError("reading a GGUF file needs the gguf package", hint="pip install 'edgeq[llm]'") from e
    return gguf


@dataclass(frozen=True, eq=False)
class Blocks:
    """Rows of one GGUF tensor as ``d`` [rows, K/32] (float16), ``m`` (Q4_1, else None) and codes ``q`` [rows, K]
    (uint8 0..15 for Q4_x, int8 for Q8_0), exactly as stored."""

    type: str
    d: np.ndarray
    m: np.ndarray | None
    q: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 values in ggml's arithmetic: ``d·q`` then ``+ m``, each rounded to float32 (what the
        gguf package, and so transformers, computes; Q4_0 codes are ``q − 8``)."""
        d = np.repeat(self.d.astype(np.float32), BLOCK, axis=1)
        q = self.q.astype(np.float32) - (8.0 if self.type == "Q4_0" else 0.0)
        x = d * q
        if self.m is not None:
            x = x + np.repeat(self.m.astype(np.float32), BLOCK, axis=1)
        return x

    def take(self, rows: np.ndarray) -> Blocks:
        return Blocks(self.type, self.d[rows], None if self.m is None else self.m[rows], self.q[rows])


def blocks_of(raw: np.ndarray, qtype: str) -> Blocks:
    """Parse the bytes ``raw`` [rows, bytes per row] (a gguf ``ReaderTensor.data``) of a Q4_0/Q4_1/Q8_0 tensor."""
    rows = raw.shape[0]
    size = {"Q4_0": 2 + _NIBBLE_BYTES, "Q4_1": 4 + _NIBBLE_BYTES, "Q8_0": 2 + BLOCK}[qtype]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    m = b[..., 2:4].copy().view(np.float16)[..., 0] if qtype == "Q4_1" else None
    body = b[..., (4 if qtype == "Q4_1" else 2):]
    if qtype == "Q8_0":
        q = body.copy().view(np.int8).reshape(rows, -1)
    else:
        q = np.concatenate([body & 0x0F, body >> 4], axis=-1).reshape(rows, -1)  # low nibbles are values 0..15
    return Blocks(qtype, d, m, q)


@dataclass(frozen=True, eq=False)
class BlockOffsetTensor(QuantizedTensor):
    """int4 blocks plus a float offset per block: ``data · scale + offset`` (GGUF Q4_1's ``d·q + m``).

    The codes are ``q − 8`` at scale ``d``; ``minimum`` is ``m`` (float16, the scale's shape) and the
    offset ``m + 8d``, computed in float32. Both ``d`` and ``m`` are the file's float16 values, so
    the graph can store them as float16 (the file's bytes) and compute the offset at load time.
    The offset is exact in float32 when ``m`` and ``8d`` are within 2^13 of each other;
    :attr:`inexact_offsets` counts the blocks where it is not (each then one float32 rounding away
    from the file's value). A block with ``d = 0`` (all values ``m``) keeps scale 0.
    """

    minimum: np.ndarray = None  # type: ignore[assignment]  (required; dataclass field order forces a default)
    inexact_offsets: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.minimum is None or self.minimum.shape != self.scale.shape or self.minimum.dtype != np.float16:
            raise ValueError("minimum must be float16 with the scale's shape")
        if self.zero_point is not None or not np.array_equal(self.scale.astype(np.float16).astype(self.scale.dtype),
                                                             self.scale):
            raise ValueError("a BlockOffsetTensor has float16-exact scales and no zero point")

    @property
    def offset(self) -> np.ndarray:
        """``m + 8d`` in float32 (what the graph computes from the stored float16 values)."""
        return self.minimum.astype(np.float32) + np.float32(8.0) * self.scale.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        return super().dequantize() + self._expand(self.offset)

    @property
    def nbytes_ideal(self) -> int:
        return super().nbytes_ideal + self.minimum.nbytes


def to_quantized(blocks: Blocks, axis: int, *, scale_dtype=np.float32) -> QuantizedTensor:
    """The weight ``[K, N]`` (``axis`` 0: blocks down the columns, the rows of ``blocks`` as its columns) or
    ``[N, K]`` (``axis`` 1) holding ``blocks``' integers: Q8_0 int8, Q4_0 int4 ``q − 8``, Q4_1 a
    :class:`BlockOffsetTensor`. A Q4_0/Q8_0 block with ``d = 0`` (all values 0) gets codes 0 and scale 1
    (:mod:`edgeq.quant.formats` never stores a zero scale); its values are unchanged."""
    d = blocks.d.astype(np.float32)
    codes = blocks.q.astype(np.int8) if blocks.type == "Q8_0" else (blocks.q.astype(np.int16) - 8).astype(np.int8)
    minimum, inexact = blocks.m, 0
    if minimum is None:
        zero = d == 0
        if zero.any():
            codes = codes.copy()
            codes[np.repeat(zero, BLOCK, axis=1)] = 0
            d = np.where(zero, np.float32(1.0), d)
    else:
        m = minimum.astype(np.float64)
        inexact = int(np.count_nonzero((minimum.astype(np.float32) + np.float32(8.0) * d).astype(np.float64)
                                       != m + 8.0 * d.astype(np.float64)))
    scale = d.astype(scale_dtype)
    if axis == 0:
        codes, scale = codes.T, scale.T
        minimum = None if minimum is None else minimum.T
    common = {"data": np.ascontiguousarray(codes), "scale": np.ascontiguousarray(scale), "zero_point": None,
              "axis": axis, "block_size": BLOCK, "dtype": "int8" if blocks.type == "Q8_0" else "int4"}
    if minimum is None:
        return QuantizedTensor(**common)
    return BlockOffsetTensor(**common, minimum=np.ascontiguousarray(minimum), inexact_offsets=inexact)


@dataclass(frozen=True)
class RowSource:
    tensor: str
    row: int


class GGUFRows:
    """Every row of a GGUF file's 2-D tensors, found by its dequantized float32 bytes."""

    def __init__(self, path: str | os.PathLike):
        gguf = _import_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"GGUF file not found: {self.path}",
                             hint="keep the .gguf the model was exported from, or name it in the recipe "
                                  "([algorithms] keep_gguf = {file = \"model.gguf\"})")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read {self.path.name} as a GGUF file: {e}") from e
        self.types: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.skipped: dict[str, str] = {}  # tensor -> why its rows are not indexed
        self._raw: dict[str, np.ndarray] = {}
        self._index: dict[bytes, RowSource] = {}
        for t in reader.tensors:
            qtype = t.tensor_type.name
            dims = [int(x) for x in t.shape if int(x) != 1] if len(t.shape) > 2 else [int(x) for x in t.shape]
            if len(dims) != 2:
                continue  # norms, biases: edgeq leaves them float
            k, rows = dims  # ggml lists the fastest-moving dimension first
            self.types[t.name] = qtype
            self.shapes[t.name] = (rows, k)
            try:
                values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(rows, k)
            except (NotImplementedError, ValueError, KeyError) as e:
                self.skipped[t.name] = f"the gguf package cannot dequantize {qtype}: {e}"
                continue
            if qtype in KEPT_TYPES:
                self._raw[t.name] = t.data
            for r in range(rows):
                self._index.setdefault(_digest(values[r]), RowSource(t.name, r))

    def find(self, rows: np.ndarray) -> list[RowSource | None]:
        """The file row each of ``rows`` [n, K] (float32) equals, or None."""
        rows = np.ascontiguousarray(rows, np.float32)
        return [self._index.get(_digest(r)) for r in rows]

    def blocks(self, sources: list[RowSource]) -> Blocks:
        """The integers of ``sources`` (rows of Q4_0/Q4_1/Q8_0 tensors, all one type), in that order."""
        qtype = self.types[sources[0].tensor]
        parts, order = [], []
        by_tensor: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            by_tensor.setdefault(s.tensor, []).append(i)
        for name, idx in by_tensor.items():
            b = blocks_of(self._raw[name], qtype).take(np.array([sources[i].row for i in idx]))
            parts.append(b)
            order.extend(idx)
        inv = np.argsort(np.array(order))
        cat = Blocks(qtype, np.concatenate([p.d for p in parts])[inv],
                     None if parts[0].m is None else np.concatenate([p.m for p in parts])[inv],
                     np.concatenate([p.q for p in parts])[inv])
        return cat


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()
