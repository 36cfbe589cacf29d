"""Real samples exported once per test session, with the CLI (as a user would)."""

import pytest

from edgeq.cli import main


def cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _export(e2e_dir, name):
    path = e2e_dir / f"{name}.onnx"
    if not path.exists():
        assert main(["export", name, "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def minilm_onnx(e2e_dir):
    return _export(e2e_dir, "minilm")


@pytest.fixture(scope="session")
def effnet_onnx(e2e_dir):
    return _export(e2e_dir, "efficientnet_lite0")
