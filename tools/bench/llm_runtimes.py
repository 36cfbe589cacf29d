"""The runtimes the LLM benchmark drives: ONNX Runtime, onnxruntime-genai and llama.cpp.

Fidelity: every model is measured by edgeq's own code (:func:`edgeq.validate.llm.validate_causal_lm`
and :class:`edgeq.generate.CausalLM`). A model that is not edgeq's explicit-cache graph is put
behind the same :class:`~edgeq.validate.runners.Runner` interface by a thin adapter, so the
metric code never changes:

- :class:`GenaiGraphRunner`: the onnxruntime-genai builder's ONNX graph in plain ONNX Runtime. Its
  I/O is the same naming minus ``position_ids`` (``GroupQueryAttention`` derives positions from
  ``attention_mask``), so the adapter drops that input; without genai's shared buffer the
  operator concatenates past and new keys like any explicit-cache graph.
- :class:`LlamaCppRunner`: llama.cpp keeps its cache inside its context. The adapter answers with
  empty placeholder cache tensors of the right length and checks that each call continues the
  sequence it holds (or starts a new one at an empty past).

Speed (:func:`time_run`): prefill of a prompt, then decode steps, each timed with the wall clock
and with ``time.thread_time`` (CPU time of the calling thread: with one intra-op thread every
runtime here computes on the calling thread, so it is stable on a loaded machine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeq.export.causal_lm import INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names
from edgeq.specs import TensorSpec
from edgeq.validate.runners import Runner


def _edgeq_specs(num_layers: int, kv_heads: int, head_dim: int) -> list[TensorSpec]:
    specs = [TensorSpec(INPUT_IDS, ("batch", "sequence"), "int64"),
             TensorSpec("attention_mask", ("batch", "total_sequence"), "int64"),
             TensorSpec(POSITION_IDS, ("batch", "sequence"), "int64")]
    specs += [TensorSpec(n, ("batch", kv_heads, "past_sequence", head_dim)) for n in past_names(num_layers)]
    return specs


class GenaiGraphRunner(Runner):
    """The genai builder's ``model.onnx`` in plain ONNX Runtime, fed edgeq's explicit-cache feeds."""

    kind = "onnxruntime (genai graph)"

    def __init__(self, folder: str | Path, threads: int | None = None):
        import json

        from edgeq.runtime import ort_session

        folder = Path(folder)
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        super().__init__(f"{folder.name}/{dec['filename']}")
        self.path = folder / dec["filename"]
        self._sess = ort_session(self.path, threads=threads)
        self._inputs = {i.name for i in self._sess.get_inputs()}
        self._specs = _edgeq_specs(dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"])
        self._outputs = [o.name for o in self._sess.get_outputs()]

    def run(self, feed):
        kept = {k: v for k, v in feed.items() if k in self._inputs}
        return dict(zip(self._outputs, self._sess.run(self._outputs, kept)))

    def describe(self):
        return {"kind": self.kind, "label": self.label, "path": str(self.path)}


class LlamaCppRunner(Runner):
    """llama.cpp on a GGUF behind the explicit-cache interface (its cache stays inside llama.cpp).

    ``logits_all``: compute the logits of every position (perplexity); off, only the last
    token's are computed and returned (generation, as llama.cpp runs by default).
    """

    kind = "llama.cpp"

    def __init__(self, gguf: str | Path, threads: int, *, logits_all: bool = True, n_ctx: int = 512):
        from llama_cpp import Llama

        super().__init__(Path(gguf).name)
        self.path = Path(gguf)
        self.logits_all = logits_all
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self._specs = _edgeq_specs(1, 1, 0)  # one placeholder cache pair of zero width
        self._outputs = [LOGITS, *present_names(1)]

    def run(self, feed):
        ids = np.asarray(feed[INPUT_IDS])
        if ids.shape[0] != 1:
            raise ValueError("llama.cpp adapter: batch 1 only")
        past = feed[past_names(1)[0]].shape[2]
        if past == 0:
            self.llm.reset()
        elif past != self.llm.n_tokens:
            raise ValueError(f"llama.cpp adapter: the feed continues {past} tokens, llama.cpp holds "
                             f"{self.llm.n_tokens}")
        tokens = [int(t) for t in ids[0]]
        self.llm.eval(tokens)
        logits = np.array(self.llm.scores[past: past + len(tokens)] if self.logits_all else self.last_logits()[None],
                          np.float32)
        width = np.zeros((1, 1, past + len(tokens), 0), np.float32)
        return {LOGITS: logits[None], **{n: width for n in present_names(1)}}

    def last_logits(self) -> np.ndarray:
        """The logits of the last evaluated token (llama-cpp-python keeps them only with logits_all)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def describe(self):
        import llama_cpp

        return {"kind": self.kind, "label": self.label, "path": str(self.path),
                "llama_cpp_python": llama_cpp.__version__}


