"""The Android package: files, manifest, hashes, reproducible bytes, atomic writes, the CLI/API."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edgeq import api
from edgeq.cli import main
from edgeq.errors import InputError, UnsupportedError
from edgeq.validate.metrics import sqnr_db
from targets.android import AndroidTarget, ortformat
from targets.android.convert import optimize_to_onnx
from targets.base import VOLATILE_KEYS, sha256

FILES = ["README.md", "manifest.json", "model.onnx", "model.ort", "required_operators.config"]
# .ort vs the QDQ ONNX run in ORT: the same graph after the same optimizations (measured: identical)
MIN_SQNR_VS_QDQ_DB = 50.0


@pytest.fixture(scope="module")
def packages(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("android_pkgs")
    return {name: api.package(tiny[name], "android", d / name) for name in ("mlp.w8a16", "mlp.w4a16", "conv.w8a16")}


def run(path, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def feed_for(name):
    rng = np.random.default_rng(7)
    if name.startswith("mlp"):
        return {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    return {"image": rng.standard_normal((2, 32, 8, 8)).astype(np.float32)}


def test_package_files_and_hashes(packages):
    for res in packages.values():
        assert sorted(p.name for p in res.path.iterdir()) == FILES
        m = json.loads((res.path / "manifest.json").read_text())
        assert m["files"] == {f: sha256(res.path / f) for f in FILES if f != "manifest.json"}
        assert m["file_bytes"] == {f: (res.path / f).stat().st_size for f in FILES if f != "manifest.json"}
        assert m["model_file"] == "model.ort" and res.model_file == res.path / "model.ort"
        assert m["target"] == "android" and m["source_sha256"] == sha256(res.path / "model.onnx")


def test_ort_runs_and_matches_the_qdq_model(packages, tiny):
    for name, res in packages.items():
        feed = feed_for(name)
        ref, got = run(tiny[name], feed), run(res.model_file, feed)
        assert sqnr_db(ref, got) >= MIN_SQNR_VS_QDQ_DB, name


def test_int4_matmuls_ship_packed(packages):
    data = packages["mlp.w4a16"].model_file.read_bytes()
    ops = {op for _, _, op in ortformat.node_ops(data)}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    assert ortformat.unstorable_tensors(data) == []


def test_required_operators_lists_exactly_the_ops_of_the_model(packages, tmp_path):
    for name, res in packages.items():
        config = {}
        lines = (res.path / "required_operators.config").read_text().splitlines()
        assert lines[:2] == ["# Generated from model/s:", "# - model.ort"]
        for line in lines[2:]:
            domain, opset, ops = line.split(";")
            for op in ops.split(","):
                config[(domain, op)] = int(opset)
        # independently of the .ort reader: the graph ORT's optimizer makes, saved as ONNX
        optimized = optimize_to_onnx(res.path / "model.onnx", tmp_path / f"{name}.opt.onnx")
        assert set(config) == {(n.domain or "ai.onnx", n.op_type) for n in optimized.graph.node}, name
        # and with the versions the .ort stores
        assert set(config.items()) == {((d, op), v) for d, v, op in ortformat.node_ops(res.model_file.read_bytes())}


def test_manifest_facts(packages, tiny):
    m = packages["mlp.w8a16"].manifest
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
    assert m["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}]
    rt = m["runtime"]
    assert rt["converted_with_onnxruntime"] == ort.__version__ and rt["ort_format_version"] == "6"
    major, minor = ort.__version__.split(".")[:2]
    assert rt["minimum_onnxruntime_version"] == f"{major}.{minor}.0"
    assert m["conversion"]["optimization_style"] == "Fixed" and m["conversion"]["target_platform"] == "arm"
    assert m["quantization"]["recipe"] == "w8a16" and m["quantization"]["summary"]["weights"] == {"int8": 2}
    assert m["calibration_sha256"] is None
    assert m["operators"]["com.microsoft"] == ["MatMulNBits"]
    assert set(m["nnapi_partitions"]) == {"as_is", "with_fixed_shapes"}


def test_calibration_hash_is_carried(tmp_path):
    import android_models as am

    meta = {**am.METADATA, "edgeq.recipe": "w8a8", "edgeq.calibration_sha256": "ab" * 32}
    src = am.qdq_mlp(tmp_path / "m.onnx", metadata=meta)
    m = api.package(src, "android", tmp_path / "pkg").manifest
    assert m["calibration_sha256"] == "ab" * 32 and "calibration_sha256" not in m["quantization"]
    assert "ab" * 32 in (tmp_path / "pkg" / "README.md").read_text()


def test_readme_has_kotlin_for_these_inputs(packages):
    text = (packages["conv.w8a16"].path / "README.md").read_text()
    assert 'OnnxTensor.createTensor(env, FloatBuffer.wrap(image), longArrayOf(batch, 32L, 8L, 8L))' in text
    assert '"image" to imageTensor' in text and 'result.get("logits")' in text
    assert f"onnxruntime-android:{packages['conv.w8a16'].manifest['runtime']['minimum_onnxruntime_version']}" in text


def test_readme_kotlin_for_int64_inputs():
    from targets.android.readme import kotlin

    code = kotlin({"model_file": "model.ort",
                   "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                              {"name": "pixel_mask", "dtype": "uint8", "shape": [1, 4]}],
                   "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["batch", 384]}]})
    assert "fun run(inputIds: LongArray, pixelMask: ByteArray, batch: Long, sequence: Long)" in code
    assert "LongBuffer.wrap(inputIds), longArrayOf(batch, sequence))" in code
    assert "ByteBuffer.wrap(pixelMask), longArrayOf(1L, 4L), OnnxJavaType.UINT8)" in code
    assert "import ai.onnxruntime.OnnxJavaType" in code


def test_two_builds_are_identical_apart_from_the_timestamp(tiny, tmp_path):
    # the second build runs in another process: ORT's hash-map order changes between processes
    a = api.package(tiny["mlp.w4a16"], "android", tmp_path / "a")
    subprocess.run([sys.executable, "-m", "edgeq", "package", str(tiny["mlp.w4a16"]), "--target", "android",
                    "-o", str(tmp_path / "b")], check=True, capture_output=True)
    for f in FILES:
        if f != "manifest.json":
            assert (a.path / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    ma = json.loads((a.path / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for key in VOLATILE_KEYS:
        ma.pop(key), mb.pop(key)
    assert ma == mb


def test_ort_bytes_are_those_of_orts_own_converter(tiny, tmp_path):
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    src = tmp_path / "model.onnx"
    src.write_bytes(tiny["mlp.w4a16"].read_bytes())
    convert_onnx_models_to_ort(src, output_dir=tmp_path / "ort", optimization_styles=[OptimizationStyle.Fixed],
                               target_platform="arm")
    theirs = ortformat.canonicalize((tmp_path / "ort" / "model.ort").read_bytes())
    ours = api.package(src, "android", tmp_path / "pkg").model_file.read_bytes()
    assert ours == theirs


def test_existing_folder_needs_force(tiny, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(InputError, match="--force"):
        api.package(tiny["mlp.w8a16"], "android", out)
    assert (out / "old.txt").exists()
    api.package(tiny["mlp.w8a16"], "android", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_a_failing_build_leaves_nothing(tiny, tmp_path, monkeypatch):
    import targets.android.target as t

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(t, "write_config", boom)
    with pytest.raises(KeyboardInterrupt):
        api.package(tiny["mlp.w8a16"], "android", tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_and_missing_model(tiny, tmp_path):
    with pytest.raises(InputError, match="android"):
        api.package(tiny["mlp.w8a16"], "symbian", tmp_path / "pkg")
    with pytest.raises(InputError, match="not found"):
        api.package(tmp_path / "nope.onnx", "android", tmp_path / "pkg")
    with pytest.raises(UnsupportedError):
        api.package(tiny["conv.w4a16"], AndroidTarget(), tmp_path / "pkg")


def test_cli_package(tiny, tmp_path, capsys):
    out, report = tmp_path / "pkg", tmp_path / "pkg.json"
    assert main(["package", str(tiny["conv.w8a16"]), "--target", "android", "-o", str(out), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "packaged" in text and "model.ort" in text and "onnxruntime-android >= " in text
    data = json.loads(report.read_text())
    assert data["manifest"]["files"]["model.ort"] == sha256(out / "model.ort")
    # a model that cannot run: exit 2, the node named, nothing written
    assert main(["package", str(tiny["conv.w4a16"]), "--target", "android", "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "node 'conv' (Conv)" in err and not (tmp_path / "bad").exists()


def test_package_folder_has_ordinary_permissions(packages):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(packages["mlp.w8a16"].path.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0o700


def test_build_checks_the_written_file(tiny, tmp_path, monkeypatch):
    # if ORT ever leaves a 4-bit tensor in the .ort, the build says which and where (nothing written)
    import targets.android.preflight as pf

    monkeypatch.setattr(pf, "_unpacked_4bit", lambda model, flagged: [])
    with pytest.raises(UnsupportedError, match=r"fc1_w_q.*int4.*fc1 \(MatMul\)"):
        api.package(tiny["mlp.w4a16.relu"], "android", tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_w8a8_qdq_ships_as_qlinear_kernels(act, tmp_path):
    import android_models as am
    from onnx import TensorProto

    src = am.qdq_a8_convnet(tmp_path / "a8.onnx", act_type=getattr(TensorProto, act.upper()))
    res = api.package(src, "android", tmp_path / "pkg")
    assert "QLinearConv" in res.manifest["operators"]["com.microsoft"]
    assert res.manifest["calibration_sha256"] == "0" * 64
    feed = feed_for("conv")
    assert sqnr_db(run(src, feed), run(res.model_file, feed)) >= MIN_SQNR_VS_QDQ_DB


def test_a_model_too_small_for_size_2_axes_is_smoke_run_at_a_size_it_runs(tmp_path):
    # silero-vad pads its audio by 64 samples (reflect), CRAFT downsamples 16x: the made-up feed's
    # dynamic axes of size 2 fail in the source model too, so the converted one runs at the next size
    import onnx
    import onnx.parser

    model = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, samples] x) => (float[batch, padded] y) {
    pads = Constant <value = int64[4] {0, 4, 0, 4}> ()
    p = Pad <mode = "reflect"> (x, pads)
    y = Relu(p)
}
""")
    path = tmp_path / "reflect.onnx"
    onnx.save(model, path)
    res = api.package(path, "android", tmp_path / "pkg")
    first_run = res.manifest["first_run"]
    assert first_run.startswith("passed with dynamic axes of size 16"), first_run
    assert "(Pad)" in first_run  # why size 2 was not enough


def test_an_audio_model_that_needs_a_long_window_is_smoke_run_at_512_samples(tmp_path):
    # silero-vad op15: a reflect Pad of 64 then a 256-tap STFT Conv (stride 128) needs >= 192 samples,
    # more than 128 (and exactly one 512-sample chunk: 1024 fails in its LSTM); the batch axis stays at 2
    # while the window grows (the feed stays small)
    import onnx
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    w = nh.from_array(np.random.default_rng(0).standard_normal((4, 1, 256)).astype(np.float32), "w")
    pads, axis = nh.from_array(np.array([0, 0, 0, 64], np.int64), "pads"), nh.from_array(np.array([1], np.int64), "axis")
    graph = oh.make_graph(
        [oh.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"), oh.make_node("Unsqueeze", ["p", "axis"], ["u"]),
         oh.make_node("Conv", ["u", "w"], ["y"], strides=[128])], "stft",
        [oh.make_tensor_value_info("x", 1, ["batch", "samples"])], [oh.make_tensor_value_info("y", 1, None)], [w, pads, axis])
    path = tmp_path / "stft.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)
    first_run = api.package(path, "android", tmp_path / "pkg").manifest["first_run"]
    assert first_run.startswith("passed with dynamic axes of size 512"), first_run
