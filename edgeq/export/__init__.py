"""PyTorch → ONNX export (torch is imported only inside this package, and only when used)."""

from edgeq.export.torch_export import ExportCheck, ExportResult, export_torch

__all__ = ["ExportCheck", "ExportResult", "export_torch"]
