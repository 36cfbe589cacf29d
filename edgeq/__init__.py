"""edgeq: take a trained model to phones (ONNX Runtime Mobile, Core ML), quantized, and prove
on the host that each package computes what the float model computes."""

__version__ = "0.1.0"

from edgeq.errors import EdgeqError, ExportError, InputError, UnsupportedError, ValidationFailed  # noqa: E402
from edgeq.specs import TensorSpec  # noqa: E402


def __getattr__(name):
    # The API pulls in onnxruntime and friends; load it on first use so `import edgeq` stays light.
    if name in ("export", "validate"):
        from edgeq import api

        return getattr(api, name)
    if name == "Thresholds":
        from edgeq.validate import Thresholds

        return Thresholds
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")


__all__ = [
    "EdgeqError",
    "ExportError",
    "InputError",
    "TensorSpec",
    "Thresholds",
    "UnsupportedError",
    "ValidationFailed",
    "__version__",
    "export",
    "validate",
]
