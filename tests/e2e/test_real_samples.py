"""End-to-end on the real pretrained samples: export with the CLI, validate against torch.

Marked e2e (they take about a minute together); they run in CI.
"""

import json

import pytest

from edgeq.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _cli(capsys, *argv):
    code = main(list(argv))
    o, e = capsys.readouterr()
    assert code == 0, e
    return o


def test_minilm_export_and_validate_at_several_sequence_lengths(out, capsys):
    onnx_path = out / "minilm.onnx"
    text = _cli(capsys, "export", "minilm", "-o", str(onnx_path))
    assert "dynamo exporter" in text
    # default evaluation set: batches padded to their longest sentence (many lengths) ...
    report = out / "minilm.json"
    _cli(capsys, "validate", str(onnx_path), "-r", "minilm", "--min-sqnr", "60", "--min-cosine", "0.9999",
         "--json", str(report), "--no-intermediates")
    data = json.loads(report.read_text())
    shapes = data["data"]["input_shapes"]["input_ids"]
    assert len({s[1] for s in shapes}) >= 5, shapes
    cand = data["candidates"][0]
    assert cand["outputs"]["embeddings"]["sqnr_db"] >= 60
    assert cand["task"]["nn_agreement"] == 1.0 and cand["task"]["samples"] == 200
    # ... and two fixed sequence lengths
    for pad in (16, 64):
        path = out / f"minilm_pad{pad}.json"
        _cli(capsys, "validate", str(onnx_path), "-r", "minilm", "--data", f"minilm:pad={pad}", "--min-sqnr", "60",
             "--json", str(path), "--no-intermediates")
        data = json.loads(path.read_text())
        assert data["data"]["input_shapes"]["input_ids"] == [[8, pad]]
        assert data["passed"]


def test_efficientnet_lite0_export_and_validate(out, capsys):
    onnx_path = out / "efficientnet_lite0.onnx"
    _cli(capsys, "export", "efficientnet_lite0", "-o", str(onnx_path))
    report = out / "effnet.json"
    text = _cli(capsys, "validate", str(onnx_path), "-r", "efficientnet_lite0", "--min-sqnr", "60",
                "--min-top1-agreement", "1.0", "--json", str(report))
    assert "result: PASS" in text
    data = json.loads(report.read_text())
    cand = data["candidates"][0]
    assert cand["task"]["samples"] == 96 and cand["task"]["top5_overlap"] == 1.0


def test_onnx_vs_onnx_reports_intermediates_on_a_real_model(out, capsys):
    onnx_path = out / "efficientnet_lite0.onnx"
    if not onnx_path.exists():
        _cli(capsys, "export", "efficientnet_lite0", "-o", str(onnx_path))
    report = out / "self.json"
    _cli(capsys, "validate", str(onnx_path), "-r", str(onnx_path), "--data", "efficientnet_lite0:crops=2",
         "--json", str(report))
    data = json.loads(report.read_text())
    inter = data["candidates"][0]["intermediates"]
    assert len(inter) > 50 and all(r["sqnr_db"] == "inf" for r in inter)
