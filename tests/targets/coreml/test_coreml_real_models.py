"""Real models as users bring them (ONNX files from package wheels, not exported by edgeq), packaged
for iOS 18 in float and run by the reference executor against ONNX Runtime on the same inputs.

They carry what edgeq's own exports do not: ``If`` nodes and an LSTM (silero-vad), dims named
``?``/``-1``/``p2o.DynamicDimension.0``, Squeeze of a flexible axis, a run-time Reshape with a leading
0, BatchNorm variances of 1e8 (PaddleOCR via paddle2onnx, opsets 11-12), a scalar input and one named
``state``. Skipped when the wheel is not installed (``pip install --no-deps rapidocr-onnxruntime
silero-vad``).

Thresholds (fp16 compute, measured): silero 45.1 / 58.6 dB (probability, state), PP-OCRv4
recognizer 44.3 dB, direction classifier 57.2 dB; floors 40 dB.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from coreml_models import ort_session

from edgeq.validate.metrics import sqnr_db
from targets.coreml import IOS18Target
from targets.coreml.runner import MLPackageRunner

pytestmark = pytest.mark.e2e


def _model(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"pip package {package} is not installed "
                    f"(tools/setup.sh installs it; pip install --no-deps {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _check(path: Path, tmp_path, feed: dict, shapes=None, floor=40.0):
    target = IOS18Target(shapes=shapes)
    res = target.package(path, tmp_path / "pkg")
    runner = MLPackageRunner(res.model_file)
    got = runner.run(feed)
    session = ort_session(path, exact=False)
    for out, want in zip(session.get_outputs(), session.run(None, feed)):
        assert got[out.name].shape == want.shape, out.name
        assert sqnr_db(want, got[out.name]) >= floor, out.name
    return res


def test_silero_vad_if_and_lstm_with_fixed_shapes(tmp_path):
    path = _model("silero_vad", "data", "silero_vad_16k_op15.onnx")
    rng = np.random.default_rng(0)
    feed = {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
            "state": (rng.standard_normal((2, 1, 128)) * 0.1).astype(np.float32), "sr": np.array(16000, np.int64)}
    problems = IOS18Target().preflight(__import__("onnx").load(str(path)))
    assert problems and all("--shape" in p.hint for p in problems if p.op_type == "If")
    res = _check(path, tmp_path, feed, shapes={"batch": 1, "sequence": 512})
    assert res.manifest["mil_ops"]["lstm"] == 1


@pytest.mark.parametrize("name,shape", [("ch_PP-OCRv4_rec_infer.onnx", (2, 3, 48, 160)),
                                        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (2, 3, 48, 192))])
def test_paddleocr_with_flexible_dims(name, shape, tmp_path):
    path = _model("rapidocr_onnxruntime", "models", name)
    _check(path, tmp_path, {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)})
