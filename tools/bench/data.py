"""Benchmark data, written once as folders of ``.npz`` feeds and read back lazily.

Every method (edgeq, ONNX Runtime, NNCF) reads the same files, one batch at a time, so a
method's peak RSS is its own and not the data set's. Sets per model (``work/data/<model>/``):

- ``calib``: the sample's calibration split, batches of 8 (MiniLM: each batch padded to its
  longest sentence, so lengths vary).
- ``calib_fixed``: MiniLM only, the same sentences padded to one length (the longest, rounded
  up to 8), for the ORT histogram calibrators that cannot take varying lengths.
- ``calib_b1``: the calibration split one sample per feed (NNCF's dataset convention).
- ``eval``: the evaluation split (never seen by calibration), batches of 8.
- ``latency``: one batch-1 feed (MiniLM: an evaluation sentence padded to 128 tokens).
- ``rss<N>``: N calibration samples (EfficientNet: more crops per photo; MiniLM: the 200
  calibration sentences, cut or repeated) for the peak-RSS-versus-sample-count study.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LATENCY_SEQ = 128  # MiniLM latency input: one sentence padded to the model's maximum length


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str  # "embedding" | "classification"
    output: str


MODELS = {
    "minilm": ModelInfo("minilm", "embedding", "embeddings"),
    "efficientnet_lite0": ModelInfo("efficientnet_lite0", "classification", "logits"),
}


class LazyFeeds:
    """The feeds of one folder, read file by file on each iteration (re-iterable, sized)."""

    def __init__(self, folder: str | Path, limit: int | None = None):
        self.files = sorted(Path(folder).glob("*.npz"))[:limit]
        if not self.files:
            raise FileNotFoundError(f"no .npz feeds in {folder}")

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        for f in self.files:
            with np.load(f, allow_pickle=False) as z:
                yield {k: z[k] for k in z.files}


def _write(folder: Path, feeds, desc: str) -> dict:
    """Write each feed of ``feeds`` (any iterable of dicts) as one .npz, then the meta; atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.glob("*.npz"):
        old.unlink()
    count = samples = 0
    shapes, dtypes = set(), set()
    for i, feed in enumerate(feeds):
        np.savez(tmp / f"{i:05d}.npz", **feed)
        first = np.asarray(next(iter(feed.values())))
        count, samples = count + 1, samples + int(first.shape[0])
        shapes.add(str(list(first.shape)))
        dtypes.add(str(first.dtype))
    meta = {"desc": desc, "feeds": count, "samples": samples, "shapes": sorted(shapes),
            "dtype": ",".join(sorted(dtypes))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(folder)
    return meta


def _batches(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def _minilm_sets(rss_counts: list[int]) -> dict:
    from edgeq.sources import get_sample
    from samples import minilm

    s = get_sample("minilm")
    calib = s.feeds("calibration")
    longest = max(f["input_ids"].shape[1] for f in calib)
    pad = min(minilm.MAX_LENGTH, math.ceil(longest / 8) * 8)
    texts = s.texts("calibration")
    sets = {
        "calib": (lambda: calib, "calibration split: 200 sentences, batches of 8 padded per batch"),
        "calib_fixed": (lambda: s.feeds("calibration", pad=str(pad)),
                        f"calibration split: 200 sentences, batches of 8 all padded to {pad} tokens"),
        "calib_b1": (lambda: s.feeds("calibration", batch="1"), "calibration split: 200 sentences, one per feed"),
        "eval": (lambda: s.feeds("evaluation"), "evaluation split: 200 sentences, batches of 8 padded per batch"),
        "latency": (lambda: [minilm.tokenize(s.texts("evaluation")[:1], LATENCY_SEQ)],
                    f"one evaluation sentence padded to {LATENCY_SEQ} tokens (batch 1)"),
    }
    for n in rss_counts:
        chosen = [texts[i % len(texts)] for i in range(n)]
        sets[f"rss{n}"] = (lambda chosen=chosen: [minilm.tokenize(chosen[i : i + 8]) for i in range(0, len(chosen), 8)],
                           f"{n} calibration sentences (the 200 {'repeated' if n > len(texts) else 'cut'}), "
                           "batches of 8")
    return sets


def _efficientnet_sets(rss_counts: list[int]) -> dict:
    from edgeq.sources import get_sample
    from samples import efficientnet_lite0 as eff

    s = get_sample("efficientnet_lite0")
    photos = len(eff.CALIBRATION_PHOTOS)
    sets = {
        "calib": (lambda: s.feeds("calibration"), f"calibration split: {photos} photos x 12 crops, batches of 8"),
        "calib_b1": (lambda: s.feeds("calibration", batch="1"),
                     f"calibration split: {photos} photos x 12 crops, one per feed"),
        "eval": (lambda: s.feeds("evaluation"),
                 f"evaluation split: {len(eff.EVALUATION_PHOTOS)} other photos x 12 crops, batches of 8"),
        "latency": (lambda: [{"image": s.images("evaluation", 1)[:1]}], "one evaluation crop (batch 1)"),
    }
    for n in rss_counts:
        crops = math.ceil(n / photos)
        sets[f"rss{n}"] = (lambda crops=crops, n=n: _batches({"image": s.images("calibration", crops)[:n]}, 8),
                           f"{n} calibration crops ({crops} per photo, first {n}), batches of 8")
    return sets


_SET_BUILDERS = {"minilm": _minilm_sets, "efficientnet_lite0": _efficientnet_sets}


def prepare(work: Path, model: str, rss_counts: list[int], log=print) -> dict[str, dict]:
    """Write (or reuse) every data set of ``model``; returns {set name: meta with its folder}."""
    root = work / "data" / model
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (build, desc) in _SET_BUILDERS[model](rss_counts).items():
        folder = root / name
        meta_file = folder / "meta.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
        else:
            log(f"  writing {model} data set {name}: {desc}")
            meta = _write(folder, build(), desc)
        out[name] = {**meta, "dir": str(folder)}
    return out
