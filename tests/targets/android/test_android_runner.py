"""The .ort runner, and `edgeq validate` on a package folder."""

import json

import numpy as np
import pytest

from edgeq import api
from edgeq.errors import InputError
from edgeq.validate import open_runner
from targets.android import OrtFormatRunner


@pytest.fixture(scope="module")
def pkg(tiny, tmp_path_factory):
    return api.package(tiny["mlp.w4a16"], "android", tmp_path_factory.mktemp("runner") / "pkg")


def test_open_runner_takes_an_ort_file_and_a_package_folder(pkg):
    for target in (pkg.model_file, pkg.path, str(pkg.path)):
        r = open_runner(target)
        assert isinstance(r, OrtFormatRunner) and r.label == "pkg/model.ort"
    r = open_runner(pkg.model_file)
    assert [str(s) for s in r.input_specs] == ["x:float32[batch,64]"] and r.output_names == ["y"]
    out = r.run({"x": np.ones((2, 64), np.float32)})
    assert out["y"].shape == (2, 32) and out["y"].dtype == np.float32


def test_folder_without_manifest(tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        open_runner(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="model file name"):
        open_runner(tmp_path)


def test_not_an_ort_file(tmp_path):
    bad = tmp_path / "model.ort"
    bad.write_bytes(b"not flatbuffers")
    with pytest.raises(InputError, match="ORT format"):
        open_runner(bad)


def test_validate_a_package_against_its_qdq_model_and_the_float_model(pkg, tiny, tmp_path):
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(3)]
    report = api.validate([pkg.path], tiny["mlp.w4a16"], feeds, progress=False)
    assert report.candidates[0].outputs["y"]["sqnr_db"] == float("inf")  # the same graph, the same kernels
    vs_float = api.validate([pkg.path, tiny["mlp.w4a16"]], tiny["mlp.float"], feeds, progress=False)
    a, b = (c.outputs["y"] for c in vs_float.candidates)
    assert a["sqnr_db"] == b["sqnr_db"] and a["cosine_mean"] == b["cosine_mean"]
    assert json.dumps(vs_float.as_dict())  # the report serializes with a .ort candidate
