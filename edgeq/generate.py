"""Generate text on the host with an exported causal LM: the float ONNX, a QDQ ONNX, a ``.ort`` or a
stateful Core ML ``.mlpackage`` (in edgeq's reference executor).

:class:`CausalLM` drives any runner of the explicit-cache graph (:mod:`edgeq.export.causal_lm`):
prefill from an empty cache, then one token per step with the cache the previous step returned.
A stateful runner (``kv_cache`` set: an iOS 18 package whose cache is Core ML state) gets the same
loop with a :class:`StateCache` in place of the cache tensors: the state it made, updated in place,
and the number of positions it holds.
Validation (:mod:`edgeq.validate.llm`) uses the same loop.

The tokenizer is found, in this order: ``tokenizer=`` (a folder or a ``tokenizer.json``);
``tokenizer.json`` beside the model file (a package folder); the tokenizer the export stored in
the model's metadata (``edgeq.tokenizer``; ``edgeq quantize`` keeps metadata and the ``.ort``
conversion carries it, so a QDQ ONNX and its ``.ort`` find it there too).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import InputError, first_line
from edgeq.export.causal_lm import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    CausalLMFacts,
    is_causal_lm_io,
    past_names,
    present_names,
    read_facts,
    read_tokenizer_files,
    step_feed,
)
from edgeq.validate.runners import Runner, TorchRunner, open_runner


def runner_metadata(runner: Runner) -> dict[str, str]:
    """The model's metadata (ONNX ``metadata_props``, which ORT exposes for .onnx and .ort alike; a
    runner that reads another format gives it as ``metadata``)."""
    sess = getattr(runner, "_sess", None)  # SessionRunner: OnnxRunner, OrtFormatRunner
    if sess is None:
        return dict(getattr(runner, "metadata", None) or {})
    return dict(sess.get_modelmeta().custom_metadata_map)


def is_stateful(runner: Runner) -> bool:
    """A runner whose KV cache is state it keeps (``kv_cache``: num_layers, max_context, ...)."""
    return bool(getattr(runner, "kv_cache", None)) and hasattr(runner, "make_state")


@dataclass
class StateCache:
    """The cache of a stateful runner: its state (updated in place by each step, like Core ML's
    ``MLState``) and how many positions it holds. A step returns the same state, one step longer:
    an older ``StateCache`` of that state must not be stepped again."""

    state: object
    length: int = 0


@dataclass
class StepTimes:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    stopped_by: str = ""  # "eos", "max_tokens" or "max_positions"
    times: StepTimes = field(default_factory=StepTimes)


class CausalLM:
    """A causal LM behind any runner of the explicit-cache graph, batch 1."""

    def __init__(self, runner: Runner, facts: CausalLMFacts | None = None):
        specs = runner.input_specs
        outs = runner.output_names
        self.stateful = is_stateful(runner)
        if self.stateful:
            self._init_stateful(runner)
            return
        if specs is None or not is_causal_lm_io([s.name for s in specs], outs or [LOGITS, *present_names(1)]):
            raise InputError(f"{runner.label} is not a causal LM with an explicit KV cache",
                             hint="export it with `edgeq export` (inputs input_ids, attention_mask, position_ids, "
                                  "past_key_values.*; outputs logits, present.*)")
        self.runner = runner
        self.metadata = runner_metadata(runner)
        self.facts = facts or read_facts(self.metadata)
        by_name = {s.name: s for s in specs}
        self.num_layers = sum(1 for s in specs if s.name.startswith("past_key_values.") and s.name.endswith(".key"))
        cache = by_name["past_key_values.0.key"]
        kv_heads, head_dim = cache.shape[1], cache.shape[3]
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            if self.facts is None:
                raise InputError(f"{runner.label}: the cache shape is not fixed and the model has no metadata",
                                 hint="export the model with `edgeq export`")
            kv_heads, head_dim = self.facts.num_kv_heads, self.facts.head_dim
        self.cache_dtype = np.dtype(cache.dtype)
        self._empty = {n: np.zeros((1, kv_heads, 0, head_dim), self.cache_dtype) for n in past_names(self.num_layers)}
        self._present = present_names(self.num_layers)

    def _init_stateful(self, runner: Runner) -> None:
        names = {s.name for s in runner.input_specs or []}
        if not {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} <= names or LOGITS not in (runner.output_names or []):
            raise InputError(f"{runner.label} keeps state but is not a causal LM package",
                             hint="package the model with `edgeq package --target ios18` from edgeq's export")
        self.runner = runner
        self.metadata = runner_metadata(runner)
        self.facts = read_facts(self.metadata)
        self.num_layers = int(runner.kv_cache["num_layers"])
        self.max_context = int(runner.kv_cache["max_context"])

    @property
    def max_positions(self) -> int | None:
        """How many positions a sequence may hold: the model's limit, or the state's length."""
        limits = [self.facts.max_positions if self.facts is not None else None,
                  self.max_context if self.stateful else None]
        return min((x for x in limits if x), default=None)

    @property
    def label(self) -> str:
        return self.runner.label

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.facts.eos_token_ids if self.facts is not None else ()

    def empty_cache(self) -> dict[str, np.ndarray] | StateCache:
        """An empty cache: zero-length tensors, or a new state of a stateful runner."""
        if self.stateful:
            return StateCache(self.runner.make_state())
        return dict(self._empty)

    def step(self, ids: Sequence[int] | np.ndarray, past: Mapping[str, np.ndarray] | StateCache):
        """Logits [n, vocab] for ``ids`` after the cache ``past``, and the grown cache."""
        if self.stateful:
            return self._step_state(np.asarray(ids, np.int64).reshape(1, -1), past)
        out = self.runner.run(step_feed(np.asarray(ids, np.int64).reshape(1, -1), past))
        cache = {p: out[o] for p, o in zip(past_names(self.num_layers), self._present)}
        return np.asarray(out[LOGITS][0], np.float32), cache

    def _step_state(self, ids: np.ndarray, past: StateCache):
        if not isinstance(past, StateCache):
            raise InputError(f"{self.label} keeps its cache as state: step it with a StateCache",
                             hint="start from CausalLM.empty_cache()")
        n = ids.shape[1]
        total = past.length + n
        if total > self.max_context:
            raise InputError(f"{self.label}: {total} tokens do not fit its cache of {self.max_context} positions",
                             hint="package with a larger --max-context, or use shorter texts")
        feed = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, total), np.int64),
                POSITION_IDS: np.arange(past.length, total, dtype=np.int64).reshape(1, -1)}
        out = self.runner.run(feed, state=past.state)
        return np.asarray(out[LOGITS][0], np.float32), StateCache(past.state, total)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [n, vocab] of a whole sequence from position 0."""
        return self.step(ids, self.empty_cache())[0]

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, *, stop_ids: Sequence[int] | None = None,
                 choose: Callable[[np.ndarray], int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Prefill the prompt, then decode up to ``max_tokens`` tokens (greedy unless ``choose``)."""
        if len(prompt_ids) == 0:
            raise InputError("the prompt is empty", hint="give at least one token")
        choose = choose or (lambda row: int(np.argmax(row)))
        stop = set(self.eos_token_ids if stop_ids is None else stop_ids)
        limit = self.max_positions
        gen = Generation(list(map(int, prompt_ids)))
        t0 = time.perf_counter()
        logits, past = self.step(gen.prompt_ids, self.empty_cache())
        gen.times.prefill_seconds = time.perf_counter() - t0
        gen.times.prefill_tokens = len(gen.prompt_ids)
        gen.stopped_by = "max_tokens"
        while len(gen.tokens) < max_tokens:
            token = choose(logits[-1])
            gen.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop:
                gen.stopped_by = "eos"
                break
            if len(gen.tokens) >= max_tokens:
                break
            if limit is not None and len(gen.prompt_ids) + len(gen.tokens) >= limit:
                gen.stopped_by = "max_positions"
                break
            t0 = time.perf_counter()
            logits, past = self.step([token], past)
            gen.times.decode_seconds += time.perf_counter() - t0
            gen.times.decode_tokens += 1
        return gen


def sampler(temperature: float, top_k: int | None, seed: int) -> Callable[[np.ndarray], int]:
    """Softmax sampling at ``temperature`` over the ``top_k`` most likely tokens (fixed seed)."""
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}", hint="omit it for greedy decoding")
    rng = np.random.default_rng(seed)

    def choose(row: np.ndarray) -> int:
        z = row.astype(np.float64) / temperature
        if top_k is not None and top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        return int(rng.choice(z.size, p=p / p.sum()))

    return choose


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _from_folder(folder: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InputError("reading the tokenizer needs transformers", hint="pip install 'edgeq[llm]'") from e
    from edgeq._quiet import quiet

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read a tokenizer from {folder}: {first_line(e, 200)}",
                         hint="give a folder with tokenizer.json (and tokenizer_config.json)") from e


def load_tokenizer(model_path: str | os.PathLike | None, metadata: Mapping[str, str],
                   explicit: str | os.PathLike | None = None):
    """The model's tokenizer and where it came from (see the module docstring for the order)."""
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise InputError(f"tokenizer not found: {p}", hint="give a folder with tokenizer.json, or the file")
        folder = p.parent if p.is_file() else p
        return _from_folder(folder), str(p)
    if model_path is not None:
        p = Path(model_path)
        folder = p if p.is_dir() and p.suffix != ".mlpackage" else p.parent  # an .mlpackage is a model folder
        if (folder / "tokenizer.json").is_file():
            return _from_folder(folder), str(folder / "tokenizer.json")
    files = read_tokenizer_files(metadata)
    if files:
        with tempfile.TemporaryDirectory(prefix="edgeq-tok-") as tmp:
            for name, text in files.items():
                (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
            return _from_folder(Path(tmp)), "the model's metadata (edgeq.tokenizer)"
    raise InputError(f"no tokenizer for {model_path}",
                     hint="pass --tokenizer FOLDER, put tokenizer.json beside the model, or export the model with "
                          "edgeq (which stores the tokenizer in the ONNX metadata)")


def prompt_ids(tokenizer, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: as a user turn of the chat template when there is one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


class TextStream:
    """Prints decoded text as tokens arrive (decodes the whole answer, prints what is new)."""

    def __init__(self, tokenizer, out=sys.stdout, skip: Sequence[int] = ()):
        self.tok, self.out, self.skip = tokenizer, out, set(skip)
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        if token in self.skip:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


@dataclass
class GenerateResult:
    text: str
    generation: Generation
    tokenizer_source: str
    model_label: str


def generate(model, prompt: str, *, max_tokens: int = 128, chat: bool = True, tokenizer=None,
             temperature: float | None = None, top_k: int | None = None, seed: int = 0,
             stream=None) -> GenerateResult:
    """Generate an answer to ``prompt`` with a model file (.onnx, .ort, a package folder) or a runner.

    Greedy unless ``temperature`` is given; ``stream`` (a file, e.g. ``sys.stdout``) gets the text
    as it is produced. ``tokenizer`` is a tokenizer object, or a path (see :func:`load_tokenizer`).
    """
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    runner = open_runner(model)
    if isinstance(runner, TorchRunner):
        raise InputError("generate runs exported models", hint="export it first with `edgeq export`")
    lm = CausalLM(runner)
    path = getattr(runner, "path", None)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tok, source = load_tokenizer(path, lm.metadata, tokenizer)
    else:
        tok, source = tokenizer, "given"
    ids = prompt_ids(tok, prompt, chat=chat)
    if lm.facts is not None and max(ids, default=0) >= lm.facts.vocab_size:
        raise InputError(f"the tokenizer from {source} gives token id {max(ids)}, but {lm.label} has a vocabulary "
                         f"of {lm.facts.vocab_size}: the tokenizer belongs to another model",
                         hint="pass the model's own tokenizer with --tokenizer")
    stop = set(lm.eos_token_ids)
    if getattr(tok, "eos_token_id", None) is not None:
        stop.add(int(tok.eos_token_id))
    choose = sampler(temperature, top_k, seed) if temperature is not None else None
    shown = TextStream(tok, stream, skip=stop) if stream is not None else None
    gen = lm.generate(ids, max_tokens, stop_ids=sorted(stop), choose=choose, on_token=shown)
    text = tok.decode([t for t in gen.tokens if t not in stop], skip_special_tokens=True)
    return GenerateResult(text, gen, source, lm.label)
