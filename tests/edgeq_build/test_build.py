"""`edgeq build` on tiny models: the flow, the summary, atomicity under Ctrl-C, reproducibility.

tiny_cnn (classifier, 8 calibration and 8 evaluation batches) for Android and iOS 18 in W8A8:
about 5 s per build. Thresholds are the recipe defaults (w8a8: SQNR >= 15 dB, mean cosine >= 0.99
(the cosine of a 15 dB error) and top-1 agreement >= 0.9 for a classifier); tiny_cnn measures cosine 1.0000, SQNR ~52 dB.
"""

import json

import pytest

from edgeq.pipeline import build as build_mod
from edgeq.cli import main
from edgeq.errors import InputError
from edgeq.validate import Thresholds

TARGETS = ("android", "ios18")


def _build(out, **kw):
    kw.setdefault("targets", TARGETS)
    kw.setdefault("latency", False)
    kw.setdefault("progress", False)
    return build_mod.build(kw.pop("model", "tiny_cnn"), output=out, say=lambda s: None, **kw)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_build_writes_packages_qdq_models_and_reports(built):
    out = built.path
    names = sorted(p.name for p in out.iterdir())
    assert names == ["android", "build.json", "ios18", "report.html", "tiny_cnn.onnx",
                     "tiny_cnn.w8a8.android.onnx", "tiny_cnn.w8a8.ios18.onnx"]
    assert (out / "android" / "model.ort").is_file() and (out / "android" / "manifest.json").is_file()
    assert (out / "ios18" / "tiny_cnn.mlpackage").is_dir() and (out / "ios18" / "manifest.json").is_file()
    data = json.loads((out / "build.json").read_text())
    assert data["passed"] is True and built.passed
    assert data["thresholds"] == {"min_sqnr_db": 15.0, "min_cosine": 0.99, "min_top1_agreement": 0.9}
    assert all(q["coverage"] == {"quantized": 5, "quantizable": 5} for q in data["qdq"])
    assert {s["status"] for s in data["stages"]} == {"ok"} and len(data["stages"]) == 7
    rows = {r["model"]: r for r in data["summary"]}
    assert set(rows) == {"tiny_cnn.w8a8.android.onnx", "tiny_cnn.w8a8.ios18.onnx", "android/model.ort",
                         "ios18/tiny_cnn.mlpackage"}
    for r in rows.values():
        assert r["passed"] and r["cosine_mean"] >= 0.99 and r["task"]["top1_agreement"] >= 0.9
        assert r["sqnr_db"] >= 35  # measured ~52 dB
    # the packages compute what their QDQ ONNX computes (same integers, same runtime for Android)
    assert rows["android/model.ort"]["sqnr_db"] == pytest.approx(rows["tiny_cnn.w8a8.android.onnx"]["sqnr_db"], abs=0.1)
    # per-layer SQNR for the QDQ ONNX candidates, none for the package runners
    cands = {c["model"]["label"]: c for c in data["validation"]["candidates"]}
    assert len(cands["tiny_cnn.w8a8.android.onnx"]["intermediates"]) >= 5
    assert cands["android/model.ort"]["intermediates"] == []
    # each target's QDQ model was planned with its own profile
    assert {q["profile"] for q in data["qdq"]} == {"android", "ios18"}
    assert all(q["summary"]["weights"] == {"int8": 5} for q in data["qdq"])
    assert set(data["latency"]["models"]) == {"tiny_cnn.onnx", "tiny_cnn.w8a8.android.onnx",
                                              "tiny_cnn.w8a8.ios18.onnx", "android/model.ort"}
    manifest = json.loads((out / "android/manifest.json").read_text())
    assert data["hashes"]["android/model.ort"] == manifest["files"]["model.ort"]
    assert data["versions"]["onnxruntime"] and data["versions"]["edgeq"]
    assert _leftovers(out.parent) == []


def test_summary_table_names_every_model(built):
    text = build_mod.format_summary(built)
    for name in ("tiny_cnn.w8a8.android.onnx", "android/model.ort", "ios18/tiny_cnn.mlpackage"):
        assert name in text
    assert text.rstrip().endswith("PASS")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("again") / "dist")


def test_same_inputs_give_byte_identical_android_package_and_qdq_models(built, rebuilt):
    first, second = built.data, rebuilt.data
    for key in ("android/model.ort", "android/model.onnx", "android/required_operators.config",
                "tiny_cnn.w8a8.android.onnx", "tiny_cnn.w8a8.ios18.onnx", "tiny_cnn.onnx"):
        assert first["hashes"][key] == second["hashes"][key], key


