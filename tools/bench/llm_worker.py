"""One LLM benchmark job in its own process: ``python tools/bench/llm_worker.py JOB.json``.

Kinds: ``quantize`` (a method of :mod:`bench.llm_methods`), ``export`` (the float model),
``calib`` (the smollm2 calibration feeds as .npz files, for ORT's GPTQ), ``evaluate``
(fidelity of every model against the float reference, edgeq's LLM metrics) and ``speed``
(prefill and decode timings, all models in this one process, interleaved). The result, or the
error, is written as JSON by :func:`bench.worker.main`'s conventions (``ok``, ``error``,
``vmhwm_mb``), plus ``cpu_s`` (this process's user + system CPU time).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for `import bench`

PROMPT_FOR_SPEED = "Write a short sentence about the sea."  # 38 tokens with SmolLM2's chat template


def _quantize(job: dict) -> dict:
    from bench.llm_methods import METHODS

    Path(job["out_dir"]).mkdir(parents=True, exist_ok=True)
    return METHODS[job["method"]].run(job)


def _export(job: dict) -> dict:
    from edgeq.cli import main

    out = Path(job["out_path"])
    t0 = time.perf_counter()
    rc = main(["export", "smollm2", "-o", str(out), "--force"])
    if rc:
        raise RuntimeError(f"`edgeq export smollm2` exited with {rc}")
    return {"artifact": str(out), "export_s": time.perf_counter() - t0}


def _calib(job: dict) -> dict:
    import numpy as np

    from samples.smollm2 import SmolLM2Sample

    folder = Path(job["out_dir"])
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    feeds = SmolLM2Sample().feeds("calibration")
    for i, feed in enumerate(feeds):
        np.savez(tmp / f"{i:05d}.npz", **feed)
    tmp.rename(folder)
    return {"feeds": len(feeds), "tokens": int(sum(f["input_ids"].shape[1] for f in feeds))}


def _sample_data():
    from edgeq.generate import prompt_ids
    from edgeq.validate.llm import sequences_from_feeds
    from samples.smollm2 import SmolLM2Sample

    sample = SmolLM2Sample()
    tok = sample.tokenizer()
    sequences = sequences_from_feeds(sample.feeds("evaluation"))
    prompts = sample.prompts()
    return sample, tok, sequences, prompts, [prompt_ids(tok, p) for p in prompts]


def _open(model: dict, threads: int | None, *, logits_all: bool = True):
    """A runner for a model entry ``{"name", "kind", "artifact"}`` (see bench.llm_methods)."""
    from bench.llm_runtimes import GenaiGraphRunner, LlamaCppRunner

    kind, path = model["kind"], model["artifact"]
    if kind in ("onnx", "ort"):
        from edgeq.runtime import ort_session
        from edgeq.validate.runners import SessionRunner, session_input_spec

        sess = ort_session(path, threads=threads)
        runner = SessionRunner(model["name"], sess, [session_input_spec(i) for i in sess.get_inputs()])
        runner.path = Path(path)
        return runner
    if kind == "genai":
        return GenaiGraphRunner(path, threads=threads)
    if kind == "gguf":
        return LlamaCppRunner(path, threads=threads or 2, logits_all=logits_all)
    raise ValueError(f"unknown model kind {kind!r}")


def _memoized(run):
    """``run`` remembering its outputs by feed (the reference, measured again for every candidate,
    runs once). Key: the new token ids, the past length and a hash of one cache tensor."""
    import hashlib

    seen: dict = {}

    def memo(feed):
        past = feed["past_key_values.0.key"]
        key = (feed["input_ids"].tobytes(), past.shape[2], hashlib.blake2b(past.tobytes(), digest_size=16).digest())
        if key not in seen:
            seen[key] = run(feed)
        return seen[key]

    return memo


def _evaluate(job: dict) -> dict:
    """Every candidate against the float reference, with edgeq.validate.llm (one call per candidate:
    a model that fails is reported, the others still are)."""
    from edgeq.validate.llm import validate_causal_lm

    _, tok, sequences, prompts, prompt_tokens = _sample_data()
    ref = _open(job["reference"], job.get("threads"))
    ref.run = _memoized(ref.run)  # the same runner object, its outputs remembered
    stop = [int(tok.eos_token_id)]
    out: dict = {"texts": len(sequences), "predicted_tokens": sum(len(s) - 1 for s in sequences),
                 "prompts": prompts, "prompt_tokens": [len(p) for p in prompt_tokens], "models": {}}
    cached_ref: dict = {}
    for model in job["candidates"]:
        t0 = time.perf_counter()
        try:
            runner = _open(model, job.get("threads"))
            report = validate_causal_lm(ref, [runner], sequences, prompts=prompt_tokens, prompt_texts=prompts,
                                        tokenizer=tok, max_new_tokens=job["max_new_tokens"], stop_ids=stop,
                                        data_desc="smollm2 evaluation split", progress=False)
            cand = report.candidates[0]
            row = {"ok": True, **cand.task, "logits_sqnr_db": cand.outputs["logits"]["sqnr_db"],
                   "seconds": time.perf_counter() - t0}
            cached_ref.setdefault("perplexity", cand.task["reference_perplexity"])
            genai_folder = _genai_folder(model)
            if genai_folder is not None:
                row["genai_runtime_greedy"] = _genai_runtime_check(genai_folder, prompt_tokens, job["max_new_tokens"],
                                                                  stop, runner)
            del runner
        except Exception as e:  # reported in the row, the other models go on
            traceback.print_exc()
            row = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"}
        out["models"][model["name"]] = row
        print(f"evaluated {model['name']}: {json.dumps({k: row.get(k) for k in ('perplexity', 'kld_mean', 'top1_agreement', 'error')})}",
              flush=True)
    out["reference_perplexity"] = cached_ref.get("perplexity")
    return out


def _genai_folder(model: dict) -> str | None:
    """The onnxruntime-genai model folder of a model: the builder's output, or an edgeq Android
    package (which carries a genai_config.json beside its .ort)."""
    if model["kind"] == "genai":
        return model["artifact"]
    if model["kind"] == "ort" and (Path(model["artifact"]).parent / "genai_config.json").is_file():
        return str(Path(model["artifact"]).parent)
    return None


def _genai_runtime_check(folder: str, prompts, max_new: int, stop, graph_runner) -> dict:
    """Greedy answers from genai's own runtime, compared with the same graph driven by CausalLM."""
    from bench.llm_runtimes import GenaiRuntime
    from edgeq.generate import CausalLM

    rt = GenaiRuntime(folder)
    lm = CausalLM(graph_runner)
    same = 0
    for p in prompts:
        a = rt.greedy(p, max_new, stop)
        b = lm.generate(p, max_new, stop_ids=stop).tokens
        same += a == b
    return {"prompts": len(prompts), "same_tokens_as_ort_driven_graph": same}


