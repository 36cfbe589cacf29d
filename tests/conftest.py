import os

import numpy as np
import pytest
from helpers import make_onnx, mlp_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Session fixtures that take long to build: under pytest-xdist (tools/test.sh runs two workers) the tests that
# use one share a worker, so the fixture is built once, not once per worker.
_SHARED_FIXTURES = {"smollm2_onnx": "smollm2", "tiny_onnx": "tiny_llm"}


def pytest_collection_modifyitems(config, items):
    """End-to-end tests on real models are slow by nature: the inner loop (-m "not slow") skips them."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.slow)
        group = next((g for f, g in _SHARED_FIXTURES.items() if f in getattr(item, "fixturenames", ())), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _export(e2e_dir, name):
    from edgeq.cli import main

    path = e2e_dir / f"{name}.onnx"
    if not path.exists():
        assert main(["export", name, "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def minilm_onnx(e2e_dir):
    """all-MiniLM-L6-v2 exported once per session with the CLI, as a user would (e2e tests only)."""
    return _export(e2e_dir, "minilm")


@pytest.fixture(scope="session")
def effnet_onnx(e2e_dir):
    """EfficientNet-Lite0 exported once per session with the CLI (e2e tests only)."""
    return _export(e2e_dir, "efficientnet_lite0")


@pytest.fixture(scope="session")
def qdq_model(e2e_dir, request):
    """``qdq_model("minilm", "w8a8")``: a real sample quantized once per session with the CLI
    (activation recipes calibrate on the sample's calibration split)."""
    from edgeq.cli import main

    sources = {"minilm": "minilm_onnx", "efficientnet_lite0": "effnet_onnx"}

    def get(name: str, recipe: str):
        path = e2e_dir / f"{name}.{recipe}.onnx"
        if not path.exists():
            src = request.getfixturevalue(sources[name])
            argv = ["quantize", str(src), "--recipe", recipe, "-o", str(path)]
            if recipe == "w8a8":
                argv += ["--calib", name]
            assert main(argv) == 0
        return path

    return get


@pytest.fixture
def mlp_onnx(tmp_path):
    """A 2-layer MLP as ONNX (input x: float[batch,4], output y: float[batch,3])."""
    return make_onnx(mlp_text(), tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_feeds():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(4)]
