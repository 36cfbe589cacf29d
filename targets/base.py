"""The narrow interface every target implements, and the packaging flow they share.

A target (Android / ORT Mobile, iOS / Core ML) is a :class:`Target`: a declarative
:class:`~edgeq.quant.profile.TargetProfile` (what the runtime runs), a ``preflight`` that lists
every problem before anything is written, a ``build`` that writes the package files into a
folder it is given, and a ``runner`` that executes a built package on the host for
``edgeq validate``. :func:`package` does the rest the same way for all of them: output checks,
pre-flight, a temporary folder, ``manifest.json`` with hashes, and an atomic move into place.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgeq import __version__, onnx_io
from edgeq.onnx_io import file_sha256 as sha256  # the package manifests' file hash
from edgeq.errors import InputError, UnsupportedError
from edgeq.quant.profile import TargetProfile


# manifest.json keys that differ between two builds of the same input (everything else is equal,
# and so is every other file of the package, byte for byte)
VOLATILE_KEYS = ("created",)

# how `edgeq package` spells the packaging options it passes on, for error messages
OPTION_FLAGS = {"compute": "--compute", "shapes": "--shape"}


def option_names(options) -> str:
    """``--compute, --shape`` for options the CLI has a flag for, the keyword otherwise."""
    return ", ".join(OPTION_FLAGS.get(k, repr(k)) for k in options)


@dataclass(frozen=True)
class Problem:
    """One reason a model cannot run on a target: the node, its op, and what to do."""

    node: str
    op_type: str
    message: str
    hint: str = ""

    @property
    def what(self) -> str:
        """The node, its op and what is wrong, without the hint."""
        return f"node {self.node!r} ({self.op_type}): {self.message}" if self.node else f"{self.op_type}: {self.message}"

    def __str__(self) -> str:
        return self.what + (f" ({self.hint})" if self.hint else "")


@dataclass(frozen=True)
class PackageResult:
    target: str
    path: Path  # the package folder
    model_file: Path  # the runnable model inside it (.ort, .mlpackage)
    files: tuple[Path, ...]
    manifest: dict = field(default_factory=dict)
    seconds: float = 0.0


class Target(ABC):
    """One deployment target. Subclasses are stateless apart from their options."""

    name: str = ""
    description: str = ""

    @property
    @abstractmethod
    def profile(self) -> TargetProfile:
        """What the target's runtime runs (the plan asks this, never an ``if target``)."""

    @abstractmethod
    def preflight(self, model: onnx.ModelProto) -> list[Problem]:
        """Every reason ``model`` cannot run on this target; empty when it can. Writes nothing."""

    @abstractmethod
    def build(self, model_path: Path, model: onnx.ModelProto, folder: Path) -> tuple[Path, dict]:
        """Write the package files into ``folder`` (a fresh temporary folder).

        Returns the runnable model file and target facts for the manifest (tool versions, minimum
        runtime version, ...). ``manifest.json`` is written by :func:`package`.
        """

    def readme(self, manifest: dict) -> str:
        """Text of the package README (how to load and feed this model on the device)."""
        return ""

    def acceptance(self, qdq_path: Path, package: "PackageResult", float_path: Path, feeds: list) -> list[dict]:
        """Checks a package must pass beyond the build's gates against the float model, as validation
        check rows (``check``, ``value``, ``threshold``, ``passed``); none by default."""
        return []

    def configure(self, **options) -> "Target":
        """This target with packaging ``options`` applied (``edgeq package --compute/--shape``,
        ``edgeq.api.package(..., options={...})``).

        A target that takes options overrides this, validates them itself and returns a
        configured copy (the target it is called on stays as it was). This default takes none:
        any option is an :class:`InputError`; no options returns the target unchanged.
        """
        if options:
            names = option_names(options)
            raise InputError(f"target {self.name} takes no packaging options (got {names})",
                             hint=f"drop {names} for {self.name}")
        return self

    def package(self, model_path, output, *, force: bool = False, extra_manifest: dict | None = None) -> "PackageResult":
        """Pre-flight, build and atomically write the package folder (see :func:`package`)."""
        return package(model_path, self, output, force=force, extra_manifest=extra_manifest)


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (``.mlpackage`` is a folder), by relative path."""
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def quantization_facts(model: onnx.ModelProto) -> dict:
    """What the quantizer wrote into the model (``edgeq.*`` metadata), for the manifest.

    ``quantization`` holds every ``edgeq.*`` key without its prefix (JSON values decoded);
    ``calibration_sha256`` is the hash of the calibration data, or None when none was used.
    """
    meta = {p.key: p.value for p in model.metadata_props}
    quant = {}
    for key, value in sorted(meta.items()):
        if key.startswith("edgeq.") and key != "edgeq.calibration_sha256":
            try:
                quant[key[len("edgeq."):]] = json.loads(value) if value[:1] in "{[" else value
            except ValueError:
                quant[key[len("edgeq."):]] = value
    return {"quantization": quant, "calibration_sha256": meta.get("edgeq.calibration_sha256")}


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def preflight_error(model_name: str, target_name: str, problems: list[Problem]) -> UnsupportedError:
    """The error for a model that fails pre-flight.

    Its last line names the model, the target and the first problem's node and op (the line a
    terminal or CI log shows last), then the hints; with more problems, the lines above list
    them all (up to 20).
    """
    first = f"{model_name} cannot run on target {target_name}: {problems[0].what}"
    message = first
    if len(problems) > 1:
        listed = "\n  ".join(p.what for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        message = (f"{model_name} cannot run on target {target_name}: {len(problems)} problems\n  {listed}{more}\n"
                   f"{first} (and {len(problems) - 1} more listed above)")
    hints = list(dict.fromkeys(p.hint for p in problems if p.hint))
    return UnsupportedError(message, hint="; ".join(hints[:3]) or "change the recipe so these nodes use a format "
                                                                   "the target runs")


def package(
    model_path: str | os.PathLike,
    target: Target,
    output: str | os.PathLike,
    *,
    force: bool = False,
    extra_manifest: dict | None = None,
) -> PackageResult:
    """Package the QDQ ONNX at ``model_path`` for ``target`` into the folder ``output``.

    Pre-flight runs first: a model the target cannot run raises :class:`UnsupportedError`
    naming every offending node, and nothing is written. The package is built in a temporary
    folder beside ``output`` and moved into place only when complete.
    """
    t0 = time.perf_counter()
    out = onnx_io.check_output_folder(output, force=force)
    model_path = Path(model_path)
    model = onnx_io.read_onnx(model_path)
    problems = target.preflight(model)
    if problems:
        raise preflight_error(model_path.name, target.name, problems)
    with onnx_io.atomic_folder(out) as tmp:
        model_file, facts = target.build(model_path, model, tmp)
        manifest = {
            "edgeq_version": __version__,
            "target": target.name,
            "model_file": model_file.name,
            "source_model": model_path.name,
            "source_sha256": sha256(model_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **quantization_facts(model),
            **facts,
            **(extra_manifest or {}),
        }
        readme = target.readme(manifest)
        if readme:
            (tmp / "README.md").write_text(readme)
        manifest["files"] = hash_tree(tmp)
        manifest["file_bytes"] = file_sizes(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    files = tuple(sorted(p for p in out.rglob("*") if p.is_file()))
    return PackageResult(target.name, out, out / model_file.name, files, manifest, time.perf_counter() - t0)