def test_same_inputs_give_byte_identical_ios_package(built, rebuilt):
    first, second = built.data, rebuilt.data
    ml = sorted(k for k in first["hashes"] if k.startswith("ios18/tiny_cnn.mlpackage/"))
    assert ml
    assert [k for k in ml if first["hashes"][k] != second["hashes"][k]] == []


@pytest.mark.parametrize("where", ["calibration", "packaging"])
def test_interrupt_leaves_nothing(tmp_path, monkeypatch, where):
    def boom(*a, **k):
        raise KeyboardInterrupt

    if where == "calibration":
        monkeypatch.setattr("edgeq.pipeline.quantize.calibrate", boom)
    else:
        monkeypatch.setattr("targets.coreml.target.CoreMLTarget.build", boom)
    out = tmp_path / "dist"
    with pytest.raises(KeyboardInterrupt):
        _build(out)
    assert list(tmp_path.iterdir()) == []
    # through the CLI: exit 130, and an existing output (with --force) is left as it was
    out.mkdir()
    (out / "keep.txt").write_text("old build")
    assert main(["build", "tiny_cnn", "-o", str(out), "--force", "--no-latency", "--no-progress"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_existing_output_needs_force_and_bad_targets_fail_first(tmp_path, monkeypatch):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(InputError, match="already exists"):
        _build(out)
    monkeypatch.chdir(out)
    for here in (".", ".."):  # never move the folder the user stands in
        with pytest.raises(InputError, match="current folder"):
            _build(here, force=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="unknown target 'nokia'"):
        _build(tmp_path / "other", targets=("android", "nokia"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]


def test_onnx_input_starts_at_quantize_and_replaces_with_force(built, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "stale.txt").write_text("")
    res = _build(out, model=built.path / "tiny_cnn.onnx", targets=("android",), calib="tiny_cnn", data="tiny_cnn",
                 force=True)
    assert res.data["model"]["kind"] == "onnx" and res.passed
    assert sorted(p.name for p in out.iterdir()) == ["android", "build.json", "report.html", "tiny_cnn.onnx",
                                                     "tiny_cnn.w8a8.android.onnx"]
    # same float model and data: the same Android package as the full build
    assert res.data["hashes"]["android/model.ort"] == built.data["hashes"]["android/model.ort"]
    with pytest.raises(InputError, match="needs calibration data"):
        _build(tmp_path / "x", model=built.path / "tiny_cnn.onnx", targets=("android",), data="tiny_cnn")


def test_cli_build_prints_summary_and_gates_exit_1(tmp_path, capfd):
    out = tmp_path / "dist"
    argv = ["build", "tiny_cnn", "--targets", "android,ios18", "-o", str(out), "--no-latency", "--no-progress"]
    assert main(argv) == 0
    text, err = capfd.readouterr()
    assert "[1/6] export" in text and "android/model.ort" in text and "ios18/tiny_cnn.mlpackage" in text
    assert text.rstrip().endswith("PASS")
    # third-party noise (exporter, coremltools progress bars, ONNX Runtime warnings) stays quiet
    assert err == ""
    # an impossible gate: the build is complete (report to look at) but exits 1
    assert main([*argv, "--force", "--min-sqnr", "200"]) == 1
    err = capfd.readouterr().err
    assert "validation failed" in err and "sqnr_db" in err and (out / "report.html").is_file()
    assert "which quantized activations cost it" in err  # W8A8: the failed row's note says where the error is
    assert json.loads((out / "build.json").read_text())["passed"] is False


def test_thresholds_merge_with_recipe_defaults():
    th = build_mod._merge(build_mod.default_thresholds("w8a8", "classification"), Thresholds(min_sqnr_db=20))
    assert th == Thresholds(min_sqnr_db=20, min_cosine=0.99, min_top1_agreement=0.9)
    assert build_mod.default_thresholds("w4a16-b32", "embedding") == Thresholds(min_sqnr_db=10.0, min_cosine=0.98)
    assert build_mod.default_thresholds("w8a16", "generic") == Thresholds(min_sqnr_db=25.0, min_cosine=0.9984)
    assert build_mod.default_thresholds("w8a16", "classification", per_position=True) == Thresholds(
        min_sqnr_db=25.0, min_cosine=0.9984, min_top1_agreement=0.9, min_top1_per_position=0.98)


def test_doctor_lists_versions_targets_and_coreml(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for word in ("edgeq", "onnxruntime", "torch", "coremltools", "android", "ios18", "Core ML predict"):
        assert word in text


def test_pytorch_factory_needs_input_specs_then_builds(tmp_path):
    with pytest.raises(InputError, match="no input specs"):
        _build(tmp_path / "a", model="samples.tiny:TinyCNN", targets=("android",), calib="tiny_cnn", data="tiny_cnn")
    res = _build(tmp_path / "b", model="samples.tiny:TinyCNN", targets=("android",), calib="tiny_cnn",
                 data="tiny_cnn", inputs=["image:float32[batch,3,32,32]"],
                 thresholds=Thresholds(min_cosine=0.9))  # random weights, unseeded BN: a looser gate
    assert res.data["model"]["kind"] == "pytorch" and res.data["model"]["file"] == "TinyCNN.onnx"
    assert (res.path / "android" / "model.ort").is_file()


def test_doctor_says_how_to_install_what_is_missing(monkeypatch):
    from edgeq import doctor

    monkeypatch.setattr(doctor, "_installed", lambda name: name != "coremltools")
    lines, missing = doctor.report()
    assert "coremltools (for the iOS targets ios17 / ios18 (.mlpackage)): pip install 'edgeq[ios]'" in missing
    assert "missing:" in lines and not any("torch" in m for m in missing)


def test_a_failed_target_keeps_what_worked(tmp_path, monkeypatch, capfd):
    from edgeq.errors import UnsupportedError

    def no_lowering(*a, **k):
        raise UnsupportedError("node 'x' (Fancy): no Core ML lowering", hint="use --targets android")

    monkeypatch.setattr("targets.coreml.target.CoreMLTarget.build", no_lowering)
    res = _build(tmp_path / "dist")
    status = {(s.name, s.what.split(" ")[0]): s.status for s in res.stages}
    assert status[("package", "ios18")] == "failed" and status[("package", "android")] == "ok"
    assert res.exit_code == 2 and not res.passed
    assert (res.path / "android" / "model.ort").is_file() and not (res.path / "ios18").exists()
    data = json.loads((res.path / "build.json").read_text())
    assert [c["model"]["label"] for c in data["validation"]["candidates"]][-1] == "android/model.ort"
    assert "no Core ML lowering" in build_mod.format_summary(res)
    # the CLI: the summary, then exit 2 with the failed stage on the last line
    assert main(["build", "tiny_cnn", "-o", str(tmp_path / "cli"), "--no-latency", "--no-progress"]) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "package (ios18" in last and "no Core ML lowering" in last


def test_a_late_internal_error_keeps_the_validation(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("timer broke")

    import importlib

    monkeypatch.setattr(importlib.import_module("edgeq.validate.latency"), "host_latency", broken)
    res = _build(tmp_path / "dist", latency=True, targets=("android",))
    assert res.exit_code == 3 and res.failed_stages[0].name == "latency"
    assert "internal error: RuntimeError: timer broke" in res.failed_stages[0].message
    data = json.loads((res.path / "build.json").read_text())
    assert data["validation"]["passed"] and (res.path / "report.html").is_file()


def test_missing_parent_folders_of_the_output_are_created(tmp_path):
    res = _build(tmp_path / "a" / "b" / "dist", targets=("android",))
    assert (res.path / "android" / "model.ort").is_file()


SCORES = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, 4] x) => (float[batch, {n}] y) <float[4, {n}] w = {{{vals}}}>
{{
    y = MatMul(x, w)
}}
"""


def _onnx_and_data(tmp_path, outputs: int):
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    vals = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4 * outputs))
    model = tmp_path / f"m{outputs}.onnx"
    onnx.save(onnx.parser.parse_model(SCORES.format(n=outputs, vals=vals)), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((16, 4)).astype(np.float32))
    return model, data


def test_a_classifier_is_detected_and_gets_a_top1_gate(tmp_path):
    model, data = _onnx_and_data(tmp_path, 5)
    res = _build(tmp_path / "dist", model=model, targets=("android",), recipe="w8a16", data=data)
    assert res.data["model"]["task"] == "classification" and "from MatMul" in res.data["model"]["task_reason"]
    assert res.data["thresholds"]["min_top1_agreement"] == 0.9
    assert all("top1_agreement" in r["task"] for r in res.summary)
    generic = _build(tmp_path / "g", model=model, targets=("android",), recipe="w8a16", data=data, task="generic")
    assert "min_top1_agreement" not in generic.data["thresholds"]


def test_one_value_per_sample_is_judged_by_sqnr_not_cosine(tmp_path):
    model, data = _onnx_and_data(tmp_path, 1)
    res = _build(tmp_path / "dist", model=model, targets=("android",), recipe="w8a16", data=data)
    checks = res.data["validation"]["candidates"][0]["checks"]
    cos = next(c for c in checks if c["check"] == "y: cosine_mean")
    assert cos["value"] is None and "cannot see errors in one value per sample" in cos["note"]
    assert any(c["check"] == "y: sqnr_db" and c["value"] > 25 for c in checks)  # the floor that applies
    # an impossible SQNR floor fails the build whatever the cosine would say
    bad = _build(tmp_path / "bad", model=model, targets=("android",), recipe="w8a16", data=data,
                 thresholds=Thresholds(min_sqnr_db=200))
    assert not bad.passed and bad.exit_code == 1


def test_a_gate_that_cannot_be_evaluated_says_why(tmp_path):
    model, data = _onnx_and_data(tmp_path, 5)
    res = _build(tmp_path / "dist", model=model, targets=("android",), recipe="w8a16", data=data, task="embedding",
                 thresholds=Thresholds(min_top1_agreement=0.95))
    row = res.summary[0]
    assert not row["passed"] and any("not measured: the task is not classification" in f for f in row["failed"])
    assert "top1_agreement (not measured" in build_mod.format_summary(res)
    # asked for a top-1 gate without a task: the output has a classifier's shape, so it is one
    ok = _build(tmp_path / "ok", model=model, targets=("android",), recipe="w8a16", data=data,
                thresholds=Thresholds(min_top1_agreement=0.95))
    assert ok.passed and ok.summary[0]["task"]["top1_agreement"] >= 0.95


CTC = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, 6, 4] x) => (float[batch, 6, 5] y) <float[4, 5] w = {{{vals}}}>
{{
    s = MatMul(x, w)
    y = Softmax<axis = -1>(s)
}}
"""


def test_class_scores_per_position_get_a_position_gate(tmp_path):
    """A CTC-like [batch, positions, classes] Softmax output: detected, top-1 judged per position (0.98)."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    model = tmp_path / "ctc.onnx"
    onnx.save(onnx.parser.parse_model(CTC.format(vals=", ".join(f"{v:.4f}" for v in rng.standard_normal(20)))),
              str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((16, 6, 4)).astype(np.float32))
    res = _build(tmp_path / "dist", model=model, targets=("android",), recipe="w8a16", data=data)
    assert res.data["model"]["task"] == "classification" and "per position" in res.data["model"]["task_reason"]
    assert res.data["thresholds"]["min_top1_per_position"] == 0.98
    check = next(c for c in res.data["validation"]["candidates"][0]["checks"]
                 if c["check"] == "top1_agreement (per position)")
    assert check["threshold"] == 0.98 and check["value"] >= 0.98 and res.passed
    assert res.summary[0]["task"]["samples"] == 16 * 6
    assert " top-1 per position " in build_mod.format_summary(res)
    assert "top1 agreement per position" in res.report.read_text()
    # the caller's top-1 gate replaces the position default
    given = _build(tmp_path / "given", model=model, targets=("android",), recipe="w8a16", data=data,
                   thresholds=Thresholds(min_top1_agreement=0.5))
    assert given.data["thresholds"]["min_top1_per_position"] == 0.5


def test_a_factory_is_exported_at_the_sizes_of_the_first_calibration_feed():
    # MTCNN's P-Net (image:float32[batch,3,height,width]) failed its export at the default size 2
    import numpy as np

    from edgeq.pipeline.build_stages import _axis_sizes

    spec = ["image:float32[batch,3,height,width]"]
    feeds = [{"image": np.zeros((4, 3, 40, 56), np.float32)}, {"image": np.zeros((1, 3, 9, 9), np.float32)}]
    assert _axis_sizes(feeds, spec) == {"batch": 4, "height": 40, "width": 56}
    assert _axis_sizes(None, spec) is None and _axis_sizes(feeds, ["x:float32[batch,8]"]) is None
    once = iter(feeds)  # a one-shot iterator (API callers): not read here, its feeds belong to the calibration
    assert _axis_sizes(once, spec) is None and len(list(once)) == 2
