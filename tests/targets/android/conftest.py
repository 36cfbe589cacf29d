"""Tiny QDQ models for the Android target tests (hand-built, see android_models.py)."""

import pytest

import android_models as am


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("android_tiny")
    return {
        "mlp.float": am.float_mlp(d / "mlp.float.onnx"),
        "mlp.w8a16": am.qdq_mlp(d / "mlp.w8a16.onnx", bits=8),
        "mlp.w4a16": am.qdq_mlp(d / "mlp.w4a16.onnx", bits=4),  # int4 MatMul → Sigmoid: packed into MatMulNBits
        "mlp.w4a16.relu": am.qdq_mlp(d / "mlp.w4a16.relu.onnx", bits=4, act="Relu"),  # ORT leaves fc1 unpacked
        "conv.float": am.float_convnet(d / "conv.float.onnx"),
        "conv.w8a16": am.qdq_convnet(d / "conv.w8a16.onnx", bits=8),
        "conv.w4a16": am.qdq_convnet(d / "conv.w4a16.onnx", bits=4),  # int4 Conv: runs on the host, not in .ort
    }