def _speed(job: dict) -> dict:
    """Prefill + decode timings of every model, interleaved (round robin over models, ``rounds``
    times), first with ``threads`` intra-op threads (wall clock), then with 1 thread (wall clock
    and the calling thread's CPU time). One process: every model is loaded once per phase."""
    from bench.llm_runtimes import GenaiRuntime, Speed, time_causal_lm, time_genai, time_llama
    from edgeq.generate import CausalLM, prompt_ids
    from samples.smollm2 import tokenizer

    prompt = prompt_ids(tokenizer(), PROMPT_FOR_SPEED)
    steps, rounds = job["decode_steps"], job["rounds"]
    out: dict = {"prompt": PROMPT_FOR_SPEED, "prompt_tokens": len(prompt), "decode_steps": steps, "rounds": rounds,
                 "phases": {}, "errors": {}}
    for threads in (job["threads"], 1):
        drivers = {}
        for model in job["models"]:
            name = model["name"]
            try:
                if model["kind"] == "genai":
                    rt = GenaiRuntime(model["artifact"], threads=threads)
                    drivers[name] = (lambda s, rt=rt: time_genai(rt, prompt, steps, s))
                    graph = CausalLM(_open(model, threads))  # the same graph driven by edgeq's loop
                    drivers[name + "|graph_in_ort"] = (lambda s, lm=graph: time_causal_lm(lm, prompt, steps, s))
                    continue
                if _genai_folder(model) is not None:  # an edgeq package: also in genai's runtime
                    rt = GenaiRuntime(_genai_folder(model), threads=threads)
                    drivers[name + "|genai_runtime"] = (lambda s, rt=rt: time_genai(rt, prompt, steps, s))
                if model["kind"] == "gguf":
                    r = _open(model, threads, logits_all=False)
                    drivers[name] = (lambda s, r=r: time_llama(r, prompt, steps, s))
                else:
                    lm = CausalLM(_open(model, threads))
                    drivers[name] = (lambda s, lm=lm: time_causal_lm(lm, prompt, steps, s))
            except Exception as e:
                traceback.print_exc()
                out["errors"][f"{name}@{threads}"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        speeds = {n: Speed() for n in drivers}
        for n, run in list(drivers.items()):  # warm-up (first-run allocations, kernel packing)
            try:
                run(Speed())
            except Exception as e:
                traceback.print_exc()
                out["errors"][f"{n}@{threads}"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                del drivers[n], speeds[n]
        for r in range(rounds):
            order = list(drivers) if r % 2 == 0 else list(reversed(drivers))  # alternate the order too
            for n in order:
                drivers[n](speeds[n])
            print(f"speed: {threads} thread(s), round {r + 1}/{rounds} done", flush=True)
        out["phases"][str(threads)] = {n: s.summary(len(prompt)) for n, s in speeds.items()}
        del drivers
    return out


KINDS = {"quantize": _quantize, "export": _export, "calib": _calib, "evaluate": _evaluate, "speed": _speed}


def main(spec_path: str) -> int:
    from bench.worker import run_job_file

    return run_job_file(spec_path, KINDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
