"""The real samples packaged for iOS: the saved .mlpackage, run by the reference executor, against
the QDQ ONNX in ONNX Runtime and against the float model.

Reference for "matches the QDQ ONNX": ORT with basic graph optimizations, i.e. exact
DequantizeLinear + float op semantics (ORT's default level fuses int8 DQ→MatMul into kernels that
also quantize activations, ≈ 29 dB away from the exact QDQ math on MiniLM). Thresholds: SQNR ≥ 35
dB to the QDQ ONNX (fp16 compute; measured 45–58 dB), fidelity to float within 1 dB and 0.002
cosine of the QDQ ONNX (ORT default level, what `edgeq validate` runs).
"""

import numpy as np
import onnxruntime as ort
import pytest

from edgeq import api, sources
from edgeq.validate.metrics import per_sample_cosine, sqnr_db
from targets.coreml import IOS17Target, IOS18Target
from targets.coreml.executor import load_program
from targets.coreml.lower.context import mil_name
from targets.coreml.runner import MLPackageRunner

pytestmark = pytest.mark.e2e


def _sess(path, basic):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(float_onnx, tmp_path, target, recipe, feeds):
    qdq = tmp_path / f"{recipe}.onnx"
    api.quantize(float_onnx, qdq, recipe, profile=target.name)
    res = target.package(qdq, tmp_path / f"pkg-{target.name}-{recipe}")
    runner = MLPackageRunner(res.model_file)  # loads the saved package back
    exact, default, flt = _sess(qdq, True), _sess(qdq, False), _sess(float_onnx, False)
    out = {k: [] for k in ("exact", "default", "float", "pkg")}
    for f in feeds:
        out["exact"].append(exact.run(None, f)[0])
        out["default"].append(default.run(None, f)[0])
        out["float"].append(flt.run(None, f)[0])
        out["pkg"].append(next(iter(runner.run(f).values())))
    c = {k: np.concatenate(v) for k, v in out.items()}
    assert sqnr_db(c["exact"], c["pkg"]) >= 35
    assert sqnr_db(c["float"], c["pkg"]) >= sqnr_db(c["float"], c["default"]) - 1.0
    cos_pkg = per_sample_cosine(c["float"], c["pkg"]).mean()
    assert cos_pkg >= per_sample_cosine(c["float"], c["default"]).mean() - 0.002
    return res, qdq


def test_minilm_ios17_w8a16_and_ios18_w4a16(minilm_onnx, tmp_path):
    feeds = sources.get_sample("minilm").feeds("evaluation")[:5]
    _check(minilm_onnx, tmp_path, IOS17Target(), "w8a16", feeds)
    res, qdq = _check(minilm_onnx, tmp_path, IOS18Target(), "w4a16", feeds)
    # the int4 codes and float32 scales in the saved package are the QDQ ONNX's, bit for bit
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq))
    inits = {i.name: i for i in model.graph.initializer}
    ops = {op.name: op for op in load_program(res.model_file)[0].functions["main"].operations}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dqs) == 39
    for n in dqs:
        op = ops[mil_name(n.output[0])]
        assert np.array_equal(op.data.val.astype(np.int8), numpy_helper.to_array(inits[n.input[0]]).astype(np.int8))
        scale = numpy_helper.to_array(inits[n.input[1]])
        assert np.array_equal(op.scale.val.view(np.uint32), scale.view(np.uint32))


def test_efficientnet_ios17_w8a16_and_ios18_w4a16(effnet_onnx, tmp_path):
    feeds = sources.get_sample("efficientnet_lite0").feeds("evaluation", crops="1")[:1]
    _check(effnet_onnx, tmp_path, IOS17Target(), "w8a16", feeds)
    _check(effnet_onnx, tmp_path, IOS18Target(), "w4a16", feeds)
