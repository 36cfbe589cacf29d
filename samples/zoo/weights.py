"""Locate and load the pretrained weights that zoo packages ship, without importing the packages
(their ``__init__`` imports torchvision, torchaudio or librosa, which are not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgeq.errors import InputError


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """``relative`` inside the installed top-level ``package`` (found, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the zoo model needs the pip package {pip_name} (import name {package})",
                         hint="bash tools/setup_zoo.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise InputError(f"{pip_name} is installed but has no {relative}", hint="bash tools/setup_zoo.sh")
    return path


def load_state(path: Path, *, prefix: str = "", key: str | None = None) -> dict:
    """A state dict from ``path`` (``weights_only``), under ``key`` if given, ``prefix`` stripped."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        state = state[key]
    return {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
