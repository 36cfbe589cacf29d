import json

import numpy as np
import pytest

import edgeq
from edgeq.errors import InputError
from edgeq.validate import Runner, Thresholds, open_runner, register_runner
from edgeq.validate.report import format_report

from helpers import make_onnx, mlp_text


@pytest.fixture
def perturbed_onnx(tmp_path):
    """The MLP with its second layer's weights scaled by 1.05: only `y` differs."""
    return make_onnx(mlp_text(scale2=1.05), tmp_path / "perturbed.onnx")


def test_identical_models_compare_exactly(mlp_onnx, mlp_feeds):
    rep = edgeq.validate(mlp_onnx, mlp_onnx, mlp_feeds, progress=False)
    (c,) = rep.candidates
    assert c.outputs["y"]["sqnr_db"] == float("inf")
    names = [r["name"] for r in c.intermediates]
    assert names == ["h", "hb", "r"]  # graph order, matched by name
    assert rep.passed and rep.data["feeds"] == 4


def test_perturbation_is_located_by_intermediates(mlp_onnx, perturbed_onnx, mlp_feeds):
    rep = edgeq.validate(perturbed_onnx, mlp_onnx, mlp_feeds, progress=False,
                         thresholds=Thresholds(min_sqnr_db=30.0, min_cosine=0.99))
    (c,) = rep.candidates
    # a 5% gain on w2 is ~26 dB; cosine stays 1 (pure scaling)
    assert 20 < c.outputs["y"]["sqnr_db"] < 30
    assert c.outputs["y"]["cosine_min"] > 0.9999
    assert all(r["sqnr_db"] == float("inf") for r in c.intermediates)
    assert not rep.passed
    failed = [k["check"] for k in c.checks if not k["passed"]]
    assert failed == ["y: sqnr_db"]
    text = format_report(rep)
    assert "FAIL y: sqnr_db" in text and "perturbed.onnx" in text


def test_feeds_are_checked_before_any_run(mlp_onnx):
    class Boom(Runner):
        kind = "boom"
        input_specs = property(lambda self: None)
        output_names = property(lambda self: ["y"])

        def run(self, feed):
            raise AssertionError("must not run")

    bad = [{"x": np.zeros((2, 4), np.float32)}, {"x": np.zeros((2, 5), np.float32)}]
    with pytest.raises(InputError, match="feed 1.*axis 1 must be 4"):
        edgeq.validate(mlp_onnx, Boom("boom"), bad, progress=False)
    with pytest.raises(InputError, match="dtype float64"):
        edgeq.validate(mlp_onnx, mlp_onnx, [{"x": np.zeros((2, 4))}], progress=False)
    with pytest.raises(InputError, match="missing x"):
        edgeq.validate(mlp_onnx, mlp_onnx, [{"z": np.zeros((2, 4), np.float32)}], progress=False)


def test_npz_folder_and_file_sources(tmp_path, mlp_onnx, mlp_feeds):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, f in enumerate(mlp_feeds):
        np.savez(folder / f"{i:02d}.npz", **f)
    rep = edgeq.validate(mlp_onnx, mlp_onnx, str(folder), progress=False)
    assert rep.data["feeds"] == 4
    rep1 = edgeq.validate(mlp_onnx, mlp_onnx, str(folder / "00.npz"), progress=False)
    assert rep1.data["feeds"] == 1
    np.savez(folder / "99.npz", x=np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="99.npz.*axis 1 must be 4"):
        edgeq.validate(mlp_onnx, mlp_onnx, str(folder), progress=False)
    (folder / "98.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="98.npz"):
        edgeq.validate(mlp_onnx, mlp_onnx, str(folder), progress=False)


def test_missing_and_corrupt_candidate(tmp_path, mlp_onnx, mlp_feeds):
    with pytest.raises(InputError, match="not found"):
        edgeq.validate(tmp_path / "nope.onnx", mlp_onnx, mlp_feeds, progress=False)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02 junk")
    with pytest.raises(InputError, match="bad.onnx"):
        edgeq.validate(bad, mlp_onnx, mlp_feeds, progress=False)
    other = tmp_path / "model.xyz"
    other.write_text("?")
    with pytest.raises(InputError, match="no runner for 'model.xyz'"):
        edgeq.validate(other, mlp_onnx, mlp_feeds, progress=False)


def test_runner_registry_plugs_in_a_new_format(tmp_path, mlp_onnx, mlp_feeds):
    """A target adds a package format without touching validate: here a fake '.double' runner."""

    class DoubleRunner(Runner):
        kind = "double"

        def __init__(self, path):
            super().__init__(path.name)
            self.inner = open_runner(mlp_onnx)

        input_specs = property(lambda self: self.inner.input_specs)
        output_names = property(lambda self: self.inner.output_names)

        def run(self, feed):
            return {k: 2 * v for k, v in self.inner.run(feed).items()}

    register_runner(".double", DoubleRunner)
    pkg = tmp_path / "model.double"
    pkg.write_text("fake package")
    rep = edgeq.validate(str(pkg), mlp_onnx, mlp_feeds, progress=False)
    (c,) = rep.candidates
    assert c.runner["kind"] == "double"
    assert c.outputs["y"]["sqnr_db"] == pytest.approx(0.0, abs=1e-9)  # error == signal
    assert c.outputs["y"]["cosine_min"] == pytest.approx(1.0)


def test_json_output_is_strict_json(tmp_path, mlp_onnx, mlp_feeds):
    from edgeq.validate.report import write_json

    rep = edgeq.validate(mlp_onnx, mlp_onnx, mlp_feeds, progress=False)
    path = write_json(rep.as_dict(), tmp_path / "r.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["candidates"][0]["outputs"]["y"]["sqnr_db"] == "inf"
    assert data["passed"] is True
