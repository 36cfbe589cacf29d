"""edgeq: take a trained model to phones (ONNX Runtime Mobile, Core ML), quantized, and prove
on the host that each package computes what the float model computes.

The API functions and types are imported on first use: ``import edgeq`` (and so the ``edgeq``
command, whose module lives in this package) does not pull in numpy, onnx, onnx-ir or ONNX
Runtime until something needs them, which keeps ``edgeq --help`` and argument errors instant.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

from edgeq.errors import EdgeqError, ExportError, InputError, UnsupportedError, ValidationFailed

# name -> module that defines it
_LAZY = {
    "export": "edgeq.api",
    "validate": "edgeq.api",
    "quantize": "edgeq.api",
    "TensorSpec": "edgeq.specs",
    "Thresholds": "edgeq.validate",
}


class _Lazy:
    """A package attribute imported on first use.

    A data descriptor, because ``edgeq.export`` and ``edgeq.validate`` are also subpackages: the
    import system binds a subpackage on its parent when it is imported, and that binding must not
    replace the function (it stays reachable as ``sys.modules["edgeq.export"]``).
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, package, owner=None):
        if package is None:
            return self
        override = package.__dict__.get(f"_set_{self.name}")
        if override is not None:
            return override
        return getattr(_importlib.import_module(_LAZY[self.name]), self.name)

    def __set__(self, package, value):
        if isinstance(value, _types.ModuleType) and value.__name__ == f"{package.__name__}.{self.name}":
            return  # the import system binding the subpackage of the same name
        package.__dict__[f"_set_{self.name}"] = value  # e.g. a test's monkeypatch


class _Package(_types.ModuleType):
    export = _Lazy("export")
    validate = _Lazy("validate")
    quantize = _Lazy("quantize")
    TensorSpec = _Lazy("TensorSpec")
    Thresholds = _Lazy("Thresholds")


_sys.modules[__name__].__class__ = _Package

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
