import os

import numpy as np
import pytest

from helpers import make_onnx, mlp_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def mlp_onnx(tmp_path):
    """A 2-layer MLP as ONNX (input x: float[batch,4], output y: float[batch,3])."""
    return make_onnx(mlp_text(), tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_feeds():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(4)]
