"""The ``edgeq`` command.

Exit codes: 0 success, 1 a validation threshold failed, 2 bad input or a model edgeq cannot
handle (one line on stderr naming the problem), 3 an internal error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM: cleaned up like Ctrl-C).
Nothing is written when a command fails.

Start-up imports only the standard library: each command imports what it needs when it runs,
inside :func:`main`'s error handling, so ``edgeq --help`` and argument errors are instant and
Ctrl-C at any moment after the first line gives one line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from edgeq import __version__
from edgeq.errors import EdgeqError, InputError, ValidationFailed

INTERRUPTED = "edgeq: interrupted; nothing was written"
TERMINATED = "edgeq: terminated; nothing was written"


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``, a container stopping) raised like Ctrl-C, so the same clean-up runs:
    staged outputs and temporary folders are removed instead of left half-written."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _sizes(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, eq, val = item.partition("=")
        if not eq or not val.strip().isdigit():
            raise InputError(f"cannot read --dim {item!r}", hint="write NAME=SIZE, e.g. --dim batch=4")
        out[name.strip()] = int(val)
    return out


def _say(text: str) -> None:
    print(text, flush=True)


def _check_json_path(args) -> None:
    """An unwritable ``--json`` path fails before the command does any work (and writes its output)."""
    if args.json:
        from edgeq.onnx_io import check_output_path

        check_output_path(args.json, force=True)


def cmd_export(args) -> int:
    _check_json_path(args)
    from edgeq import api

    res = api.export(
        args.model, args.output, inputs=args.input, sizes=_sizes(args.dim), output_names=args.output_name or None,
        opset=args.opset, fallback=not args.no_fallback, check=not args.no_check, force=args.force,
        verbose=args.verbose,
    )
    size = sum(f.stat().st_size for f in res.files) / 1e6
    _say(f"exported {args.model} -> {res.path} ({res.exporter} exporter, opset {res.opset}, {size:.1f} MB) "
         f"in {res.seconds:.1f} s")
    if res.fallback_reason:
        _say(f"note: torch.export failed ({res.fallback_reason}); used the TorchScript exporter instead")
    for f in res.files[1:]:
        _say(f"weights: {f} (external data: the model is over 2 GB)")
    facts = getattr(res, "facts", None)
    if facts is not None:  # a causal LM with its KV cache
        _say(f"causal LM: {facts.num_layers} layers, cache [batch, {facts.num_kv_heads}, past_sequence, "
             f"{facts.head_dim}] per key/value; tied embedding/output table: {res.tied_storage}")
        _say(f"metadata: {', '.join(res.metadata_keys)} (eos {list(facts.eos_token_ids)}, bos {facts.bos_token_id}, "
             f"chat template {'yes' if facts.has_chat_template else 'no'}, max positions {facts.max_positions})")
    if res.checks:
        _say("ONNX Runtime vs torch:")
        for c in res.checks:
            _say(f"  {c.feed:<36} {c.output:<16} shape {'x'.join(map(str, c.shape)):<14} "
                 f"SQNR {c.sqnr_db:7.1f} dB  max abs err {c.max_abs_err:.3g}")
    if args.json:
        from edgeq.validate.report import write_json

        write_json({
            "edgeq_version": __version__, "model": str(args.model), "files": [str(f) for f in res.files],
            "exporter": res.exporter, "fallback_reason": res.fallback_reason, "opset": res.opset,
            "inputs": [str(s) for s in res.inputs], "outputs": list(res.output_names),
            "checks": [c.__dict__ for c in res.checks], "seconds": round(res.seconds, 2),
            **({"causal_lm": facts.as_dict(), "tied_storage": res.tied_storage} if facts is not None else {}),
        }, args.json)
    return 0


def cmd_validate(args) -> int:
    _check_json_path(args)
    from edgeq import api
    from edgeq.validate import Thresholds
    from edgeq.validate.llm import LLMThresholds, format_llm_report
    from edgeq.validate.report import format_report, write_json

    th = Thresholds(args.min_sqnr, args.min_cosine, args.min_top1_agreement)
    llm_th = LLMThresholds(args.max_perplexity_ratio, args.max_kld, args.min_top1_agreement,
                           args.min_greedy_agreement)
    report = api.validate(
        args.candidates, args.reference, args.data, task=args.task, thresholds=th,
        intermediates=not args.no_intermediates, limit=args.limit, inputs=args.input or None,
        progress=not args.no_progress, llm_thresholds=llm_th, max_new_tokens=args.max_new_tokens,
    )
    _say(format_llm_report(report) if report.task_kind == "causal_lm" else format_report(report))
    if args.json:
        write_json(report.as_dict(), args.json)
        _say(f"wrote {args.json}")
    if not report.passed:
        failed = [f"{c.runner['label']}: {k['check']}" for c in report.candidates for k in c.checks if not k["passed"]]
        raise ValidationFailed(f"validation failed: {'; '.join(failed)}")
    return 0


def cmd_generate(args) -> int:
    from edgeq.generate import generate

    res = generate(args.model, args.prompt, max_tokens=args.max_tokens, chat=not args.no_chat,
                   tokenizer=args.tokenizer, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   stream=sys.stdout)
    _say("")
    g = res.generation
    t = g.times
    print(f"[{res.model_label}: prefill {t.prefill_tokens} tokens in {t.prefill_seconds * 1e3:.0f} ms "
          f"({t.prefill_tps:.1f} tokens/s); decode {t.decode_tokens} tokens in {t.decode_seconds:.2f} s "
          f"({t.decode_tps:.1f} tokens/s); stopped by {g.stopped_by}; tokenizer from {res.tokenizer_source}]",
          file=sys.stderr, flush=True)
    return 0


def _quantize_to_budget(args) -> int:
    from edgeq.export import onnx_of
    from edgeq.pipeline.budget import search

    if args.output is None:
        raise InputError("--budget needs -o OUT.onnx (the model it finds is written there)")
    with onnx_of(args.model, progress=not args.no_progress) as model:
        res = search(model, args.recipe, args.budget, args.output, calib=args.calib, data=args.data,
                     profile=args.profile, block=args.block, limit=args.limit, force=args.force,
                     progress=not args.no_progress)
    _say(res.format())
    if res.recipe_toml:
        _say("as recipe rules:\n" + res.recipe_toml.rstrip())
    if args.json:
        from edgeq.validate.report import write_json

        write_json({"edgeq_version": __version__, **res.as_dict()}, args.json)
    return 0 if res.met else 1


def cmd_quantize(args) -> int:
    if args.output is None and not args.explain:
        raise InputError("no output given", hint="pass -o OUT.onnx, or --explain to print the plan only")
    if args.budget is None:
        unused = [flag for flag, value in (("--data", args.data), ("--limit", args.limit)) if value is not None]
        if unused:
            flags = " and ".join(unused)
            raise InputError(f"{flags} {'apply' if len(unused) > 1 else 'applies'} only with --budget "
                             "(the search's evaluation data)",
                             hint=f"add --budget METRIC>=X, or drop {flags}; calibration data is --calib")
    _check_json_path(args)
    from edgeq import api

    if args.budget is not None:
        return _quantize_to_budget(args)
    res = api.quantize(args.model, args.output, args.recipe, block=args.block, profile=args.profile,
                       calib=args.calib, force=args.force, progress=not args.no_progress)
    if args.explain:
        _say(res.plan.explain(all_nodes=args.all_nodes))
    if res.path is not None:
        _say(f"quantized {args.model} -> {res.path} ({res.plan.recipe}): {res.float_bytes / 1e6:.1f} MB of float "
             f"weights -> {res.quantized_bytes / 1e6:.1f} MB file (ideal {res.ideal_bytes / 1e6:.1f} MB) "
             f"in {res.seconds:.1f} s")
        s = res.plan.summary()
        _say(f"weights: {', '.join(f'{k} {v}' for k, v in s['weights'].items()) or 'none'}; "
             f"{s['fallbacks']} fell back; {s['float_nodes']} nodes float")
        if res.calibration is not None:
            acts = ", ".join(f"{k} {v}" for k, v in s.get("activations", {}).items()) or "none"
            _say(f"calibration: {res.calibration.batches} batches, {res.calibration.samples} samples; "
                 f"activations quantized: {acts}; integer ops: {s.get('integer_ops', 0)}; "
                 f"bias-corrected: {s.get('bias_corrected', 0)}")
        for line in res.plan.algorithm_lines():
            _say(line)
    if args.json:
        from edgeq.validate.report import write_json

        write_json({"edgeq_version": __version__, "model": str(args.model), "output": str(res.path),
                    **res.plan.as_dict(), "float_bytes": res.float_bytes,
                    "file_bytes": res.quantized_bytes, "ideal_bytes": res.ideal_bytes, "seconds": round(res.seconds, 2),
                    "calibration": None if res.calibration is None else {
                        "batches": res.calibration.batches, "samples": res.calibration.samples,
                        "data_sha256": res.calibration.data_sha256,
                        "state_bytes": res.calibration.peak_state_bytes}}, args.json)
    return 0


def cmd_analyze(args) -> int:
    _check_json_path(args)
    from edgeq.pipeline.analyze import sensitivity

    report = sensitivity(args.model, args.recipe, calib=args.calib, data=args.data, limit=args.limit,
                         progress=not args.no_progress, block=args.block, profile=args.profile, rank_by=args.rank_by)
    _say(report.format())
    _say(f"analyzed {len(report.layers)} layers in {report.seconds:.1f} s")
    if args.json:
        from edgeq.validate.report import write_json

        write_json({"edgeq_version": __version__, **report.as_dict()}, args.json)
        _say(f"wrote {args.json}")
    return 0


def cmd_package(args) -> int:
    _check_json_path(args)
    from edgeq import api

    # the target validates its own options (Target.configure); the CLI only passes them on
    res = api.package(args.model, args.target, args.output, force=args.force, options=_package_options(args))
    m = res.manifest
    _say(f"packaged {args.model} for {res.target} -> {res.path} in {res.seconds:.1f} s")
    if m.get("compute_precision"):
        flex = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in m.get("flexible_axes", {}).items())
        _say(f"compute {m['compute_precision']}; flexible axes: {flex or 'none'}")
    for rel, size in m.get("file_bytes", {}).items():
        _say(f"  {rel:<28} {size / 1e6:8.2f} MB  sha256 {m['files'][rel][:12]}")
    rt = m.get("runtime", {})
    if rt.get("minimum_onnxruntime_version"):
        _say(f"runtime: {rt.get('package', 'onnxruntime')} >= {rt['minimum_onnxruntime_version']}")
    if args.json:
        from edgeq.validate.report import write_json

        write_json({"path": str(res.path), "model_file": str(res.model_file), "seconds": round(res.seconds, 2),
                    "manifest": m}, args.json)
        _say(f"wrote {args.json}")
    return 0


def cmd_build(args) -> int:
    from edgeq.pipeline.build import BuildFailed, build, format_summary
    from edgeq.validate import Thresholds
    from edgeq.validate.llm import LLMThresholds

    targets = None if args.targets is None else [t.strip() for t in args.targets.split(",") if t.strip()]
    th = Thresholds(args.min_sqnr, args.min_cosine, args.min_top1_agreement)
    llm_th = LLMThresholds(args.max_perplexity_ratio, args.max_kld, args.min_top1_agreement, args.min_greedy_agreement)
    res = build(args.model, targets=targets, recipe=args.recipe, block=args.block, calib=args.calib, data=args.data,
                output=args.output, force=args.force, thresholds=th, llm_thresholds=llm_th, inputs=args.input,
                task=args.task,
                limit=args.limit, calib_limit=args.calib_limit, latency=not args.no_latency, verbose=args.verbose,
                progress=not args.no_progress, say=_say)
    _say(format_summary(res))
    if res.failed_stages:
        failed = "; ".join(f"{s.name} ({s.what}): {s.message}" for s in res.failed_stages)
        raise BuildFailed(f"{len(res.failed_stages)} stage(s) failed, the rest is in {res.path}: {failed}",
                          exit_code=res.exit_code)
    if not res.passed:
        failed = [f"{r['model']}: {', '.join(r['failed'])}" for r in res.summary if not r["passed"]]
        noisy = any("quantized activations" in n for r in res.summary if not r["passed"] for n in r.get("notes", []))
        raise ValidationFailed(f"validation failed: {'; '.join(failed)} (see {res.report})",
                               hint="the note under each failed row says which quantized activations cost it "
                                    "and what to change" if noisy else None)
    return 0


def cmd_doctor(args) -> int:
    from edgeq.doctor import report

    lines, _ = report()
    _say("\n".join(lines))
    return 0


def _package_options(args) -> dict:
    """Target options given on the command line (only those given): ``compute``, ``shapes``, ``max_context``."""
    options = {}
    if args.compute is not None:
        options["compute"] = args.compute
    if getattr(args, "max_context", None) is not None:
        options["max_context"] = args.max_context
    if args.shape:
        shapes = {}
        for text in args.shape:
            name, sep, dims = text.partition("=")
            lo, colon, hi = dims.partition(":")
            try:
                value = (int(lo), int(hi)) if colon else int(dims)
            except ValueError:
                value = None
            if not sep or not name or value is None:
                raise InputError(f"--shape {text!r} is not NAME=SIZE or NAME=LOWER:UPPER",
                                 hint="e.g. --shape batch=1 --shape sequence=1:512")
            if name in shapes:
                raise InputError(f"--shape gives axis {name!r} twice")
            shapes[name] = value
        options["shapes"] = shapes
    return options


def cmd_samples(args) -> int:
    from edgeq import sources

    for name in sources.sample_names():
        s = sources.get_sample(name)
        _say(f"{name:<20} {s.task:<15} {s.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--verbose", action="store_true", help="let third-party tools print their output")

    p = argparse.ArgumentParser(prog="edgeq", description="Quantize models for phones and prove them on the host.")
    p.add_argument("--version", action="version", version=f"edgeq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("export", parents=[common], help="export a PyTorch model to ONNX, checked against torch",
                       description="Export a PyTorch model to ONNX (torch.export + onnxscript; TorchScript "
                                   "fallback) and check the ONNX against torch on example and random inputs.")
    e.add_argument("model", help="a sample name (see `edgeq samples`), a package.module:callable factory, or a "
                                 "causal LM as a .gguf file or a Hugging Face folder (exported with its KV cache)")
    e.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    e.add_argument("--input", action="append", metavar="SPEC",
                   help="an input as name:dtype[dims], dynamic axes named (e.g. x:float32[batch,3,224,224]); "
                        "repeat in forward() order (samples bring their own)")
    e.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a dynamic axis in example inputs")
    e.add_argument("--output-name", action="append", metavar="NAME", help="names of the outputs, in order")
    e.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21: blocked INT4 needs it)")
    e.add_argument("--no-fallback", action="store_true", help="fail instead of falling back to TorchScript")
    e.add_argument("--no-check", action="store_true", help="skip the ONNX vs torch check")
    e.add_argument("--force", action="store_true", help="overwrite an existing output")
    e.add_argument("--json", metavar="PATH", help="also write what happened as JSON")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", parents=[common], help="compare models on real inputs",
                       description="Run a reference and candidate models on the same inputs and compare "
                                   "outputs (SQNR, cosine, max abs error), task metrics and intermediates.")
    v.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="model files to check (.onnx, ...)")
    v.add_argument("-r", "--reference", required=True,
                   help="the float reference: a sample name, a package.module:callable factory, or an .onnx file")
    v.add_argument("--data", help="inputs: a sample name (optionally name:key=value,...), an .npz file, or a folder "
                                  "of .npz files (default: the reference sample's evaluation set)")
    v.add_argument("--task", default="auto", choices=["auto", "generic", "classification", "embedding", "causal_lm"],
                   help="which task metrics to add (default: the sample's)")
    v.add_argument("--input", action="append", metavar="SPEC", help="input specs for a torch factory reference")
    v.add_argument("--limit", type=int, help="use only the first N feeds")
    v.add_argument("--no-intermediates", action="store_true", help="skip the per-tensor comparison")
    v.add_argument("--min-sqnr", type=float, metavar="DB", help="fail if any output's SQNR is below this")
    v.add_argument("--min-cosine", type=float, metavar="C", help="fail if any output's mean cosine is below this")
    v.add_argument("--min-top1-agreement", type=float, metavar="F", help="fail if top-1 agreement is below this")
    v.add_argument("--max-perplexity-ratio", type=float, metavar="R",
                   help="causal LMs: fail if candidate perplexity / reference perplexity is above this")
    v.add_argument("--max-kld", type=float, metavar="NATS",
                   help="causal LMs: fail if the mean KL divergence of next-token distributions is above this")
    v.add_argument("--min-greedy-agreement", type=float, metavar="F",
                   help="causal LMs: fail if fewer of the reference's greedy tokens are reproduced (until the first "
                        "divergence)")
    v.add_argument("--max-new-tokens", type=int, metavar="N", help="causal LMs: greedy tokens per prompt (default 32)")
    v.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_validate)

    gn = sub.add_parser("generate", parents=[common], help="generate text with an exported causal LM",
                        description="Stream an answer from a causal LM exported by edgeq (float ONNX, QDQ ONNX, "
                                    ".ort or a package folder) in ONNX Runtime, with the model's chat template; "
                                    "greedy unless --temperature. Speed goes to stderr.")
    gn.add_argument("model", help="the .onnx, .ort or package folder")
    gn.add_argument("--prompt", required=True, help="the user's message")
    gn.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gn.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, without the chat template")
    gn.add_argument("--tokenizer", metavar="PATH",
                    help="a tokenizer folder or tokenizer.json (default: beside the model, else the model's metadata)")
    gn.add_argument("--temperature", type=float, help="sample at this temperature instead of greedy decoding")
    gn.add_argument("--top-k", type=int, help="with --temperature: sample among the K most likely tokens")
    gn.add_argument("--seed", type=int, default=0, help="with --temperature: the random seed (default 0)")
    gn.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", parents=[common], help="quantize an ONNX model into a QDQ ONNX",
                       description="Plan (recipe + target profile) and apply QDQ quantization to an ONNX model.")
    q.add_argument("model", help="the float .onnx file, or a causal LM as a .gguf file or a Hugging Face folder "
                                 "(exported with its KV cache first)")
    q.add_argument("-o", "--output", help="the QDQ .onnx file to write")
    q.add_argument("--recipe", default="w8a16",
                   help="w8a8, w8a16, w4a16, mxfp4, gguf (a .gguf file or a model exported from one: keep its "
                        "Q4_0/Q4_1/Q8_0 integers), or a .toml recipe (default w8a16)")
    q.add_argument("--block", type=int, help="block size for w4a16 (32, 64 or 128; default 32)")
    q.add_argument("--profile", help="target profile that decides what runs (default onnxruntime-cpu)")
    q.add_argument("--calib", help="calibration data for activation recipes (sample name, .npz file or folder)")
    q.add_argument("--explain", action="store_true", help="print the plan: each node's format or why it stays float")
    q.add_argument("--all-nodes", action="store_true", help="with --explain, list nodes without weights too")
    q.add_argument("--force", action="store_true", help="overwrite an existing output")
    q.add_argument("--json", metavar="PATH", help="also write the plan and sizes as JSON")
    q.add_argument("--budget", metavar="METRIC>=X",
                   help='search for the smallest model meeting an accuracy budget: "cosine>=0.995", "sqnr>=30" '
                        'or "top1_agreement>=0.98" (layers raised above the recipe are reported; exit 1 if unmet)')
    q.add_argument("--data", help="with --budget: evaluation data (default: the sample named like the model)")
    q.add_argument("--limit", type=int, help="with --budget: use the first N evaluation feeds only")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    a = sub.add_parser("analyze", parents=[common], help="per-layer sensitivity of a float ONNX model to a recipe",
                       description="Quantize once, then measure the output error with only one layer quantized and "
                                   "with all but one, for every weighted layer; print a ranked table.")
    a.add_argument("model", help="the float .onnx file")
    a.add_argument("--recipe", required=True, help="w8a8, w8a16, w4a16, mxfp4, or a .toml recipe")
    a.add_argument("--block", type=int, help="block size for w4a16 (32, 64 or 128; default 32)")
    a.add_argument("--profile", help="target profile that decides what runs (default onnxruntime-cpu)")
    a.add_argument("--calib", help="calibration data for activation recipes (default: --data)")
    a.add_argument("--data", help="evaluation data: a sample name, an .npz file or a folder (default: the sample "
                                  "named like the model file)")
    a.add_argument("--limit", type=int, help="evaluate on the first N feeds only")
    a.add_argument("--rank-by", default="sqnr", choices=["sqnr", "cosine"], help="ranking metric (default sqnr)")
    a.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_analyze)

    k = sub.add_parser("package", parents=[common], help="package a QDQ ONNX model for a device target",
                       description="Check a (QDQ) ONNX model against a target (pre-flight), convert it, and write "
                                   "the package folder atomically: model, manifest.json with hashes, README.")
    k.add_argument("model", help="the QDQ .onnx written by `edgeq quantize` (or any .onnx)")
    k.add_argument("--target", required=True, help="the target to package for (e.g. android)")
    k.add_argument("-o", "--output", required=True, help="the package folder to write")
    k.add_argument("--force", action="store_true", help="replace an existing output folder")
    k.add_argument("--json", metavar="PATH", help="also write the manifest and timings as JSON")
    k.add_argument("--compute", metavar="PRECISION",
                   help="compute precision, for targets that choose one (ios17/ios18: fp16, the default, or fp32)")
    k.add_argument("--shape", action="append", metavar="AXIS=SIZE|AXIS=LO:HI",
                   help="fix a named dynamic axis (batch=1) or bound its range (sequence=1:512), for targets "
                        "that take shapes (ios17/ios18; axes not given stay flexible in 1..1024); repeatable")
    k.add_argument("--max-context", type=int, metavar="N",
                   help="a causal LM's KV cache length, for targets that keep it as state (ios18: default 2048 "
                        "or the model's limit, whichever is smaller)")
    k.set_defaults(func=cmd_package)

    b = sub.add_parser("build", parents=[common], help="model -> quantized, validated packages and a report",
                       description="Export (PyTorch) or start from ONNX, quantize, package each target, validate "
                                   "every package against the float model, and write an HTML report; all into "
                                   "one folder, moved into place only when complete.")
    b.add_argument("model", nargs="?", default=None,
                   help="a sample name, a package.module:callable factory (with --input), or an .onnx file "
                        "(default: the minilm sample)")
    b.add_argument("--targets", help="comma-separated targets (default android,ios18; the smollm2 sample: android)")
    b.add_argument("--recipe", help="w8a8, w8a16, w4a16, mxfp4, or a .toml recipe (default w8a8; the smollm2 "
                                    "sample: w4a16)")
    b.add_argument("--block", type=int, help="block size for w4a16 (32, 64 or 128; default 32)")
    b.add_argument("--calib", help="calibration data (default: the sample's calibration set)")
    b.add_argument("--data", help="evaluation data (default: the sample's evaluation set)")
    b.add_argument("-o", "--output", default="dist", help="the folder to write (default dist)")
    b.add_argument("--input", action="append", metavar="SPEC", help="input specs for a PyTorch factory")
    b.add_argument("--limit", type=int, help="validate on the first N evaluation feeds only")
    b.add_argument("--calib-limit", type=int, help="calibrate on the first N calibration feeds only")
    b.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="fail if any output's SQNR is below this (default: the recipe's: 15 for w8a8, 25 for w8a16, "
                        "else 10)")
    b.add_argument("--min-cosine", type=float, metavar="C",
                   help="fail if any output's mean cosine is below this (default: the recipe's: 0.99 for w8a8, "
                        "0.9984 for w8a16 (its 25 dB floor per sample), 0.95 for mxfp4, else 0.98)")
    b.add_argument("--min-top1-agreement", type=float, metavar="F",
                   help="fail if top-1 agreement is below this (default 0.9 for a classifier, 0.98 per position for "
                        "[batch, positions, classes] class scores, 0.8 for a w4a16 LLM)")
    b.add_argument("--max-perplexity-ratio", type=float, metavar="R",
                   help="causal LMs: fail if perplexity / the float model's is above this (default 1.10 for w4a16, "
                        "1.01 for w8a16)")
    b.add_argument("--max-kld", type=float, metavar="NATS",
                   help="causal LMs: fail if the mean KL divergence of next-token distributions is above this")
    b.add_argument("--min-greedy-agreement", type=float, metavar="F",
                   help="causal LMs: fail if fewer of the float model's greedy tokens are reproduced")
    b.add_argument("--task", default="auto", choices=["auto", "generic", "classification", "embedding", "causal_lm"],
                   help="which task metrics and gates to add (default: the sample's, or detected from the model's "
                        "output: a [batch, classes] score output is a classifier, a [batch, positions, classes] "
                        "Softmax output one per position)")
    b.add_argument("--no-latency", action="store_true", help="skip the host latency measurement")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--force", action="store_true", help="replace an existing output folder")
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("doctor", parents=[common], help="versions, targets, and what is missing")
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser("samples", parents=[common], help="list the bundled samples")
    s.set_defaults(func=cmd_samples)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:  # from the first line: Ctrl-C while arguments are read or a command's imports load is clean too
        args = build_parser().parse_args(argv)
        debug = args.debug
        if args.verbose:
            os.environ["EDGEQ_VERBOSE"] = "1"
        else:
            from edgeq._quiet import quiet_libraries

            quiet_libraries()
        # numpy's BLAS alternates with ONNX Runtime's threads in every command: one thread (see
        # edgeq.runtime.single_threaded_blas); read when numpy loads, so a user's own setting wins
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        return args.func(args)
    except EdgeqError as e:
        if debug:
            raise
        print(f"edgeq: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    except _Terminated:
        print(TERMINATED, file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"edgeq: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
