"""ORT profiles fuse a BERT-like encoder (a tiny random BertModel as torch exports it) on the quantized graph:
SkipLayerNormalization, MultiHeadAttention and BiasGelu, the projections still quantized MatMuls, the same numbers
as the unfused graph; the Core ML profile's model is not fused, and both targets share one calibration."""

import collections

import numpy as np
import onnx
import pytest

from edgeq.passes.fuse_for_ort import FuseForOrtPass
from edgeq.pipeline import quantize as qmod
from edgeq.pipeline.quantize import load_model, quantize_for_profiles
from edgeq.quant.profile import ONNXRUNTIME_CPU
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db

pytestmark = pytest.mark.slow  # a torch export (~10 s)

LAYERS, VOCAB = 2, 96
MIN_SQNR_DB = 60.0  # the fused kernels vs the small ops, both float: ~125 dB measured on MiniLM


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    from edgeq.export.torch_export import export_torch
    from edgeq.specs import TensorSpec

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    specs = [TensorSpec("input_ids", ("batch", "sequence"), "int64", low=0, high=VOCAB),
             TensorSpec("attention_mask", ("batch", "sequence"), "int64", low=1, high=2)]
    export_torch(Encoder(), specs, path, example_inputs=_feeds(1, seed=9)[0])
    return path


def _feeds(n: int, seed: int = 0):
    """Batches of 3 sequences of 7-12 tokens; the last two padded at the end (attention_mask 0)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        seq = 7 + i % 6
        mask = np.ones((3, seq), np.int64)
        mask[1, seq - 2:] = 0
        mask[2, seq - 4:] = 0
        feeds.append({"input_ids": rng.integers(1, VOCAB, (3, seq)).astype(np.int64), "attention_mask": mask})
    return feeds


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _dequantized_matmul_weights(path) -> int:
    graph = onnx.load(str(path)).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in dq)


def _worst_sqnr(ref_path, cand_path, *, optimize: bool) -> float:
    ref, cand = ort_session(str(ref_path), optimize=optimize), ort_session(str(cand_path), optimize=optimize)
    return min(sqnr_db(ref.run(None, f)[0], cand.run(None, f)[0]) for f in _feeds(4, seed=5))


def test_the_float_encoder_fuses_to_the_same_numbers(tiny_bert, tmp_path):
    model = load_model(tiny_bert)
    result = FuseForOrtPass()(model)
    assert result.fused["mha2"] == LAYERS and result.fused["skip_layer_normalization"] == 2 * LAYERS
    assert "Attention" not in result.ops  # the packed-QKV Attention rule would hide the weights from the plan
    from edgeq import onnx_io

    onnx_io.save_ir(model, tmp_path / "fused.onnx")
    ops = _ops(tmp_path / "fused.onnx")
    assert ops["MultiHeadAttention"] == LAYERS and ops["BiasGelu"] == LAYERS and "Softmax" not in ops
    assert ops["MatMul"] == 6 * LAYERS  # query, key, value, output and two FFN projections per layer
    assert _worst_sqnr(tiny_bert, tmp_path / "fused.onnx", optimize=True) >= MIN_SQNR_DB


def test_android_fuses_the_quantized_encoder_core_ml_does_not_and_one_calibration_serves_both(
        tiny_bert, tmp_path, monkeypatch):
    from targets.android.profile import ANDROID
    from targets.coreml.profile import IOS18

    calls = []
    real = qmod.calibrate
    monkeypatch.setattr(qmod, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ort_path, ios_path = tmp_path / "ort.onnx", tmp_path / "ios.onnx"
    res = quantize_for_profiles(tiny_bert, [(ANDROID, ort_path), (IOS18, ios_path)], "w4a16",
                                calib=_feeds(6), progress=False)
    assert len(calls) == 1  # the fusion comes after the plan: both profiles calibrated the same graph
    fused, plain = _ops(ort_path), _ops(ios_path)
    assert fused["MultiHeadAttention"] == LAYERS and fused["SkipLayerNormalization"] == 2 * LAYERS
    assert not {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"} & set(plain)
    # every projection still reads its int4 weight through a DequantizeLinear (ORT makes MatMulNBits of it)
    assert fused["MatMul"] == 6 * LAYERS and plain["MatMul"] == 8 * LAYERS  # + q·kᵀ and attention·v unfused
    assert _dequantized_matmul_weights(ort_path) == _dequantized_matmul_weights(ios_path) == 6 * LAYERS
    step = [s for s in res[0].plan.imported if s.name.startswith("fuse for")]
    assert step and "MultiHeadAttention 2" in step[0].detail
    assert not any(s.name.startswith("fuse for") for s in res[1].plan.imported)

    # the same plan written unfused computes the same numbers (without ORT's MatMulNBits fusion, whose
    # int8 quantization of the input would turn float rounding differences into code flips)
    monkeypatch.setattr(qmod, "fused_after_quantization", lambda qdq, plan, profile: (qdq, plan))
    unfused = tmp_path / "ort_unfused.onnx"
    quantize_for_profiles(tiny_bert, [(ANDROID, unfused)], "w4a16", calib=_feeds(6), progress=False)
    assert "MultiHeadAttention" not in _ops(unfused)
    assert _worst_sqnr(unfused, ort_path, optimize=False) >= MIN_SQNR_DB


def test_the_host_profiles_file_stays_portable(tiny_bert, tmp_path):
    """The default (host) profile's QDQ ONNX is the one file a user may package for Android and for iOS:
    no ORT contrib op in it (the README tour packages minilm.w8a8.onnx for both)."""
    out = tmp_path / "host.onnx"
    quantize_for_profiles(tiny_bert, [(ONNXRUNTIME_CPU, out)], "w8a8", calib=_feeds(6), progress=False)
    assert not {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"} & set(_ops(out))
