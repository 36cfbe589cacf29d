"""The Python API: thin orchestration over the stages (export, quantize, package, validate)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeq import onnx_io, sources
from edgeq.errors import InputError
from edgeq.export import ExportResult, export_torch
from edgeq.export.torch_export import DEFAULT_OPSET
from edgeq.specs import TensorSpec, check_feeds
from edgeq.validate import Thresholds, ValidationReport, compare, open_runner
from edgeq.validate.feeds import check_same_inputs, load_feeds
from edgeq.validate.runners import Runner, TorchRunner


_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve_model(model) -> tuple[object, sources.Sample | None]:
    """An ``nn.Module`` (or a path/Runner, returned as is) and the sample it came from, if any.

    ``model`` may be a module, a :class:`~edgeq.sources.Sample`, a sample name, a
    ``package.module:callable`` factory, or a path to a model file.
    """
    if isinstance(model, sources.Sample):
        return model, model
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if Path(text).exists():
            return Path(text), None
        if sources.is_sample(text):
            s = sources.get_sample(text)
            return s, s
        if _FACTORY_RE.match(text):
            return sources.load_factory(text), None
        looks_like_path = "/" in text or os.sep in text or Path(text).suffix != ""
        if looks_like_path:
            raise InputError(f"model file not found: {text}", hint="check the path")
        raise InputError(
            f"cannot find a model called {text!r}",
            hint=f"give a model file, a package.module:callable factory, or a sample ({', '.join(sources.sample_names())})",
        )
    return model, None


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
                                      source=loaded.source, **kwargs)


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

    ``calib`` (sample name, ``.npz`` file or folder, or an iterable of feed dicts) is needed by
    recipes that quantize activations (w8a8). ``output=None`` only makes the plan. Returns a
    result with the plan, the sizes and the calibration table.
    """
    from edgeq.pipeline.quantize import quantize_model

    return quantize_model(model, output, recipe, block=block, profile=profile, calib=calib, force=force,
                          progress=progress)


def package(model: str | os.PathLike, target, output: str | os.PathLike, *, force: bool = False,
            options: Mapping | None = None):
    """Package a (QDQ) ONNX model for a deployment target into the folder ``output``.

    ``target`` is a target name (``edgeq.plugins.target_names()``, e.g. ``android``) or a
    :class:`targets.base.Target`. ``options`` are the target's packaging options (e.g.
    ``{"compute": "fp32", "shapes": {"batch": 1}}`` for ios17/ios18), applied with
    ``target.configure(**options)``: the target validates them, and one that takes none rejects
    any (an :class:`InputError`). Pre-flight runs first and nothing is written when the model
    cannot run on the target; the folder appears complete or not at all. Returns the target's
    ``PackageResult`` (path, model file, files, manifest).
    """
    from edgeq import plugins

    tgt = plugins.load_target(target) if isinstance(target, str) else target
    if options is not None and not isinstance(options, Mapping):
        raise InputError(f"options must map option names to values, got {options!r}",
                         hint='e.g. options={"compute": "fp32"}')
    if options:
        tgt = tgt.configure(**options)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model file not found: {path}" if not path.exists() else f"{path} is not an ONNX file",
                         hint="give the QDQ .onnx written by `edgeq quantize` (or any .onnx)")
    return tgt.package(path, output, force=force)


def _open(model, specs: Sequence[TensorSpec] | None, output_names: Sequence[str] | None) -> tuple[Runner, sources.Sample | None]:
    obj, sample = resolve_model(model)
    if sample is not None:
        module = sample.load_model()
        return TorchRunner(module, input_specs=sample.input_specs(), output_names=sample.output_names,
                           label=f"sample {sample.name}"), sample
    if isinstance(obj, Path):
        return open_runner(obj), None
    return open_runner(obj, input_specs=specs, output_names=output_names), None


