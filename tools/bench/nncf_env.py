"""Where NNCF runs: this interpreter if it has it, else a separate venv beside the benchmark.

NNCF is a peer under test, not an edgeq dependency, and it must never change the project's
environment (torch is pinned to exactly 2.13.0 CPU). ``setup`` therefore first asks pip, in a
dry run, what ``pip install nncf`` would install here, refuses if that includes torch, and
otherwise installs NNCF into ``<work>/nncf-venv``, a venv that sees the project's packages
through a ``.pth`` file (so the same onnx, onnxruntime and numpy are used) and adds only NNCF
and its small dependencies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

_CHECK = "import nncf, onnx, onnxruntime; print(nncf.__version__)"


def _probe(python: str) -> str | None:
    try:
        r = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def venv_dir(work: Path) -> Path:
    return work / "nncf-venv"


def find(work: Path, explicit: str | None = None) -> tuple[str | None, str]:
    """(python that imports nncf, description) or (None, why not)."""
    candidates = [explicit] if explicit else [sys.executable, str(venv_dir(work) / "bin" / "python")]
    for py in candidates:
        if py and Path(py).exists() and (version := _probe(py)):
            return py, f"nncf {version} ({py})"
    if explicit:
        return None, f"NNCF cannot be imported by --nncf-python {explicit}"
    return None, ("NNCF is not installed: run the benchmark with --setup-nncf (installs it into "
                  f"{venv_dir(work)} if pip can do that without replacing torch) or give --nncf-python")


def setup(work: Path, log=print) -> tuple[str | None, str]:
    """Install NNCF into ``<work>/nncf-venv`` unless that would bring another torch."""
    report = work / "nncf-dry-run.json"
    log("  NNCF: asking pip (dry run) what `pip install nncf` would install beside this environment")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                        "nncf"], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"NNCF does not install here: pip (dry run) failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    would = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for pinned in ("torch", "onnx", "onnxruntime", "numpy"):
        if pinned in would:
            return None, (f"NNCF not installed: pip would install {pinned}=={would[pinned]} beside it, "
                          f"replacing this environment's {pinned}")
    log(f"  NNCF: pip would add only {', '.join(f'{k}=={v}' for k, v in sorted(would.items()))}")
    venv = venv_dir(work)
    if not (venv / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
        main_site = sysconfig.get_paths()["purelib"]
        # addsitedir (not a bare path) so the project's own .pth files (editable edgeq) apply too
        (site / "edgeq_main_env.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "nncf"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"NNCF install into {venv} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return find(work, str(venv / "bin" / "python"))
