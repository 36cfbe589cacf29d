"""Where models come from: bundled samples and ``package.module:callable`` factories.

A sample knows its model factory, its input specs, example inputs, a calibration set, a
disjoint evaluation set, and its natural metric (``task``). The bundled ones live in the
top-level ``samples`` package; :func:`get_sample` looks them up by name.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeq.errors import InputError, first_line
from edgeq.specs import TensorSpec

TASKS = ("generic", "classification", "embedding", "causal_lm")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve_model(model) -> tuple[object, Sample | None]:
    """An ``nn.Module`` (or a path/Runner, returned as is) and the sample it came from, if any.

    ``model`` may be a module, a :class:`~edgeq.Sample`, a sample name, a
    ``package.module:callable`` factory, or a path to a model file.
    """
    if isinstance(model, Sample):
        return model, model
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if Path(text).exists():
            return Path(text), None
        if is_sample(text):
            s = get_sample(text)
            return s, s
        if _FACTORY_RE.match(text):
            return load_factory(text), None
        looks_like_path = "/" in text or os.sep in text or Path(text).suffix != ""
        if looks_like_path:
            raise InputError(f"model file not found: {text}", hint="check the path")
        raise InputError(
            f"cannot find a model called {text!r}",
            hint=f"give a model file, a package.module:callable factory, or a sample ({', '.join(sample_names())})",
        )
    return model, None



class LazyFeeds:
    """Feeds made batch by batch when iterated (again on every iteration), with a known length.

    Calibration streams them, so a large data set never sits in memory at once.
    """

    def __init__(self, make: Callable[[], Iterator[dict[str, np.ndarray]]], length: int):
        self._make = make
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._make()

    def __getitem__(self, index):
        if isinstance(index, slice):
            wanted = set(range(self._length)[index])
            stop = max(wanted, default=-1) + 1  # stop making batches past the last one asked for
            picked = {i: f for i, f in enumerate(itertools.islice(self._make(), stop)) if i in wanted}
            return [picked[i] for i in range(self._length)[index]]
        if not -self._length <= index < self._length:
            raise IndexError(index)
        index %= self._length
        for i, feed in enumerate(itertools.islice(self._make(), index + 1)):
            if i == index:
                return feed
        raise IndexError(index)


class Sample(ABC):
    """A real (or tiny) model with its data, runnable offline."""

    name: str = ""
    description: str = ""
    task: str = "generic"
    output_names: tuple[str, ...] = ("output",)
    # which splits exist; calibration and evaluation are disjoint by construction
    splits: tuple[str, ...] = ("calibration", "evaluation")
    # what ``edgeq build`` uses for this sample unless told (None: the build's defaults)
    recipe: str | None = None
    targets: tuple[str, ...] | None = None

    @abstractmethod
    def load_model(self):
        """The float ``nn.Module`` (eval mode)."""

    @abstractmethod
    def input_specs(self) -> list[TensorSpec]:
        """Inputs of the model, in ``forward`` order, with dynamic axes named."""

    @abstractmethod
    def feeds(self, split: str, **options) -> Sequence[dict[str, np.ndarray]]:
        """The ``calibration`` or ``evaluation`` set: a list of feeds, or a :class:`LazyFeeds`."""

    def example_inputs(self) -> dict[str, np.ndarray]:
        """Inputs used to trace the model: the first evaluation feed by default."""
        return self.feeds("evaluation")[0]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise InputError(f"sample {self.name} has no {split!r} set", hint=f"use one of {', '.join(self.splits)}")

    @staticmethod
    def int_option(options: Mapping[str, str], key: str, default: int | None) -> int | None:
        if key not in options:
            return default
        try:
            return int(options[key])
        except ValueError as e:
            raise InputError(f"data option {key}={options[key]!r} must be an integer") from e


def _registry() -> dict[str, str]:
    try:
        import samples
    except ImportError as e:  # installed without the samples package
        raise InputError("the bundled samples are not installed", hint="install edgeq from its source tree") from e
    return dict(samples.REGISTRY)


def sample_names() -> list[str]:
    return sorted(_registry())


def is_sample(name: str) -> bool:
    try:
        return name in _registry()
    except InputError:
        return False


def get_sample(name: str, *, missing_hint: str | None = None) -> Sample:
    """The bundled sample called ``name``."""
    reg = _registry()
    if name not in reg:
        hint = f"known samples: {', '.join(sorted(reg))}"
        raise InputError(f"unknown sample {name!r}" + (f" ({missing_hint})" if missing_hint else ""), hint=hint)
    obj = _import_target(reg[name])
    return obj()


def _import_target(ref: str):
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise InputError(f"cannot read factory {ref!r}", hint="write it as package.module:callable")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules in the current folder are found
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise InputError(
            f"cannot import module {mod_name!r} for factory {ref!r}: {e}",
            hint="check the module name and that it is importable from the current folder",
        ) from e
    except Exception as e:
        raise InputError(f"importing {mod_name!r} for factory {ref!r} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {mod_name!r} has no attribute {attr!r}", hint=f"check the factory {ref!r}")
        obj = getattr(obj, part)
    return obj


def load_factory(ref: str):
    """Call the ``package.module:callable`` factory ``ref`` and return the ``nn.Module`` it builds."""
    fn = _import_target(ref)
    if not callable(fn):
        raise InputError(f"factory {ref!r} is not callable")
    try:
        model = fn()
    except Exception as e:
        raise InputError(f"factory {ref!r} raised {type(e).__name__}: {first_line(e)}") from e
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"factory {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
