"""End-to-end on the real pretrained samples: export with the CLI, validate against torch.

Marked e2e (they take about a minute together); they run in CI.
"""

import json

import onnx
import pytest
from helpers import cli

pytestmark = pytest.mark.e2e


def test_minilm_export_and_validate_at_several_sequence_lengths(minilm_onnx, e2e_dir, capsys):
    dims = [d.dim_param for d in onnx.load(str(minilm_onnx), load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    # default evaluation set: batches padded to their longest sentence (many lengths) ...
    report = e2e_dir / "minilm.json"
    cli(capsys, "validate", minilm_onnx, "-r", "minilm", "--min-sqnr", "60", "--min-cosine", "0.9999",
        "--json", report, "--no-intermediates")
    data = json.loads(report.read_text())
    shapes = data["data"]["input_shapes"]["input_ids"]
    assert len({s[1] for s in shapes}) >= 5, shapes
    cand = data["candidates"][0]
    assert cand["outputs"]["embeddings"]["sqnr_db"] >= 60
    assert cand["task"]["nn_agreement"] == 1.0 and cand["task"]["samples"] == 200
    # ... and two fixed sequence lengths
    for pad in (16, 64):
        path = e2e_dir / f"minilm_pad{pad}.json"
        cli(capsys, "validate", minilm_onnx, "-r", "minilm", "--data", f"minilm:pad={pad}", "--min-sqnr", "60",
            "--json", path, "--no-intermediates")
        data = json.loads(path.read_text())
        assert data["data"]["input_shapes"]["input_ids"] == [[8, pad]]
        assert data["passed"]


def test_efficientnet_lite0_export_and_validate(effnet_onnx, e2e_dir, capsys):
    report = e2e_dir / "effnet.json"
    text = cli(capsys, "validate", effnet_onnx, "-r", "efficientnet_lite0", "--min-sqnr", "60",
               "--min-top1-agreement", "1.0", "--json", report)
    assert "result: PASS" in text
    cand = json.loads(report.read_text())["candidates"][0]
    assert cand["task"]["samples"] == 96 and cand["task"]["top5_overlap"] == 1.0


def test_onnx_vs_onnx_reports_intermediates_on_a_real_model(effnet_onnx, e2e_dir, capsys):
    report = e2e_dir / "self.json"
    cli(capsys, "validate", effnet_onnx, "-r", effnet_onnx, "--data", "efficientnet_lite0:crops=2", "--json", report)
    inter = json.loads(report.read_text())["candidates"][0]["intermediates"]
    assert len(inter) > 50 and all(r["sqnr_db"] == "inf" for r in inter)
