"""Run an ``.ort`` file on the host, for ``edgeq validate`` (entry point ``edgeq.runners: .ort``).

The host ONNX Runtime package is a full build: it loads ORT format models with the same CPU
kernels the ``onnxruntime-android`` package runs. Optimizations were applied when the file was
converted (Fixed style), so the session runs the graph as stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.errors import InputError
from edgeq.specs import DTYPES, TensorSpec
from edgeq.runtime import ort_session
from edgeq.validate.runners import SessionRunner

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


class OrtFormatRunner(SessionRunner):
    """Runs an ORT format model in ONNX Runtime (CPU)."""

    kind = "onnxruntime-ort-format"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        in_package = (self.path.parent / "manifest.json").is_file()
        sess = ort_session(self.path, config={"session.load_model_format": "ORT"}, what=" as an ORT format model",
                           hint="package the QDQ model again with `edgeq package --target android`")
        super().__init__(f"{self.path.parent.name}/{self.path.name}" if in_package else self.path.name,
                         sess, [input_spec(i) for i in sess.get_inputs()])

    def describe(self):
        import onnxruntime as ort

        return {"kind": self.kind, "label": self.label, "path": str(self.path), "onnxruntime": ort.__version__}


def input_spec(arg) -> TensorSpec:
    """The spec of an ONNX Runtime session input (an unnamed dynamic axis gets a name)."""
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None or dtype not in DTYPES:
        raise InputError(f"input {arg.name!r} has type {arg.type}, which edgeq cannot feed")
    dims = tuple(d if isinstance(d, int) else (d or f"{arg.name}_dim{i}") for i, d in enumerate(arg.shape))
    return TensorSpec(arg.name, dims, dtype)
