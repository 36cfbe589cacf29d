"""Tiny models built in code, with fixed-seed weights and data, for fast tests.

``tiny_cnn``: conv → BN → ReLU6, depthwise conv, pointwise conv, residual add, global pool,
linear classifier (the EfficientNet/MobileNet pattern in miniature), input 3×32×32.
``tiny_transformer``: one pre-LN transformer encoder block (multi-head attention + GELU MLP) over
float token features, with an attention mask that adds a large negative number as real exports do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.errors import InputError
from edgeq.sources import Sample
from edgeq.specs import TensorSpec


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU6())
        self.fc = nn.Linear(32, classes)

    def forward(self, image):
        x = self.stem(image)
        x = x + self.pw(self.dw(x))
        x = self.head(x).mean(dim=(2, 3))
        return self.fc(x)


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 16):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens, attention_mask):
        b, s, d = tokens.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(tokens)).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5
        # the masking constant real exports carry: finfo.min where the mask is 0
        bias = (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        att = torch.softmax(scores + bias, dim=-1)
        x = tokens + self.proj((att @ v).transpose(1, 2).reshape(b, s, d))
        x = x + self.mlp(self.ln2(x))
        return self.out(x.mean(dim=1))


def _seeded(build):
    torch.manual_seed(0)
    model = build()
    # non-trivial BN statistics so BN folding is exercised
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class _TinySample(Sample):
    task = "classification"
    output_names = ("logits",)
    counts = {"calibration": 8, "evaluation": 8}

    def make_feed(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def feeds(self, split, **options):
        self.check_split(split)
        if options:
            raise InputError(f"sample {self.name} takes no data options")
        rng = np.random.default_rng({"calibration": 100, "evaluation": 200}[split])
        return [self.make_feed(rng) for _ in range(self.counts[split])]


class TinyCNNSample(_TinySample):
    name = "tiny_cnn"
    description = "a 5-layer CNN (conv/BN/ReLU6, depthwise, residual, pool, linear), random weights"

    def load_model(self):
        return _seeded(TinyCNN)

    def input_specs(self):
        return [TensorSpec("image", ("batch", 3, 32, 32), "float32")]

    def make_feed(self, rng):
        return {"image": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}


class TinyTransformerSample(_TinySample):
    name = "tiny_transformer"
    description = "one transformer encoder block with a masked attention, random weights"

    def load_model(self):
        return _seeded(TinyTransformer)

    def input_specs(self):
        return [
            TensorSpec("tokens", ("batch", "sequence", 32), "float32"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64", low=1, high=2),
        ]

    def make_feed(self, rng):
        b, s = 2, int(rng.integers(5, 12))
        mask = np.ones((b, s), dtype=np.int64)
        mask[1, s - 2 :] = 0  # padded positions
        return {"tokens": rng.standard_normal((b, s, 32)).astype(np.float32), "attention_mask": mask}
