"""The README's five-minute tour runs as written: every `edgeq` command of its code blocks, in order,
in a fresh folder, exits 0 (the packages land in dist/, a folder the tour does not create)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def tour_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    tour = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", tour, flags=re.DOTALL):
        for line in block.splitlines():
            if line.startswith("edgeq "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_the_tour_has_the_steps_it_promises():
    firsts = [c[0] for c in tour_commands()]
    for step in ("samples", "export", "validate", "quantize", "analyze", "package"):
        assert step in firsts
    assert any(c[:2] == ["package", "minilm.w8a8.onnx"] and "dist/android" in c for c in tour_commands())


def test_the_tour_runs_as_written(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in tour_commands():
        proc = subprocess.run([sys.executable, "-m", "edgeq", *argv, "--no-progress"] if _takes_progress(argv)
                              else [sys.executable, "-m", "edgeq", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"edgeq {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert (tmp_path / "dist" / "android" / "model.ort").is_file()
    assert list((tmp_path / "dist" / "ios").glob("*.mlpackage"))


def _takes_progress(argv: list[str]) -> bool:
    """Commands with a --no-progress flag get it (the tour's output is for people; the test's is a log)."""
    return argv[0] in ("validate", "analyze", "quantize") and "--no-progress" not in argv
