"""Reading .ort files, the ORT format's tensor types, and canonical bytes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import ort_errors

from targets.android import ortformat
from targets.android.convert import _optimize


def test_the_ort_format_has_no_4bit_types():
    types = ortformat.storable_types()
    for t in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        assert t not in types
    for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT8E4M3FN):
        assert t in types


def test_an_unpacked_int4_tensor_makes_an_unloadable_file(tiny, tmp_path):
    # what pre-flight protects against: ORT writes the int4 tensor anyway, then cannot load it
    out = tmp_path / "m.ort"
    _optimize(tiny["conv.w4a16"], out, ort_format=True)
    bad = ortformat.unstorable_tensors(out.read_bytes())
    assert [(t.name, ortformat.type_name(t.data_type)) for t in bad] == [("conv_w_q", "int4")]
    with pytest.raises(ort_errors(), match="Unsupported tensor data type"):
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_canonical_bytes_keep_the_model_and_run_the_same(tiny, tmp_path):
    out = tmp_path / "m.ort"
    _optimize(tiny["mlp.w8a16"], out, ort_format=True)
    raw = out.read_bytes()
    canon = ortformat.canonicalize(raw)
    assert ortformat.canonicalize(canon) == canon  # a fixed point
    assert ortformat.node_ops(canon) == ortformat.node_ops(raw) and ortformat.tensors(canon) == ortformat.tensors(raw)
    (tmp_path / "c.ort").write_bytes(canon)
    x = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    a = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(tmp_path / "c.ort"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.array_equal(a, b)
    assert ortformat.format_version(canon) == "6"


def test_not_an_ort_file():
    with pytest.raises(ValueError, match="ORTM"):
        ortformat.canonicalize(b"\0" * 64)
