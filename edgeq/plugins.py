"""Targets and package runners are plugins: the core finds them through entry points.

``edgeq.targets`` maps a target name (``android``, ``ios17``, ``ios18``) to a zero-argument
factory returning a :class:`targets.base.Target`; ``edgeq.runners`` maps a file suffix to a
runner factory (see :mod:`edgeq.validate.runners`).
"""

from __future__ import annotations

from importlib import metadata

from edgeq.errors import InputError

GROUP = "edgeq.targets"


def target_names() -> list[str]:
    return sorted({ep.name for ep in metadata.entry_points(group=GROUP)})


def load_target(name: str):
    """The target called ``name``, or an InputError listing the known ones."""
    for ep in metadata.entry_points(group=GROUP):
        if ep.name == name:
            try:
                factory = ep.load()
            except ImportError as e:
                raise InputError(f"target {name} cannot load: {e}",
                                 hint="install what it needs (see `pip install 'edgeq[all]'`)") from e
            return factory()
    known = ", ".join(target_names()) or "none installed"
    raise InputError(f"unknown target {name!r}", hint=f"targets: {known}")
