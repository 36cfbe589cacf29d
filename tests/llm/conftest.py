import pytest
from tiny_llama import tiny_llama, tiny_tokenizer, torch_causal_lm


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_model):
    """The tiny Llama saved as a Hugging Face folder (weights + tokenizer) and exported from it once per
    session with ``edgeq.export(folder, ...)`` (about 30 s: tests using it are slow)."""
    import edgeq

    root = tmp_path_factory.mktemp("tiny_llm")
    folder = root / "tiny-llama-hf"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    res = edgeq.export(folder, root / "tiny.onnx")
    return res.path, res


@pytest.fixture
def torch_lm(tiny_model):
    """The tiny Llama's torch step module behind the runner interface (fast: no export)."""
    return torch_causal_lm(tiny_model)


@pytest.fixture(scope="session")
def smollm2_onnx(e2e_dir):
    """SmolLM2 exported once per session with the CLI, as a user would (e2e tests only)."""
    from edgeq.cli import main

    path = e2e_dir / "smollm2.onnx"
    if not path.exists():
        assert main(["export", "smollm2", "-o", str(path), "--json", str(e2e_dir / "smollm2.export.json")]) == 0
    return path
