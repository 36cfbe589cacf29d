"""The command line: bad input gives one line naming the problem, exit 2, no traceback, no file."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeq.cli import main

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x)

    class Untraceable(nn.Module):
        def forward(self, x):
            return {"not": "a tensor"}

    def tiny():
        return Tiny()

    def untraceable():
        return Untraceable()

    def broken():
        raise RuntimeError("weights missing")

    not_a_model = 42
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORIES)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)  # another test's module of that name
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeq: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_export_and_validate_a_factory(workdir, capsys):
    code, out, err = run(capsys, "export", "my_models:tiny", "-o", "tiny.onnx", "--input", "x:float32[batch,6]",
                         "--json", "export.json")
    assert code == 0, err
    assert "dynamo exporter" in out and "SQNR" in out
    assert json.loads((workdir / "export.json").read_text())["exporter"] == "dynamo"
    np.savez(workdir / "feed.npz", x=np.ones((3, 6), np.float32))
    code, out, err = run(capsys, "validate", "tiny.onnx", "--reference", "my_models:tiny", "--data", "feed.npz",
                         "--min-sqnr", "60", "--json", "v.json")
    assert code == 0, err
    assert "result: PASS" in out
    assert json.loads((workdir / "v.json").read_text())["passed"] is True


def test_factory_that_cannot_be_imported(workdir, capsys):
    code, _, err = run(capsys, "export", "no_such_pkg.models:make", "-o", "m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "cannot import module 'no_such_pkg.models'")
    code, _, err = run(capsys, "export", "my_models:nope", "-o", "m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "has no attribute 'nope'")
    code, _, err = run(capsys, "export", "my_models:broken", "-o", "m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "raised RuntimeError: weights missing")
    code, _, err = run(capsys, "export", "my_models:not_a_model", "-o", "m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "not callable")
    assert not (workdir / "m.onnx").exists()


def test_model_that_cannot_be_traced(workdir, capsys):
    code, _, err = run(capsys, "export", "my_models:untraceable", "-o", "m.onnx", "--input", "x:float32[2,6]")
    assert_clean_error(code, err, "returned a dict", "str")
    assert os.listdir(workdir) == ["my_models.py"] or "m.onnx" not in os.listdir(workdir)


def test_wrong_input_spec(workdir, capsys):
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "m.onnx", "--input", "x:float32[batch,5]")
    assert_clean_error(code, err, "x:float32[batch,5]", "check the input names, shapes and dtypes")
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "m.onnx", "--input", "x:f32[1,6]")
    assert_clean_error(code, err, "unknown dtype 'f32'")
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "m.onnx", "--input", "x=1,6")
    assert_clean_error(code, err, "cannot read input spec")
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "m.onnx")
    assert_clean_error(code, err, "no input specs")
    assert not (workdir / "m.onnx").exists()


def test_missing_or_corrupt_onnx(workdir, capsys):
    np.savez(workdir / "feed.npz", x=np.ones((3, 6), np.float32))
    code, _, err = run(capsys, "validate", "missing.onnx", "--reference", "also_missing.onnx", "--data", "feed.npz")
    assert_clean_error(code, err, "model file not found", "missing.onnx")
    (workdir / "corrupt.onnx").write_bytes(os.urandom(256))
    code, _, err = run(capsys, "validate", "corrupt.onnx", "--reference", "corrupt.onnx", "--data", "feed.npz")
    assert_clean_error(code, err, "corrupt.onnx")
    code, _, err = run(capsys, "validate", "corrupt.onnx", "--reference", "corrupt.onnx", "--data", "nofeeds.npz")
    assert_clean_error(code, err, "corrupt.onnx")


def test_unwritable_or_existing_output(workdir, capsys):
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "/proc/m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "cannot write /proc/m.onnx", "not writable")
    (workdir / "afile").write_text("")
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "afile/m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "afile is not a folder")
    (workdir / "m.onnx").write_text("precious")
    code, _, err = run(capsys, "export", "my_models:tiny", "-o", "m.onnx", "--input", "x:float32[1,6]")
    assert_clean_error(code, err, "already exists", "--force")
    assert (workdir / "m.onnx").read_text() == "precious"


def test_validation_threshold_failure_exits_1(workdir, capsys):
    assert run(capsys, "export", "my_models:tiny", "-o", "t.onnx", "--input", "x:float32[batch,6]")[0] == 0
    np.savez(workdir / "feed.npz", x=np.ones((3, 6), np.float32))
    # a top-1 gate on a [batch, 3] Linear output: measured as a classifier (agreement 1.0), not failed blind
    code, out, err = run(capsys, "validate", "t.onnx", "-r", "t.onnx", "--data", "feed.npz",
                         "--min-top1-agreement", "0.9")
    assert code == 0, err
    assert "pass top1_agreement = 1" in out
    # the same gate on a task that has no top-1: it fails and says why
    code, out, err = run(capsys, "validate", "t.onnx", "-r", "t.onnx", "--data", "feed.npz", "--task",
                         "embedding", "--min-top1-agreement", "0.9")
    assert code == 1
    assert "not measured: the task is not classification" in out and "top1_agreement" in err


def test_debug_shows_the_traceback(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq", "export", "nope:make", "-o", "m.onnx", "--input", "x:float32[1]", "--debug"],
        capture_output=True, text=True, cwd=workdir,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq", "export", "nope:make", "-o", "m.onnx", "--input", "x:float32[1]"],
        capture_output=True, text=True, cwd=workdir,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_samples_listing(capsys):
    code, out, _ = run(capsys, "samples")
    assert code == 0 and "minilm" in out and "efficientnet_lite0" in out
