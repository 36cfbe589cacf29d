"""Reading and writing ONNX files: clear errors in, atomic writes out.

Writes go to a temporary folder beside the destination and are moved into place only when
complete, so a failure or an interrupt never leaves a half-written model. Models whose tensors
pass the 2 GB protobuf limit are saved with their weights in an external data file
``<model file name>.data`` next to the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from edgeq.errors import InputError, first_line
from edgeq.specs import DTYPES, TensorSpec

# Protobuf cannot serialize a message past 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26
# With external data, tensors smaller than this stay inline.
_INLINE_TENSOR_BYTES = 1024


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with its external data) or raise :class:`InputError` saying why not."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"ONNX file not found: {p}", hint="check the path")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise InputError(
            f"cannot read {p} as ONNX: {first_line(e)}",
            hint="the file is corrupt or not an ONNX model; export it again",
        ) from e
    if not model.graph.output or (not model.graph.node and not model.graph.input):
        raise InputError(
            f"{p} holds no ONNX graph (no nodes, no outputs)",
            hint="the file is corrupt or not an ONNX model; export it again",
        )
    return model


def load_ir(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an ``onnx_ir`` model, with the errors of :func:`read_onnx`."""
    return ir.from_proto(read_onnx(path))


def default_opset(model: onnx.ModelProto, missing: int = 0) -> int:
    """The model's default-domain opset version (``missing`` when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def io_specs(model: onnx.ModelProto | ir.Model, *, outputs: bool = False) -> list[TensorSpec]:
    """The graph inputs (or outputs) of a model as :class:`TensorSpec`, unknown dims named.

    An unknown dim (no name, ``?``, or a negative size such as paddle2onnx's ``-1``) is named
    ``{value name}_dim{axis}``, as the import stage names it (:mod:`edgeq.passes.name_dims`)."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    init_names = {t.name for t in proto.graph.initializer}
    values = proto.graph.output if outputs else [v for v in proto.graph.input if v.name not in init_names]
    specs = []
    for v in values:
        tt = v.type.tensor_type
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        dtype = str(np_dtype) if np_dtype is not None and str(np_dtype) in DTYPES else "float32"
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param not in ("", "?"):
                dims.append(d.dim_param)
            else:
                dims.append(f"{v.name}_dim{i}")
        specs.append(TensorSpec(v.name, tuple(dims), dtype))
    return specs


def check_output_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot be written (or exists without ``force``)."""
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"output {p} already exists", hint="choose another path or pass --force")
    if p.is_dir():
        raise InputError(f"output {p} is a folder", hint="give a file path")
    _check_writable_parent(p)
    return p


def _check_writable_parent(p: Path) -> None:
    """The folder ``p`` goes in, or (missing folders are created when writing) its nearest existing
    ancestor, must be a folder we can write to."""
    parent = p.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {p}: {existing} is not a folder", hint="choose another output path")
    try:  # the real test of writability (permissions, read-only mounts, root or not)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(
            f"cannot write {p}: folder {existing} is not writable ({e.strerror})", hint="choose another output path"
        ) from e


@contextlib.contextmanager
def _parents_made(dest: Path) -> Iterator[None]:
    """Create ``dest``'s missing parent folders; remove the ones made here if the write fails."""
    made = []
    folder = dest.absolute().parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for f in reversed(made):
        f.mkdir()
    try:
        yield
    except BaseException:
        for f in made:  # innermost first; only if still empty
            try:
                f.rmdir()
            except OSError:
                break
        raise


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files an ONNX file names (relative to its folder), without loading the tensors."""
    proto = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def copy_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy an ONNX file and its external data files (under their own names) to ``dst``'s folder."""
    src, dst = Path(src), Path(dst)
    shutil.copyfile(src, dst)
    for loc in external_data_files(src):
        (dst.parent / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, dst.parent / loc)
    return dst


def check_output_folder(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early, before any work, if the folder ``path`` cannot be written (or holds files without ``force``)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"output {p} exists and is not a folder", hint="give a folder path, e.g. -o dist/")
    if p.exists() and any(p.iterdir()) and not force:
        raise InputError(f"output folder {p} already exists and is not empty",
                         hint="choose another folder or pass --force")
    _check_writable_parent(p)
    return p


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, else it is deleted.

    The folder gets ordinary permissions (``mkdtemp`` makes it private). Check ``dest`` with
    :func:`check_output_folder` first.
    """
    dest = Path(dest)
    with _parents_made(dest), _atomic_folder(dest) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_folder(dest: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.absolute().parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the initializers of the main graph."""
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success move its files to ``dest``'s folder, else delete it.

    The file named like ``dest`` inside the folder is moved last, so readers never see a model
    whose external data is missing.
    """
    dest = check_output_path(dest, force=force)
    with _parents_made(dest), _atomic_files(dest, force) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_files(dest: Path, force: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        others = sorted(f for f in tmp.iterdir() if f.name != dest.name)
        if not force:
            clash = [dest.parent / f.name for f in others if (dest.parent / f.name).exists()]
            if clash:
                raise InputError(f"output {clash[0]} already exists", hint="choose another path or pass --force")
        for f in others:
            os.replace(f, dest.parent / f.name)
        os.replace(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_ir(model: ir.Model, path: Path, *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES) -> list[Path]:
    """Write ``model`` to ``path`` (no atomicity: see :func:`save_ir`); return the files written."""
    path = Path(path)
    if tensor_bytes(model) > external_data_threshold:
        data_name = f"{path.name}.data"
        ir.save(model, path, external_data=data_name, size_threshold_bytes=_INLINE_TENSOR_BYTES)
        return [path, path.parent / data_name]
    ir.save(model, path)
    return [path]


def save_ir(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> list[Path]:
    """Save atomically; past ``external_data_threshold`` bytes of weights use external data.

    Returns the files written (the model, and the data file when one is used).
    """
    dest = Path(path)
    with atomic_output(dest, force=force) as tmp:
        files = write_ir(model, tmp / dest.name, external_data_threshold=external_data_threshold)
    return [dest.parent / f.name for f in files]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
