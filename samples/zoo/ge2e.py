"""resemblyzer's GE2E speaker encoder: a 3-layer LSTM (hidden 256) over 40-band mel power frames,
the last layer's final hidden state through Linear + ReLU, L2-normalised to a 256-d embedding.

Input ``mels``: ``[batch, frames, 40]`` (resemblyzer uses partials of 160 frames, 10 ms hop;
:func:`mel_frames` computes them); output ``embedding``: ``[batch, 256]``. Written here because
resemblyzer imports librosa and webrtcvad.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from samples.zoo.weights import load_state, package_file

SAMPLE_RATE = 16000
MELS = 40
PARTIAL_FRAMES = 160


class SpeakerEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        e = torch.relu(self.linear(hidden[-1]))
        return e / torch.linalg.vector_norm(e, dim=1, keepdim=True)


def build_speaker_encoder() -> SpeakerEncoder:
    """The GE2E encoder with resemblyzer's ``pretrained.pt`` (its two similarity scalars, used only
    in training, are dropped)."""
    model = SpeakerEncoder()
    state = load_state(package_file("resemblyzer", "pretrained.pt", "resemblyzer"), key="model_state")
    state = {k: v for k, v in state.items() if not k.startswith("similarity_")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _mel_filterbank(n_fft: int, sr: int = SAMPLE_RATE, n_mels: int = MELS) -> np.ndarray:
    """Slaney-style triangular mel filters, area-normalised (librosa's default ``mel``)."""
    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), lin)

    def mel_to_hz(m):
        m = np.asarray(m, np.float64)
        return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), m * (200.0 / 3))

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    fb = np.maximum(0, np.minimum(lower, upper))
    return fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def mel_frames(wav: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """``[frames, 40]`` mel power spectrogram of a 16 kHz waveform: 25 ms Hann window, 10 ms hop,
    centred frames (resemblyzer's ``wav_to_mel_spectrogram``, computed with numpy)."""
    n_fft, hop = sr * 25 // 1000, sr * 10 // 1000
    y = np.pad(np.asarray(wav, np.float64), n_fft // 2, mode="reflect")
    count = 1 + (len(y) - n_fft) // hop
    frames = y[np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return (power @ _mel_filterbank(n_fft, sr).T).astype(np.float32)
