"""edgeq: take a trained model to phones (ONNX Runtime Mobile, Core ML), quantized, and prove
on the host that each package computes what the float model computes."""

__version__ = "0.1.0"

from edgeq.errors import EdgeqError, ExportError, InputError, UnsupportedError, ValidationFailed  # noqa: E402
from edgeq.specs import TensorSpec  # noqa: E402
from edgeq.validate import Thresholds  # noqa: E402
from edgeq import api as _api  # noqa: E402

# Bound after the subpackages are imported: `edgeq.export` is the function, the exporter
# package stays reachable as `edgeq.export.torch_export` through sys.modules.
export = _api.export
validate = _api.validate
quantize = _api.quantize

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
    "quantize",
    "validate",
]
