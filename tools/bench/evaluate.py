"""Fidelity on the evaluation split and batch-1 ORT CPU latency, candidate against fp32.

Both models run in ONNX Runtime's CPU provider with the same session options (ORT_ENABLE_ALL,
fixed intra-op threads, sequential). Latency is measured interleaved - fp32, candidate,
candidate, fp32, ... - so load from other work on the machine hits both alike; the ratio of the
medians is the number to read, the milliseconds only say the scale.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.data import LazyFeeds

# ops that show what ORT's optimizer made of a quantized graph
FUSED_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
             "QLinearGlobalAveragePool", "QLinearSigmoid", "MatMulNBits", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
             "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear")


def session_options(threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def fidelity(ref, cand, feeds, task: str) -> dict:
    from edgeq.validate.metrics import ClassifierStats, EmbeddingStats, TensorStats

    out_name = ref.get_outputs()[0].name
    tensor = TensorStats(keep_cosines=False)
    task_stats = EmbeddingStats() if task == "embedding" else ClassifierStats()
    for feed in feeds:
        r = ref.run([out_name], feed)[0]
        c = cand.run([out_name], feed)[0]
        tensor.update(r, c)
        task_stats.update(r, c)
    return {**task_stats.summary(), "sqnr_db": tensor.sqnr_db, "max_abs_err": tensor.max_abs_err}


def latency(ref, cand, feed: dict, runs: int, warmup: int = 5) -> dict:
    times = {"fp32": [], "cand": []}
    sessions = {"fp32": ref, "cand": cand}
    for _ in range(warmup):
        ref.run(None, feed)
        cand.run(None, feed)
    for i in range(runs):
        order = ("fp32", "cand") if i % 2 == 0 else ("cand", "fp32")
        for key in order:
            t0 = time.perf_counter()
            sessions[key].run(None, feed)
            times[key].append(time.perf_counter() - t0)
    fp32_ms = statistics.median(times["fp32"]) * 1e3
    cand_ms = statistics.median(times["cand"]) * 1e3
    return {"fp32_ms": fp32_ms, "cand_ms": cand_ms, "speedup": fp32_ms / cand_ms, "runs": runs,
            "cand_ms_p10_p90": [float(np.percentile(times["cand"], q) * 1e3) for q in (10, 90)]}


def optimized_ops(path: str, threads: int, level: str = "ORT_ENABLE_ALL", disabled=()) -> dict:
    """Counts of the quantized ops in ORT's optimized graph of ``path``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opt = str(Path(d) / "optimized.onnx")
        so = session_options(threads, opt)
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        m = onnx.load(opt, load_external_data=False)
    counts = Counter(n.op_type for n in m.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


# When ORT's optimizer cannot build the candidate at ORT_ENABLE_ALL (seen: NNCF's MiniLM graph,
# where QDQS8ToU8Transformer emits a QuantizeLinear whose output_dtype contradicts its zero
# point), the next setting that loads is used, for fp32 too, and the row says so.
FALLBACKS = (
    ("ORT_ENABLE_ALL", ()),
    ("ORT_ENABLE_ALL", ("QDQS8ToU8Transformer",)),
    ("ORT_ENABLE_ALL", ("QDQPropagationTransformer",)),
    ("ORT_ENABLE_BASIC", ()),
)


def open_pair(fp32_path: str, cand_path: str, threads: int):
    """(fp32 session, candidate session, load seconds, note or None) under the first setting that loads."""
    import onnxruntime as ort

    first_error = None
    for level, disabled in FALLBACKS:
        so = session_options(threads)
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        kw = {"providers": ["CPUExecutionProvider"], "disabled_optimizers": list(disabled)}
        try:
            t0 = time.perf_counter()
            cand = ort.InferenceSession(cand_path, so, **kw)
            load_s = time.perf_counter() - t0
        except Exception as e:
            first_error = first_error or (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            continue
        ref = ort.InferenceSession(fp32_path, so, **kw)
        note = None
        if first_error:
            note = (f"ORT cannot load it at ORT_ENABLE_ALL ({first_error}); measured (fp32 too) at {level}"
                    + (f" with {', '.join(disabled)} disabled" if disabled else ""))
        return ref, cand, load_s, note, (level, disabled)
    raise RuntimeError(first_error or "ORT cannot load the model")


def run(job: dict) -> dict:
    threads = int(job["threads"])
    ref, cand, load_s, note, (level, disabled) = open_pair(job["fp32_path"], job["cand_path"], threads)
    out = {"session_load_s": load_s, "session_note": note, "opt_level": level, "disabled_optimizers": list(disabled)}
    feeds = LazyFeeds(job["eval_dir"], limit=job.get("eval_limit"))
    out["fidelity"] = fidelity(ref, cand, feeds, job["task"])
    lat_feed = next(iter(LazyFeeds(job["latency_dir"])))
    out["latency"] = latency(ref, cand, lat_feed, int(job["latency_runs"]))
    out["optimized_ops"] = optimized_ops(job["cand_path"], threads, level, disabled)
    return out
