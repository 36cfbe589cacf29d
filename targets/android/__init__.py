"""Android: ONNX Runtime Mobile packages (``.ort`` + ``required_operators.config``).

See ``targets/android/README.md`` for what is built, how, and why.
"""

from targets.android.runner import OrtFormatRunner
from targets.android.target import AndroidTarget

__all__ = ["AndroidTarget", "OrtFormatRunner"]
