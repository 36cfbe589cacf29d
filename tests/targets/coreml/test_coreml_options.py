"""Target options (compute precision, shapes): validated by the target, passed through by
`edgeq package --compute/--shape`, rejected clearly by a target that takes none."""

import json

import numpy as np
import onnx
import pytest
from coreml_models import rng_array

from edgeq.cli import main
from edgeq.errors import InputError
from targets.coreml import IOS17Target, IOS18Target
from targets.coreml.runner import MLPackageRunner

SEQ_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, sequence, 8] x) => (float[batch, sequence, 2, 4] y)
{
    s = Shape <end = 2> (x)
    tail = Constant <value = int64[2] {2, 4}> ()
    shp = Concat <axis = 0> (s, tail)
    r = Reshape (x, shp)
    y = Mul (r, r)
}
"""


@pytest.fixture
def seq_onnx(tmp_path):
    path = tmp_path / "seq.onnx"
    onnx.save(onnx.parser.parse_model(SEQ_TEXT), str(path))
    return path


def test_options_are_validated_by_the_target_with_clear_errors():
    with pytest.raises(InputError, match=r"target ios18 has no option 'precision'") as e:
        IOS18Target(precision="fp32")
    assert "compute (fp16 | fp32)" in e.value.hint
    with pytest.raises(InputError, match="unknown compute precision 'bf16' for target ios17"):
        IOS17Target(compute="bf16")
    for bad in (0, (4, 2), (1, 2, 3), "128", True):
        with pytest.raises(InputError, match="shape for axis 'sequence'"):
            IOS18Target(shapes={"sequence": bad})
    t = IOS18Target(shapes={"batch": np.int64(1), "sequence": (8, 8)})
    assert t.shapes == {"batch": 1, "sequence": 8}  # a one-size range is a fixed size
    c = t.configure(compute="fp32")
    assert (type(c), c.compute, c.shapes) == (IOS18Target, "fp32", t.shapes) and t.compute == "fp16"


def test_an_axis_the_model_does_not_have_fails_in_preflight_and_writes_nothing(seq_onnx, tmp_path):
    with pytest.raises(InputError, match="no dynamic axis 'seq'") as e:
        IOS18Target(shapes={"seq": 4}).package(seq_onnx, tmp_path / "pkg")
    assert "batch, sequence" in e.value.hint
    assert not (tmp_path / "pkg").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]


def test_cli_passes_compute_and_shapes_to_the_coreml_target(seq_onnx, tmp_path, capsys):
    out, report = tmp_path / "pkg", tmp_path / "pkg.json"
    argv = ["package", str(seq_onnx), "--target", "ios18", "-o", str(out), "--compute", "fp32",
            "--shape", "batch=2", "--shape", "sequence=1:16", "--json", str(report)]
    assert main(argv) == 0
    assert "compute fp32; flexible axes: sequence 1..16" in capsys.readouterr().out
    manifest = json.loads(report.read_text())["manifest"]
    assert manifest["options"] == {"compute": "fp32", "shapes": {"batch": 2, "sequence": [1, 16]}}
    assert manifest["flexible_axes"] == {"sequence": [1, 16]} and manifest["compute_precision"] == "fp32"
    runner = MLPackageRunner(out / "seq.mlpackage")
    assert [str(s) for s in runner.input_specs] == ["x:float32[2,sequence,8]"]
    x = rng_array((2, 5, 8), 3)
    np.testing.assert_array_equal(runner.run({"x": x})["y"], np.square(x.reshape(2, 5, 2, 4)))
    with pytest.raises(InputError, match="outside the package's range 1..16"):
        runner.run({"x": rng_array((2, 17, 8), 3)})


@pytest.mark.parametrize("argv,message", [
    (["--target", "android", "--compute", "fp32"], "target android takes no packaging options (got --compute)"),
    (["--target", "android", "--shape", "batch=1"], "target android takes no packaging options (got --shape)"),
    (["--target", "ios18", "--shape", "sequence"], "--shape 'sequence' is not NAME=SIZE or NAME=LOWER:UPPER"),
    (["--target", "ios18", "--shape", "sequence=1:x"], "is not NAME=SIZE or NAME=LOWER:UPPER"),
    (["--target", "ios18", "--shape", "batch=1", "--shape", "batch=2"], "--shape gives axis 'batch' twice"),
    (["--target", "ios18", "--shape", "sequence=9:3"], "0 < lower <= upper, got (9, 3)"),
    (["--target", "ios17", "--compute", "int8"], "unknown compute precision 'int8' for target ios17"),
])
def test_cli_option_errors_name_the_flag_and_write_nothing(seq_onnx, tmp_path, capsys, argv, message):
    assert main(["package", str(seq_onnx), "-o", str(tmp_path / "pkg"), *argv]) != 0
    assert message in "".join(capsys.readouterr())
    assert not (tmp_path / "pkg").exists()


def test_api_package_applies_options_through_the_targets_configure(seq_onnx, tmp_path):
    from edgeq import api

    target = IOS18Target()
    res = api.package(seq_onnx, target, tmp_path / "pkg", options={"compute": "fp32", "shapes": {"batch": 2}})
    assert res.manifest["options"] == {"compute": "fp32", "shapes": {"batch": 2}}
    assert res.manifest["compute_precision"] == "fp32" and res.manifest["flexible_axes"] == {"sequence": [1, 1024]}
    assert target.compute == "fp16" and target.shapes == {}  # configure made a copy
    assert api.package(seq_onnx, "ios17", tmp_path / "empty", options={}).manifest["options"]["compute"] == "fp16"
    with pytest.raises(InputError, match="target ios18 has no option 'precision'"):
        api.package(seq_onnx, "ios18", tmp_path / "bad", options={"precision": "fp32"})
    with pytest.raises(InputError, match="options must map option names to values"):
        api.package(seq_onnx, "ios18", tmp_path / "bad", options=[("compute", "fp32")])
    assert not (tmp_path / "bad").exists()


def test_a_target_without_options_rejects_any_by_default(seq_onnx, tmp_path):
    from edgeq import api, plugins
    from targets.base import Target

    android = plugins.load_target("android")
    assert type(android).configure is Target.configure and android.configure() is android
    with pytest.raises(InputError, match=r"target android takes no packaging options \(got --compute, 'level'\)") as e:
        api.package(seq_onnx, "android", tmp_path / "pkg", options={"compute": "fp32", "level": 3})
    assert "drop --compute, 'level' for android" in e.value.hint
    assert not (tmp_path / "pkg").exists()
