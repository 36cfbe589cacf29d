"""The real samples packaged for iOS: the saved .mlpackage, run by the reference executor, against
the QDQ ONNX in ONNX Runtime and against the float model.

"The QDQ ONNX run" is ORT with graph optimizations *off*: DequantizeLinear + float op +
QuantizeLinear, the graph's own semantics. ORT's default level fuses int8 DQ→MatMul/Conv into
integer kernels (≈ 29 dB from the QDQ math on MiniLM W8A16); even its basic level is not exact any
more: WeightBiasQuantization (ORT 1.32) re-quantizes float Conv biases to int32 at s_in * s_w and
saturates them (EfficientNet-Lite0 W8A8: 33 dB off at the logits). See coreml_models.ort_session.

Thresholds (fp16 compute, measured on this machine):
- weight-only recipes: SQNR ≥ 35 dB to the QDQ ONNX (measured 45–58 dB);
- W8A8: end to end ≥ 27 dB (measured 31.0 dB MiniLM, 30.4 dB EfficientNet-Lite0 with the limited
  calibration here; 30.0 / 30.6 dB with full calibration). The issue's 35 dB is not reachable for
  W8A8 by any run that does not repeat ORT's float32 arithmetic exactly: an activation within
  rounding distance of a code boundary gets the other code, and the 24 / 49 quantized layers after
  it amplify each flip (fp32 compute reaches only 36.3 / 35.4 dB, ORT's own integer kernels 36.3 /
  32.4 dB). So a W8A8 package is accepted by ``targets.coreml.acceptance.w8a8_acceptance``, the
  gate ``edgeq build`` applies to it: with every activation dequantize output of the package
  forced to the QDQ run's values (teacher forcing), each quantize input must
  match the QDQ run at ≥ 50 dB (measured 57.8–59.9 dB; fp32 compute: ≥ 124 dB), with on average
  ≤ 3 % of codes one step apart and ≤ 15 % in any layer (measured 0.9–1.3 % on average, ≤ 1.5 % in
  any MiniLM layer, 7.3 % at EfficientNet's stem, whose fp16 outputs near 6.0 are up to 0.08 of a
  code step off; fp32 compute: none).
- fidelity to float within 1 dB and 0.002 cosine of the QDQ ONNX (its exact run).
"""

import itertools

import numpy as np
import onnx
import pytest
from coreml_models import ort_session
from onnx import numpy_helper

from edgeq import api, sources
from edgeq.validate.metrics import per_sample_cosine, sqnr_db
from targets.coreml import IOS17Target, IOS18Target
from targets.coreml.acceptance import w8a8_acceptance
from targets.coreml.executor import load_program
from targets.coreml.lower.context import mil_name
from targets.coreml.runner import MLPackageRunner

pytestmark = pytest.mark.e2e


def _first(feeds, n):
    return list(itertools.islice(feeds, n))  # samples may stream their feeds (LazyFeeds)


def _check(float_onnx, qdq, tmp_path, target, feeds, *, min_sqnr):
    res = target.package(qdq, tmp_path / f"pkg-{target.name}-{qdq.stem}")
    runner = MLPackageRunner(res.model_file)  # loads the saved package back
    exact, flt = ort_session(qdq), ort_session(float_onnx, exact=False)
    out = {k: [] for k in ("exact", "float", "pkg")}
    for f in feeds:
        out["exact"].append(exact.run(None, f)[0])
        out["float"].append(flt.run(None, f)[0])
        out["pkg"].append(next(iter(runner.run(f).values())))
    c = {k: np.concatenate(v) for k, v in out.items()}
    assert sqnr_db(c["exact"], c["pkg"]) >= min_sqnr
    assert sqnr_db(c["float"], c["pkg"]) >= sqnr_db(c["float"], c["exact"]) - 1.0
    cos = {k: per_sample_cosine(c["float"], c[k]).mean() for k in ("pkg", "exact")}
    assert cos["pkg"] >= cos["exact"] - 0.002
    return res, runner


