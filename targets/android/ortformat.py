"""Reading ORT format (``.ort``) files, and making their bytes reproducible.

An ``.ort`` file is a FlatBuffer (schema ``onnxruntime/core/flatbuffers/schema/ort.fbs``); ONNX
Runtime ships the generated Python readers in ``onnxruntime.tools.ort_format_model``. Two facts
checked on ONNX Runtime 1.32 shape this module:

- **The ORT format has no 4-bit tensor type.** Its ``TensorDataType`` enum stops at the float8
  types (format version 6): an int4, uint4 or float4e2m1 initializer is written with a type the
  loader rejects ("Unsupported tensor data type ... Invalid ORT format model"). Only 4-bit weights
  that the converter packs into ``com.microsoft.MatMulNBits`` (uint8 blobs) survive.
- **Two conversions of the same model differ in a few hundred bytes.** The graph is written in
  the same order each time, but the kernel-type-string table at the head of the file is written
  in hash-map order, which changes from process to process. :func:`canonicalize` rewrites that
  table (the root table and the resolver, nothing else) in sorted order, so the same input
  always gives the same bytes. The model table and everything it holds are copied unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
from flatbuffers import encode, number_types


def _load_ort_flatbuffers() -> None:
    """Import ONNX Runtime's generated ``ort_flatbuffers_py`` package from where ORT ships it.

    ``onnxruntime.tools.ort_format_model`` would do it too, but ``onnxruntime.tools`` imports
    torch when torch is installed (seconds); the generated modules need nothing of it.
    """
    if "ort_flatbuffers_py" in sys.modules:
        return
    ort_spec = importlib.util.find_spec("onnxruntime")
    root = Path(ort_spec.origin).parent / "tools" / "ort_format_model" / "ort_flatbuffers_py"
    spec = importlib.util.spec_from_file_location("ort_flatbuffers_py", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ort_flatbuffers_py"] = module
    spec.loader.exec_module(module)


_load_ort_flatbuffers()
from ort_flatbuffers_py.fbs import (  # noqa: E402
    ArgTypeAndIndex,
    AttributeType,
    InferenceSession,
    KernelTypeStrArgsEntry,
    KernelTypeStrResolver,
    OpIdKernelTypeStrArgsEntry,
    TensorDataType,
)

FILE_IDENTIFIER = b"ORTM"


@functools.lru_cache(maxsize=1)
def storable_types() -> dict[int, str]:
    """Tensor element types the ORT format can store: ONNX ``TensorProto`` value → name."""
    enum = TensorDataType.TensorDataType
    return {v: k.lower() for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int) and v}


def type_name(elem_type: int) -> str:
    """``int4``, ``float4e2m1``, ... for an ONNX ``TensorProto`` element type."""
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower()


@dataclass(frozen=True)
class OrtTensor:
    name: str
    data_type: int  # ONNX TensorProto value (the ORT format uses the same numbers)
    dims: tuple[int, ...]


def _root(data: bytes | bytearray):
    buf = data if isinstance(data, bytearray) else bytearray(data)
    if len(buf) < 8 or not InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise ValueError("not an ORT format model (no 'ORTM' file identifier)")
    return InferenceSession.InferenceSession.GetRootAs(buf, 0)


def format_version(data: bytes) -> str:
    """The ORT format version stored in the file (``"6"`` for ONNX Runtime 1.16 and later)."""
    v = _root(data).OrtVersion()
    return v.decode() if v else ""


def _graphs(graph) -> Iterator:
    yield graph
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        for j in range(node.AttributesLength()):
            attr = node.Attributes(j)
            if attr.Type() == AttributeType.AttributeType.GRAPH:
                yield from _graphs(attr.G())
            elif attr.Type() == AttributeType.AttributeType.GRAPHS:
                for k in range(attr.GraphsLength()):
                    yield from _graphs(attr.Graphs(k))


def tensors(data: bytes) -> list[OrtTensor]:
    """Every initializer of the model, subgraphs included."""
    out = []
    for g in _graphs(_root(data).Model().Graph()):
        for i in range(g.InitializersLength()):
            t = g.Initializers(i)
            out.append(OrtTensor(t.Name().decode(), t.DataType(), tuple(t.Dims(j) for j in range(t.DimsLength()))))
    return out


def unstorable_tensors(data: bytes) -> list[OrtTensor]:
    """Initializers whose type the ORT format cannot hold (the file will not load)."""
    ok = storable_types()
    return [t for t in tensors(data) if t.data_type not in ok]


def node_ops(data: bytes) -> set[tuple[str, int, str]]:
    """``(domain, since_version, op_type)`` of every node, subgraphs included."""
    ops = set()
    for g in _graphs(_root(data).Model().Graph()):
        for i in range(g.NodesLength()):
            n = g.Nodes(i)
            ops.add((n.Domain().decode() or "ai.onnx", n.SinceVersion(), n.OpType().decode()))
    return ops


# --- canonical bytes --------------------------------------------------------------------------

def _resolver_entries(session) -> list[tuple[bytes, list[tuple[bytes, list[tuple[int, int]]]]]]:
    res = session.KernelTypeStrResolver()
    if res is None:
        return []
    out = []
    for i in range(res.OpKernelTypeStrArgsLength()):
        op = res.OpKernelTypeStrArgs(i)
        strs = []
        for j in range(op.KernelTypeStrArgsLength()):
            e = op.KernelTypeStrArgs(j)
            args = [(e.Args(k).ArgType(), e.Args(k).Index()) for k in range(e.ArgsLength())]
            strs.append((e.KernelTypeStr(), args))
        out.append((op.OpId(), sorted(strs)))
    return sorted(out)


def _field_pos(tab, slot_offset: int) -> int | None:
    o = tab.Offset(slot_offset)
    return tab.Indirect(o + tab.Pos) if o else None


def _table_vector(b, start_vector, offsets: list[int]) -> int:
    """A flatbuffers vector of tables (written back to front, as flatbuffers builds them)."""
    start_vector(b, len(offsets))
    for t in reversed(offsets):
        b.PrependUOffsetTRelative(t)
    return b.EndVector()


def canonicalize(data: bytes) -> bytes:
    """The same ORT model with its kernel-type-string table written in sorted order.

    ONNX Runtime writes the root ``InferenceSession`` and its ``KernelTypeStrResolver`` last, so
    they sit at the head of the buffer; everything from the model table on is copied byte for
    byte, at the same distance from the end of the buffer (FlatBuffers aligns relative to the
    end), and only the head is rebuilt.
    """
    buf = bytearray(data)
    session = _root(buf)
    tab = session._tab
    vtable = tab.Pos - encode.Get(number_types.SOffsetTFlags.packer_type, buf, tab.Pos)
    n_fields = (encode.Get(number_types.VOffsetTFlags.packer_type, buf, vtable) - 4) // 2
    if n_fields > 4 or tab.Offset(8):  # slot 2 is the deprecated session_state: never written since format v5
        raise ValueError("unexpected fields in the ORT format root table")
    model_pos = _field_pos(tab, 6)
    version_pos = _field_pos(tab, 4)
    if model_pos is None:
        raise ValueError("ORT format file without a model")
    model_vtable = model_pos - encode.Get(number_types.SOffsetTFlags.packer_type, buf, model_pos)
    cut = min(model_pos, model_vtable)
    if version_pos is not None and version_pos < cut:
        raise ValueError("unexpected layout of the ORT format file (version string after the model)")
    entries = _resolver_entries(session)

    body = bytes(buf[cut:])
    end = len(buf)
    b = flatbuffers.Builder(len(body) + 4096)
    b.Bytes[len(b.Bytes) - len(body):] = body
    b.head = len(b.Bytes) - len(body)
    b.minalign = min(end & -end, 64)  # keep the body at the alignment the original length had

    def rel(pos: int) -> int:  # offset-from-end of an object of the original buffer
        return end - pos

    # strings first (in sorted order), then tables, innermost first
    op_offsets = []
    for op_id, strs in entries:
        op_str = b.CreateString(op_id)
        str_offsets = []
        for kts, args in strs:
            kts_str = b.CreateString(kts)
            arg_tables = []
            for arg_type, index in args:
                ArgTypeAndIndex.Start(b)
                ArgTypeAndIndex.AddArgType(b, arg_type)
                ArgTypeAndIndex.AddIndex(b, index)
                arg_tables.append(ArgTypeAndIndex.End(b))
            args_vec = _table_vector(b, KernelTypeStrArgsEntry.StartArgsVector, arg_tables)
            KernelTypeStrArgsEntry.Start(b)
            KernelTypeStrArgsEntry.AddKernelTypeStr(b, kts_str)
            KernelTypeStrArgsEntry.AddArgs(b, args_vec)
            str_offsets.append(KernelTypeStrArgsEntry.End(b))
        strs_vec = _table_vector(b, OpIdKernelTypeStrArgsEntry.StartKernelTypeStrArgsVector, str_offsets)
        OpIdKernelTypeStrArgsEntry.Start(b)
        OpIdKernelTypeStrArgsEntry.AddOpId(b, op_str)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(b, strs_vec)
        op_offsets.append(OpIdKernelTypeStrArgsEntry.End(b))
    ops_vec = _table_vector(b, KernelTypeStrResolver.StartOpKernelTypeStrArgsVector, op_offsets)
    KernelTypeStrResolver.Start(b)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(b, ops_vec)
    resolver = KernelTypeStrResolver.End(b)

    InferenceSession.Start(b)
    if version_pos is not None:
        InferenceSession.AddOrtVersion(b, rel(version_pos))
    InferenceSession.AddModel(b, rel(model_pos))
    InferenceSession.AddKernelTypeStrResolver(b, resolver)
    b.Finish(InferenceSession.End(b), file_identifier=FILE_IDENTIFIER)
    out = bytes(b.Output())

    # the rewrite must change nothing but the order: same resolver content, same model bytes
    check = _root(out)
    if _resolver_entries(check) != entries or not out.endswith(body) or \
            len(out) - check.Model()._tab.Pos != rel(model_pos):
        raise ValueError("canonical rewrite of the ORT format file changed its content")
    return out


def canonicalize_file(path: Path) -> None:
    path = Path(path)
    path.write_bytes(canonicalize(path.read_bytes()))
