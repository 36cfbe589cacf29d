"""Run an ``.ort`` file on the host, for ``edgeq validate`` (entry point ``edgeq.runners: .ort``).

The host ONNX Runtime package is a full build: it loads ORT format models with the same CPU
kernels the ``onnxruntime-android`` package runs. Optimizations were applied when the file was
converted (Fixed style), so the session runs the graph as stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.runtime import ort_session
from edgeq.validate.runners import SessionRunner, session_input_spec

class OrtFormatRunner(SessionRunner):
    """Runs an ORT format model in ONNX Runtime (CPU)."""

    kind = "onnxruntime-ort-format"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        in_package = (self.path.parent / "manifest.json").is_file()
        sess = ort_session(self.path, config={"session.load_model_format": "ORT"}, what=" as an ORT format model",
                           hint="package the QDQ model again with `edgeq package --target android`", spin=False)
        super().__init__(f"{self.path.parent.name}/{self.path.name}" if in_package else self.path.name,
                         sess, [session_input_spec(i) for i in sess.get_inputs()])

    def describe(self):
        import onnxruntime as ort

        return {"kind": self.kind, "label": self.label, "path": str(self.path), "onnxruntime": ort.__version__}
