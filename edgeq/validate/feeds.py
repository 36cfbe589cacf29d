"""Where validation and calibration inputs come from: samples, .npz files, or Python iterables.

Every feed is loaded and checked against the model's input specs before any model runs.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeq.errors import InputError, first_line
from edgeq.specs import TensorSpec, check_feeds


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """One feed from an ``.npz`` file (array names are input names)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read {path} as .npz: {first_line(e, 200)}",
                         hint="save feeds with numpy.savez(path, name=array, ...)") from e


def npz_feeds(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Feeds from one ``.npz`` file or every ``*.npz`` in a folder (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise InputError(f"folder {p} holds no .npz files", hint="write one feed per .npz file")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"data not found: {p}", hint="give a sample name, an .npz file or a folder of them")
    feeds = []
    for f in files:
        feed = read_npz(f)
        feed["__source__"] = str(f)
        feeds.append(feed)
    return feeds


def parse_sample_ref(text: str) -> tuple[str, dict[str, str]]:
    """``name`` or ``name:key=value,key=value`` → (name, options)."""
    name, _, rest = text.partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq:
            raise InputError(f"cannot read data option {part!r} in {text!r}", hint="write name:key=value")
        opts[k.strip()] = v.strip()
    return name, opts


def open_feeds(data, *, split: str = "evaluation"):
    """Resolve ``data`` to an (unchecked, possibly lazy) iterable of feeds and a description.

    ``data`` is a sample (object or name, optionally ``name:key=value``), a path to an ``.npz``
    file or a folder of them, or an iterable of feeds. ``split`` picks the sample's
    ``evaluation`` or ``calibration`` set.
    """
    from edgeq import sources

    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.exists():
            return npz_feeds(p), f"{p}"
        name, opts = parse_sample_ref(str(data))
        if not sources.is_sample(name) and _looks_like_path(str(data), name):
            raise InputError(f"data not found: {p}", hint="check the path; give an .npz file, a folder of them, "
                                                          "or a sample name")
        sample = sources.get_sample(name, missing_hint=f"no file or folder {p} either")
        return sample.feeds(split, **opts), f"sample {name} ({split} set)"
    if isinstance(data, sources.Sample):
        return data.feeds(split), f"sample {data.name} ({split} set)"
    if isinstance(data, Mapping):
        return [data], "one feed"
    if isinstance(data, Iterable):
        return data, "feeds from Python"
    raise InputError(f"cannot read inputs from a {type(data).__name__}",
                     hint="give a sample name, an .npz file or folder, or an iterable of dicts")


def _looks_like_path(text: str, name: str) -> bool:
    """A data argument meant as a file or folder: a folder part, or a suffix (``feeds.npz``) no sample name has."""
    return "/" in text or os.sep in text or Path(name).suffix != ""


def load_feeds(
    data,
    specs: Sequence[TensorSpec],
    *,
    split: str = "evaluation",
    limit: int | None = None,
    finite: bool = False,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Resolve ``data`` (see :func:`open_feeds`) to a checked list of feeds and its description.

    ``limit`` keeps the first N feeds; ``finite`` also rejects NaN and infinity (calibration data).
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}", hint="give the number of feeds to use")
    raw, desc = open_feeds(data, split=split)
    feeds = []
    for feed in raw:
        feeds.append(feed)
        if limit is not None and len(feeds) >= limit:
            break
    return check_feeds(feeds, specs, source=desc, finite=finite), desc


def check_same_inputs(runners: Sequence) -> None:
    """Fail, naming both models, when the models to compare do not take the same inputs.

    Checked before any data is read, so that a mismatch between models is not reported as a
    fault of the data file. Runners that do not know their inputs (a torch module) are skipped.
    """
    known = [r for r in runners if r.input_specs]
    if not known:
        return
    first = known[0]
    want = {s.name: s.dtype for s in first.input_specs}
    for r in known[1:]:
        got = {s.name: s.dtype for s in r.input_specs}
        if got != want:
            raise InputError(
                f"{r.label} takes inputs {_signature(r.input_specs)} but {first.label} takes "
                f"{_signature(first.input_specs)}",
                hint="compare models of the same network (same input names and dtypes)",
            )


def _signature(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name!r} ({s.dtype})" for s in specs)


def shapes_seen(feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, list[list[int]]]:
    """Distinct input shapes across feeds, per input (to show which dynamic sizes were run)."""
    seen: dict[str, list[list[int]]] = {}
    for feed in feeds:
        for k, v in feed.items():
            shp = list(v.shape)
            if shp not in seen.setdefault(k, []):
                seen[k].append(shp)
    return seen
