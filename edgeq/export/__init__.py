"""PyTorch → ONNX export (torch is imported only inside this package, and only when used).

:func:`export_model` resolves what to export (a module, a sample, a factory, a causal LM from a
GGUF file or a Hugging Face folder) and calls the exporter that fits: :func:`export_torch` for a
model with input specs, :func:`~edgeq.export.causal_lm.export_causal_lm` for a causal LM.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeq.errors import InputError
from edgeq.export.torch_export import DEFAULT_OPSET, ExportCheck, ExportResult, export_torch
from edgeq.sources import resolve_model
from edgeq.specs import TensorSpec

__all__ = ["ExportCheck", "ExportResult", "export_model", "export_torch", "onnx_of"]


def export_model(
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
    """Export a PyTorch model (module, sample name or factory) to ONNX and check it against torch.

    ``inputs`` are :class:`TensorSpec` or their text form ``name:dtype[dims]``; a sample brings
    its own specs, example inputs and output names. A causal LM (a transformers ``*ForCausalLM``
    module, the ``smollm2`` sample, a ``.gguf`` file or a Hugging Face folder) is exported with its
    KV cache (:mod:`edgeq.export.causal_lm`); ``tokenizer`` is then stored in the ONNX metadata.
    """
    specs = [TensorSpec.parse(s) if isinstance(s, str) else s for s in inputs or []]
    obj, sample = resolve_model(model)
    if not specs:  # a causal LM needs no input specs: the exporter knows its cache layout
        causal = _causal_lm_export(obj, sample, output, tokenizer=tokenizer, opset=opset, check=check,
                                   force=force, verbose=verbose)
        if causal is not None:
            return causal
    if isinstance(obj, Path) and obj.is_dir():
        raise InputError(f"{obj} is a folder without config.json",
                         hint="give a Hugging Face causal LM folder (config.json + weights), a .gguf file or a sample")
    if isinstance(obj, Path):
        raise InputError(f"{obj} is already a model file",
                         hint="export takes a PyTorch model, a factory, a sample, a .gguf file or a model folder")
    if sample is not None:
        output_names = output_names or sample.output_names
        if not specs:
            specs = sample.input_specs()
            example_inputs = example_inputs if example_inputs is not None else sample.example_inputs()
        obj = sample.load_model()
    if not specs:
        raise InputError("no input specs given", hint="describe each input, e.g. --input x:float32[batch,3,224,224]")
    return export_torch(
        obj, specs, output, example_inputs=example_inputs, sizes=sizes, output_names=output_names,
        opset=opset, fallback=fallback, check=check, force=force, verbose=verbose,
    )


def _causal_lm_export(obj, sample, output, **kwargs):
    """Export ``obj`` as a causal LM with its cache if it is one, else return None."""
    from edgeq.export import causal_lm

    tokenizer = kwargs.pop("tokenizer")
    from edgeq.onnx_io import check_output_path

    if sample is not None and hasattr(sample, "load_causal_lm") or isinstance(obj, Path) \
            and causal_lm.is_causal_lm_source(obj):
        check_output_path(output, force=kwargs["force"])  # before a long model load
    if sample is not None and hasattr(sample, "load_causal_lm"):
        loaded = sample.load_causal_lm()
    elif isinstance(obj, Path) and causal_lm.is_causal_lm_source(obj):
        loaded = causal_lm.load_causal_lm(obj)
    elif causal_lm.is_causal_lm_module(obj):
        loaded = causal_lm.LoadedCausalLM(obj, tokenizer, type(obj).__name__)
    else:
        return None
    return causal_lm.export_causal_lm(loaded.model, output, tokenizer=tokenizer or loaded.tokenizer,
                                      source=loaded.source, gguf_file=loaded.gguf_file, **kwargs)


@contextlib.contextmanager
def onnx_of(model, *, progress: bool = True) -> Iterator:
    """``model`` as an ONNX file for the stages that read one (quantize, analyze).

    A causal LM given as a ``.gguf`` file or a Hugging Face folder is exported with its KV cache
    into a temporary folder, removed on exit; anything else is yielded unchanged. The export records
    the GGUF it came from, so ``--recipe gguf`` keeps that file's blocks.
    """
    from edgeq.export import causal_lm

    if not (isinstance(model, (str, os.PathLike)) and causal_lm.is_causal_lm_source(model)):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="edgeq-export-") as tmp:
        path = Path(tmp) / (Path(model).stem + ".onnx")
        if progress:
            print(f"exporting {Path(model).name} with its KV cache first, into a temporary folder "
                  "(edgeq export keeps the float ONNX)", file=sys.stderr, flush=True)
        export_model(model, path)
        yield path
