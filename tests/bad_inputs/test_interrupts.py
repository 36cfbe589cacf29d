"""Ctrl-C at several moments, and what the command imports at start-up.

Each interrupt is a real SIGINT the ``edgeq`` process sends itself at a chosen moment (an import
hook, or a wrapper around an ONNX Runtime call), so the moment is exact rather than a race with
a timer. The promise: exit 130, the last line says so, no traceback, nothing left on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bad_files import snapshot

import edgeq
from edgeq.cli import INTERRUPTED, TERMINATED

pytestmark = pytest.mark.bad_inputs

# the edgeq under test (this checkout), for the child processes
SOURCE_ROOT = str(Path(edgeq.__file__).resolve().parents[1])

# python -c DRIVER MOMENT ARGS...: runs `python -m edgeq ARGS...` with a SIGINT at MOMENT
DRIVER = textwrap.dedent(
    """
    import os, runpy, signal, sys

    moment, sys.argv = sys.argv[1], ["edgeq", *sys.argv[2:]]
    moment, _, sent = moment.partition("+")  # "calibration+SIGTERM": that signal instead of SIGINT
    sent = getattr(signal, sent or "SIGINT")

    def interrupt():
        os.kill(os.getpid(), sent)  # Python runs the signal's handler at the next bytecode

    if moment.startswith("import:"):  # while the command imports this module
        module = moment.partition(":")[2]

        class InterruptOnImport:
            def find_spec(self, name, path=None, target=None):
                if name == module:
                    sys.meta_path.remove(self)
                    interrupt()
                return None

        sys.meta_path.insert(0, InterruptOnImport())
    else:
        import onnxruntime as ort

        if moment == "calibration":  # after the float model's first calibration batch
            run = ort.InferenceSession.run

            def run_then_interrupt(self, *args, **kwargs):
                out = run(self, *args, **kwargs)
                interrupt()
                return out

            ort.InferenceSession.run = run_then_interrupt
        elif moment == "packaging":  # when model.ort, written into the temporary folder, is loaded
            init = ort.InferenceSession.__init__

            def init_then_interrupt(self, path, *args, **kwargs):
                init(self, path, *args, **kwargs)
                if str(path).endswith(".ort"):
                    interrupt()

            ort.InferenceSession.__init__ = init_then_interrupt
        else:
            raise SystemExit(f"unknown moment {moment}")

    runpy.run_module("edgeq", run_name="__main__", alter_sys=True)
    """
)


def run_edgeq(cwd: Path, *argv: str, driver: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    # SIGINT as a terminal leaves it: a shell starts background jobs with SIGINT ignored (POSIX), the
    # child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored signal
    return subprocess.run([sys.executable, *(driver or ["-m", "edgeq"]), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


INTERRUPTS = {
    # start-up: python -m edgeq imports the command module, then the command its libraries
    "start-up, importing the command": ("import:edgeq.cli", ["quantize", "tiny.onnx", "-o", "out.onnx"]),
    "start-up, importing onnx": ("import:onnx", ["quantize", "tiny.onnx", "-o", "out.onnx"]),
    "calibration": ("calibration", ["quantize", "tiny.onnx", "--recipe", "w8a8", "--calib", "good.npz",
                                    "-o", "out.onnx"]),
    "packaging": ("packaging", ["package", "qdq.onnx", "--target", "android", "-o", "pkg"]),
}


def test_sigterm_cleans_up_like_ctrl_c(workdir):
    """A CI timeout or ``kill`` sends SIGTERM: exit 143, one line, nothing half-written (the default action
    would end the process where it stands, leaving its staged outputs behind)."""
    before = snapshot(workdir)
    argv = INTERRUPTS["packaging"][1]  # model.ort already written into the package's temporary folder
    proc = run_edgeq(workdir, *argv, driver=["-c", DRIVER, "packaging+SIGTERM"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()][-1] == TERMINATED
    assert snapshot(workdir) == before, "files were written or changed"


@pytest.mark.parametrize("moment", INTERRUPTS)
def test_ctrl_c(moment, workdir):
    when, argv = INTERRUPTS[moment]
    before = snapshot(workdir)
    proc = run_edgeq(workdir, *argv, driver=["-c", DRIVER, when])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == INTERRUPTED
    assert snapshot(workdir) == before, "files were written or changed"


HEAVY = ("numpy", "onnx", "onnx_ir", "onnxruntime", "onnxscript", "sympy", "torch", "coremltools")


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["quantize"],
                                  ["quantize", "tiny.onnx", "-o", "out.onnx", "--data", "good.npz"],
                                  ["package", "qdq.onnx", "--target", "android"]],
                         ids=["help", "command-help", "missing-argument", "flag-without-budget", "missing-output"])
def test_start_up_and_argument_errors_import_no_heavy_library(argv, workdir):
    probe = textwrap.dedent(
        f"""
        import sys
        from edgeq.cli import main
        try:
            code = main({argv!r})
        except SystemExit as e:
            code = e.code
        print(code, *sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
        """
    )
    proc = run_edgeq(workdir, driver=["-c", probe])
    code, *imported = proc.stdout.split("\n")[-2].split()
    assert code in ("0", "2"), proc.stderr
    assert imported == [], f"start-up imported {imported}"