def _accepted(qdq, runner, float_onnx, feeds):
    """The iOS W8A8 acceptance (targets.coreml.acceptance): segments ≥ 50 dB, fidelity within 1 dB /
    0.002 cosine of the QDQ ONNX's; and at most 3 % of codes one step apart on average, 15 % in a layer."""
    acc = w8a8_acceptance(qdq, runner, float_onnx, feeds)
    seg = acc.segments.as_dict()
    assert acc.passed and not seg["not_compared"], acc.as_dict()
    assert seg["mean_code_flips"] <= 0.03 and seg["max_code_flips"] <= 0.15, seg
    return acc


def test_minilm_ios17_w8a16_and_ios18_w4a16(minilm_onnx, tmp_path):
    feeds = _first(sources.get_sample("minilm").feeds("evaluation"), 5)
    for target, recipe in ((IOS17Target(), "w8a16"), (IOS18Target(), "w4a16")):
        qdq = tmp_path / f"{recipe}.onnx"
        api.quantize(minilm_onnx, qdq, recipe, profile=target.name)
        res, _ = _check(minilm_onnx, qdq, tmp_path, target, feeds, min_sqnr=35)
    # the int4 codes, their zero points and the float32 scales in the saved package are the QDQ ONNX's
    model = onnx.load(str(qdq))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = {op.name: op for op in load_program(res.model_file)[0].functions["main"].operations}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dqs) == 39
    for n in dqs:
        op = ops[mil_name(n.output[0])]
        assert np.array_equal(op.data.val.astype(np.int8), inits[n.input[0]].astype(np.int8))
        assert np.array_equal(op.scale.val.view(np.uint32), inits[n.input[1]].view(np.uint32))
        if len(n.input) > 2:  # the MatMuls' asymmetric blocks
            assert np.array_equal(op.offset.val.astype(np.int8), inits[n.input[2]].astype(np.int8))
    assert sum(len(n.input) > 2 for n in dqs) == 36


def test_efficientnet_ios17_w8a16_and_ios18_w4a16(effnet_onnx, tmp_path):
    feeds = _first(sources.get_sample("efficientnet_lite0").feeds("evaluation", crops="1"), 1)
    for target, recipe in ((IOS17Target(), "w8a16"), (IOS18Target(), "w4a16")):
        qdq = tmp_path / f"{recipe}.onnx"
        api.quantize(effnet_onnx, qdq, recipe, profile=target.name)
        _check(effnet_onnx, qdq, tmp_path, target, feeds, min_sqnr=35)


def test_minilm_w8a8_ios17(minilm_onnx, tmp_path):
    sample = sources.get_sample("minilm")
    qdq = tmp_path / "w8a8.onnx"  # calibrated on 48 of the 200 calibration sentences, for time
    api.quantize(minilm_onnx, qdq, "w8a8", profile="ios17", calib=_first(sample.feeds("calibration", batch=16), 3))
    feeds = _first(sample.feeds("evaluation"), 4)
    res, runner = _check(minilm_onnx, qdq, tmp_path, IOS17Target(), feeds, min_sqnr=27)
    assert res.manifest["mil_ops"]["quantize"] == 24 and "constexpr_affine_dequantize" in res.manifest["mil_ops"]
    _accepted(qdq, runner, minilm_onnx, feeds)


def test_efficientnet_w8a8_ios18(effnet_onnx, tmp_path):
    sample = sources.get_sample("efficientnet_lite0")
    qdq = tmp_path / "w8a8.onnx"  # calibrated on the 8 crops of crops=1, for time
    api.quantize(effnet_onnx, qdq, "w8a8", profile="ios18", calib=_first(sample.feeds("calibration", crops="1"), 1))
    feeds = _first(sample.feeds("evaluation", crops="1"), 1)
    res, runner = _check(effnet_onnx, qdq, tmp_path, IOS18Target(), feeds, min_sqnr=27)
    assert res.manifest["mil_ops"]["quantize"] == 49 and "constexpr_blockwise_shift_scale" in res.manifest["mil_ops"]
    _accepted(qdq, runner, effnet_onnx, feeds)
