"""Reproducible .mlpackage bytes: two builds of the same QDQ ONNX, in two processes, give the same
files (only manifest.json's VOLATILE_KEYS differ), and the package still loads and runs."""

import json
import os
import subprocess
import sys
import uuid

import onnx
from coreml_models import cnn_feeds, ort_run, tiny_cnn

from edgeq import api
from edgeq.validate.metrics import sqnr_db
from targets.base import VOLATILE_KEYS
from targets.coreml.build import CONVERSION_DATE_KEY
from targets.coreml.executor import load_program
from targets.coreml.runner import MLPackageRunner


def _env(**extra):
    return {**{k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}, **extra}


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_in_two_processes_are_byte_identical_and_load_back(tmp_path):
    # W8A8 (activation quantize/dequantize, int32 biases) with a flexible batch axis: every
    # metadata map is full; the second build runs in another process (its own hash seed)
    qdq = tmp_path / "cnn.w8a8.onnx"
    api.quantize(tiny_cnn(tmp_path / "cnn.onnx"), qdq, "w8a8", profile="ios18", calib=cnn_feeds())
    a = api.package(qdq, "ios18", tmp_path / "a")
    subprocess.run([sys.executable, "-m", "edgeq", "package", str(qdq), "--target", "ios18", "-o", str(tmp_path / "b")],
                   check=True, capture_output=True, env=_env(PYTHONHASHSEED="12345"))
    fa, fb = _files(a.path), _files(tmp_path / "b")
    assert sorted(fa) == sorted(fb) and "cnn.mlpackage/Manifest.json" in fa
    assert [f for f in fa if f != "manifest.json" and fa[f] != fb[f]] == []
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    for key in VOLATILE_KEYS:
        ma.pop(key), mb.pop(key)
    assert ma == mb

    # Manifest.json: uuid5 identifiers, the root one that of model.mlmodel
    pkg = json.loads(fa["cnn.mlpackage/Manifest.json"])
    items = pkg["itemInfoEntries"]
    assert {uuid.UUID(k).version for k in items} == {5} and len(items) == 2
    assert items[pkg["rootModelIdentifier"]]["path"] == "com.apple.CoreML/model.mlmodel"
    # no build date in the model (the date is manifest.json's "created")
    _, spec = load_program(a.model_file)
    meta = dict(spec.description.metadata.userDefined)
    assert CONVERSION_DATE_KEY not in meta and meta["edgeq.deployment_target"] == "iOS18"
    # what the milproto loader reads back runs in the reference executor, as the QDQ ONNX does
    feed = cnn_feeds(1, seed=7)[0]
    assert sqnr_db(ort_run(onnx.load(str(qdq)), feed)[0], MLPackageRunner(a.model_file).run(feed)["y"]) >= 45


def test_source_date_epoch_sets_the_conversion_date(tmp_path, monkeypatch):
    qdq = tmp_path / "cnn.w8a16.onnx"
    api.quantize(tiny_cnn(tmp_path / "cnn.onnx"), qdq, "w8a16", profile="ios17")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    res = api.package(qdq, "ios17", tmp_path / "pkg")
    _, spec = load_program(res.model_file)
    assert dict(spec.description.metadata.userDefined)[CONVERSION_DATE_KEY] == "2023-11-14"