def validate(
    candidates,
    reference,
    data=None,
    *,
    task: str = "auto",
    thresholds: Thresholds = Thresholds(),
    intermediates: bool = True,
    limit: int | None = None,
    inputs: Sequence[TensorSpec | str] | None = None,
    output_names: Sequence[str] | None = None,
    progress: bool = True,
    llm_thresholds=None,
    max_new_tokens: int | None = None,
) -> ValidationReport:
    """Compare one or more candidate models with a reference on real inputs.

    ``reference`` is an ``nn.Module``, a sample name, a factory or a model file; ``candidates``
    one or a list of model files (or runners). ``data`` is a sample name, an ``.npz`` file or
    folder, or an iterable of feeds; it defaults to the reference sample's evaluation set.
    Causal LMs (the explicit-cache graph) get the LLM metrics of :mod:`edgeq.validate.llm`
    instead (gates: ``llm_thresholds``, an :class:`~edgeq.validate.llm.LLMThresholds`).
    """
    specs = [TensorSpec.parse(s) if isinstance(s, str) else s for s in inputs or []] or None
    ref, sample = _open(reference, specs, output_names)
    if isinstance(candidates, (str, os.PathLike, Runner)) or not isinstance(candidates, Sequence):
        candidates = [candidates]
    cands = [_open(c, specs, output_names)[0] for c in candidates]
    from edgeq.validate import llm
    from edgeq.validate.tasks import resolve_task

    if task == "causal_lm" or task == "auto" and cands and all(llm.is_causal_lm_runner(c) for c in cands):
        gates = llm_thresholds or llm.LLMThresholds(min_top1_agreement=thresholds.min_top1_agreement)
        return _validate_causal_lm(ref, sample, cands, data, limit=limit, progress=progress, thresholds=gates,
                                   max_new_tokens=max_new_tokens or llm.DEFAULT_NEW_TOKENS)
    is_onnx = isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".onnx" and Path(reference).is_file()
    ref_onnx = onnx_io.read_onnx(reference) if is_onnx else None
    task, _ = resolve_task(task, sample=sample, model=ref_onnx,
                           wants_top1=thresholds.min_top1_agreement is not None)
    if data is None:
        if sample is None:
            raise InputError("no inputs to validate on", hint="give --data (a sample name, an .npz file or a folder)")
        data = sample
    check_same_inputs([ref, *cands])  # a mismatch between models is not the data file's fault
    check_specs = next((r.input_specs for r in [*cands, ref] if r.input_specs), None)
    if check_specs is None:
        raise InputError("input names are unknown", hint="give input specs (--input) for a torch-only comparison")
    feeds, desc = load_feeds(data, check_specs, split="evaluation", limit=limit)
    for r in [ref, *cands]:  # each model must accept the feeds, before anything runs
        if r.input_specs and r.input_specs is not check_specs:
            check_feeds([dict(f) for f in feeds], r.input_specs, source=f"{desc} for {r.label}")
    return compare(ref, cands, feeds, data_desc=desc, task=task, thresholds=thresholds,
                   intermediates=intermediates, progress=progress)


def _validate_causal_lm(ref, sample, cands, data, *, limit, progress, thresholds, max_new_tokens):
    """LLM metrics: texts from ``data`` (default: the sample the reference or the export came from)."""
    from edgeq.generate import CausalLM, load_tokenizer, prompt_ids
    from edgeq.validate import llm

    if sample is None:  # an exported model names the sample it came from
        source = CausalLM(cands[0]).metadata.get("edgeq.source", "")
        name = source.split()[1] if source.startswith("sample ") else ""
        sample = sources.get_sample(name) if sources.is_sample(name) else None
    if data is None:
        if sample is None:
            raise InputError("no evaluation text to validate on", hint="give --data (a sample name or .npz feeds)")
        data = sample
    feeds, desc = load_feeds(data, cands[0].input_specs, split="evaluation", limit=limit)
    sequences = llm.sequences_from_feeds(feeds)
    tokenizer = sample.tokenizer() if sample is not None and hasattr(sample, "tokenizer") else None
    if tokenizer is None:
        try:
            tokenizer, _ = load_tokenizer(getattr(cands[0], "path", None), CausalLM(cands[0]).metadata)
        except InputError:
            tokenizer = None
    texts = sample.prompts() if sample is not None and hasattr(sample, "prompts") else None
    if texts and tokenizer is not None:
        prompts = [prompt_ids(tokenizer, t) for t in texts]
    else:  # no chat prompts: the first tokens of a few evaluation texts
        texts = None
        prompts = [s[: max(1, min(8, len(s) // 2))] for s in sequences[:4]]
    return llm.validate_causal_lm(ref, cands, sequences, prompts=prompts, prompt_texts=texts, tokenizer=tokenizer,
                                  max_new_tokens=max_new_tokens, thresholds=thresholds, data_desc=desc,
                                  progress=progress)
