"""The Python API: one thin entry point per stage (export, quantize, package, validate, generate).

Each function resolves its arguments and calls the stage where it lives: :mod:`edgeq.export`,
:mod:`edgeq.pipeline.quantize`, :mod:`edgeq.pipeline.package`, :mod:`edgeq.validate.run`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from edgeq.export import ExportResult, export_model
from edgeq.export.torch_export import DEFAULT_OPSET
from edgeq.sources import resolve_model
from edgeq.specs import TensorSpec
from edgeq.validate import Thresholds, ValidationReport


def export(
    model,
    output: str | os.PathLike,
    *,
    inputs: Sequence[TensorSpec | str] | None = None,
    example_inputs: Mapping[str, np.ndarray] | None = None,
    sizes: Mapping[str, int] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    fallback: bool = True,
    check: bool = True,
    force: bool = False,
    verbose: bool = False,
    tokenizer=None,
) -> ExportResult:
    """Export a PyTorch model (module, sample name, factory; a causal LM also from a ``.gguf`` file or a
    Hugging Face folder) to ONNX, checked against torch (see :func:`edgeq.export.export_model`)."""
    return export_model(model, output, inputs=inputs, example_inputs=example_inputs, sizes=sizes,
                        output_names=output_names, opset=opset, fallback=fallback, check=check, force=force,
                        verbose=verbose, tokenizer=tokenizer)


def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike | None,
    recipe="w8a16",
    *,
    block: int | None = None,
    profile=None,
    calib=None,
    force: bool = False,
    progress: bool = True,
):
    """Quantize an ONNX model with a recipe (preset name, TOML path or Recipe) into a QDQ ONNX.

    A causal LM may also be given as a ``.gguf`` file or a Hugging Face folder: it is exported with
    its KV cache first (into a temporary folder), e.g. ``quantize("model.gguf", "m.onnx", "gguf")``.

    ``calib`` (sample name, ``.npz`` file or folder, or an iterable of feed dicts) is needed by
    recipes that quantize activations (w8a8). ``output=None`` only makes the plan. Returns a
    result with the plan, the sizes and the calibration table.
    """
    from edgeq.export import onnx_of
    from edgeq.onnx_io import check_output_path
    from edgeq.pipeline.quantize import quantize_model

    if output is not None:
        check_output_path(output, force=force)  # before a long export
    with onnx_of(model, progress=progress) as path:
        return quantize_model(path, output, recipe, block=block, profile=profile, calib=calib, force=force,
                              progress=progress)


def package(model: str | os.PathLike, target, output: str | os.PathLike, *, force: bool = False,
            options: Mapping | None = None):
    """Package a (QDQ) ONNX model for a deployment target (see :func:`edgeq.pipeline.package.package_model`)."""
    from edgeq.pipeline.package import package_model

    return package_model(model, target, output, force=force, options=options)


def validate(candidates, reference, data=None, **options) -> ValidationReport:
    """Compare candidate models with a reference on real inputs (see :func:`edgeq.validate.run.validate_models`)."""
    from edgeq.validate.run import validate_models

    return validate_models(candidates, reference, data, **options)


def generate(model, prompt: str, **options):
    """Generate text from a causal LM file or package (see :func:`edgeq.generate.generate`)."""
    from edgeq import generate as gen

    return gen.generate(model, prompt, **options)


__all__ = ["Thresholds", "export", "generate", "package", "quantize", "resolve_model", "validate"]