class GenaiRuntime:
    """onnxruntime-genai's own runtime (its Generator, shared KV buffer) on a builder folder."""

    def __init__(self, folder: str | Path, threads: int | None = None, max_length: int = 512):
        import json

        import onnxruntime_genai as og

        cfg = og.Config(str(folder))
        if threads is not None:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                               "inter_op_num_threads": 1}}}}))
        self.og = og
        self.model = og.Model(cfg)
        self.max_length = max_length
        self.label = f"{Path(folder).name} (onnxruntime-genai runtime)"

    def _generator(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def greedy(self, prompt: Sequence[int], max_new: int, stop: Sequence[int]) -> list[int]:
        gen = self._generator()
        gen.append_tokens(list(map(int, prompt)))
        out: list[int] = []
        while len(out) < max_new:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            out.append(tok)
            if tok in stop:
                break
        return out


# ---- speed ------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._w)
        self.cpu.append(time.thread_time() - self._c)


class Speed:
    """Times of one model: per run, the prefill and the mean of its decode steps (seconds)."""

    def __init__(self):
        self.prefill_wall: list[float] = []
        self.prefill_cpu: list[float] = []
        self.decode_wall: list[float] = []
        self.decode_cpu: list[float] = []

    def add(self, prefill: _Clock, decode: _Clock) -> None:
        self.prefill_wall.append(prefill.wall[0])
        self.prefill_cpu.append(prefill.cpu[0])
        self.decode_wall.append(statistics.fmean(decode.wall))
        self.decode_cpu.append(statistics.fmean(decode.cpu))

    def summary(self, prompt_tokens: int) -> dict:
        med = statistics.median
        return {"runs": len(self.prefill_wall), "prompt_tokens": prompt_tokens,
                "prefill_tps": prompt_tokens / med(self.prefill_wall),
                "prefill_cpu_tps": prompt_tokens / med(self.prefill_cpu) if med(self.prefill_cpu) > 0 else None,
                "decode_ms": 1000 * med(self.decode_wall), "decode_cpu_ms": 1000 * med(self.decode_cpu),
                "decode_ms_all": [round(1000 * x, 3) for x in self.decode_wall],
                "prefill_s_all": [round(x, 4) for x in self.prefill_wall]}


def time_causal_lm(lm, prompt: Sequence[int], steps: int, speed: Speed) -> None:
    """Prefill ``prompt``, then ``steps`` greedy decode steps with :class:`edgeq.generate.CausalLM`."""
    pre, dec = _Clock(), _Clock()
    with pre:
        logits, past = lm.step(prompt, lm.empty_cache())
        token = int(np.argmax(logits[-1]))
    for _ in range(steps):
        with dec:
            logits, past = lm.step([token], past)
            token = int(np.argmax(logits[-1]))
    speed.add(pre, dec)


def time_genai(rt: GenaiRuntime, prompt: Sequence[int], steps: int, speed: Speed) -> None:
    """The same with genai's Generator: ``append_tokens`` runs the prefill; each later
    ``generate_next_token`` picks the next token and runs one decode step."""
    gen = rt._generator()
    pre, dec = _Clock(), _Clock()
    with pre:
        gen.append_tokens(list(map(int, prompt)))
        gen.generate_next_token()  # picks the first token from the prefill's logits (no model run)
    for _ in range(steps):
        with dec:
            gen.generate_next_token()
    speed.add(pre, dec)


def time_llama(runner: LlamaCppRunner, prompt: Sequence[int], steps: int, speed: Speed) -> None:
    """The same with llama.cpp (``eval`` of the prompt, then one token per ``eval``)."""
    llm = runner.llm
    pre, dec = _Clock(), _Clock()
    with pre:
        llm.reset()
        llm.eval(list(map(int, prompt)))
        token = int(np.argmax(runner.last_logits()))
    for _ in range(steps):
        with dec:
            llm.eval([token])
            token = int(np.argmax(runner.last_logits()))
    speed.add(pre, dec)
