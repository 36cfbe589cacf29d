"""Validate candidates against a reference: resolve the models and the data, then compare (or the LLM metrics)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edgeq import onnx_io, sources
from edgeq.errors import InputError
from edgeq.sources import resolve_model
from edgeq.specs import TensorSpec, check_feeds
from edgeq.validate.compare import Thresholds, ValidationReport, compare
from edgeq.validate.feeds import check_same_inputs, load_feeds
from edgeq.validate.runners import Runner, TorchRunner, open_runner


def _open(model, specs: Sequence[TensorSpec] | None, output_names: Sequence[str] | None) -> tuple[Runner, sources.Sample | None]:
    obj, sample = resolve_model(model)
    if sample is not None:
        module = sample.load_model()
        return TorchRunner(module, input_specs=sample.input_specs(), output_names=sample.output_names,
                           label=f"sample {sample.name}"), sample
    if isinstance(obj, Path):
        return open_runner(obj), None
    return open_runner(obj, input_specs=specs, output_names=output_names), None


def validate_models(
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
    from edgeq.validate.state import recurrent_state_pairs

    states = recurrent_state_pairs(ref_onnx) if ref_onnx is not None else []
    return compare(ref, cands, feeds, data_desc=desc, task=task, thresholds=thresholds,
                   intermediates=intermediates, progress=progress, state_pairs=states)


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
    # the explicit-cache inputs (a stateful package has no cache inputs; texts come from position 0 anyway)
    specs = next((r.input_specs for r in [*cands, ref] if r.input_specs and not getattr(r, "kv_cache", None)),
                 cands[0].input_specs)
    feeds, desc = load_feeds(data, specs, split="evaluation", limit=limit)
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
