"""Package a (QDQ) ONNX model for one target: the target resolved and configured, then its package flow."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from edgeq.errors import InputError


def package_model(model: str | os.PathLike, target, output: str | os.PathLike, *, force: bool = False,
            options: Mapping | None = None):
    """Package a (QDQ) ONNX model for a deployment target into the folder ``output``.

    ``target`` is a target name (``edgeq.plugins.target_names()``, e.g. ``android``) or a
    :class:`targets.base.Target`. ``options`` are the target's packaging options (e.g.
    ``{"compute": "fp32", "shapes": {"batch": 1}}`` for ios17/ios18), applied with
    ``target.configure(**options)``: the target validates them, and one that takes none rejects
    any (an :class:`InputError`). Pre-flight runs first and nothing is written when the model
    cannot run on the target; the folder appears complete or not at all. Returns the target's
    ``PackageResult`` (path, model file, files, manifest).
    """
    from edgeq import plugins

    tgt = plugins.load_target(target) if isinstance(target, str) else target
    if options is not None and not isinstance(options, Mapping):
        raise InputError(f"options must map option names to values, got {options!r}",
                         hint='e.g. options={"compute": "fp32"}')
    if options:
        tgt = tgt.configure(**options)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model file not found: {path}" if not path.exists() else f"{path} is not an ONNX file",
                         hint="give the QDQ .onnx written by `edgeq quantize` (or any .onnx)")
    return tgt.package(path, output, force=force)
