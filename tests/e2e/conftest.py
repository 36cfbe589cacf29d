"""The CLI helper of the end-to-end tests. The exported real samples (``e2e_dir``, ``minilm_onnx``,
``effnet_onnx``) are session fixtures of tests/conftest.py, shared with the target tests."""

from edgeq.cli import main


def cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out
