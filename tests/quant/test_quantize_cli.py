"""`edgeq quantize` on a tiny model: plan printing, sizes, and the errors a user can hit."""

import json

import onnx

from edgeq.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_explain_and_write(tmp_path, mlp_onnx, capsys):
    code, out, err = _run(capsys, "quantize", mlp_onnx, "--recipe", "w8a16", "--explain")
    assert code == 0, err
    assert "MatMul" in out and "int8" in out and not list(tmp_path.glob("*.qdq.onnx"))
    out_path = tmp_path / "mlp.qdq.onnx"
    code, out, err = _run(capsys, "quantize", mlp_onnx, "--recipe", "w8a16", "-o", out_path, "--json",
                          tmp_path / "q.json")
    assert code == 0, err
    ops = [n.op_type for n in onnx.load(str(out_path)).graph.node]
    assert ops.count("DequantizeLinear") == 2
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["summary"]["weights"] == {"int8": 2} and data["ideal_bytes"] < data["float_bytes"]
    code, out, err = _run(capsys, "validate", out_path, "-r", mlp_onnx, "--data", _feed(tmp_path), "--min-sqnr", "30")
    assert code == 0, err


def _feed(tmp_path):
    import numpy as np

    path = tmp_path / "feed.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    return path


def test_quantize_errors_are_one_line_and_write_nothing(tmp_path, mlp_onnx, capsys):
    out_path = tmp_path / "out.onnx"
    cases = [
        (["--recipe", "w3"], "unknown recipe 'w3'"),
        (["--recipe", "w4a16", "--block", "48"], "block size 48"),
        (["--recipe", "w8a8"], "needs calibration"),
        (["--recipe", "w8a16", "--profile", "nope"], "unknown target profile 'nope'"),
        (["--recipe", str(tmp_path / "missing.toml")], "recipe file not found"),
    ]
    for extra, msg in cases:
        code, _, err = _run(capsys, "quantize", mlp_onnx, "-o", out_path, *extra)
        assert code == 2 and msg in err and "Traceback" not in err, err
        assert not out_path.exists()
    code, _, err = _run(capsys, "quantize", tmp_path / "nope.onnx", "-o", out_path)
    assert code == 2 and "not found" in err
    out_path.write_text("keep")
    code, _, err = _run(capsys, "quantize", mlp_onnx, "-o", out_path)
    assert code == 2 and "already exists" in err and out_path.read_text() == "keep"
    code, _, err = _run(capsys, "quantize", mlp_onnx)
    assert code == 2 and "no output given" in err
