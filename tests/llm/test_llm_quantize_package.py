"""A causal LM quantized and packaged for Android: the tied table stored once (GatherBlockQuantized +
MatMulNBits), the package carries genai_config.json and the tokenizer, and the .ort generates what its
QDQ model generates (the tiny Llama; the export makes these tests slow)."""

import json

import numpy as np
import pytest

from edgeq import api
from edgeq.generate import CausalLM, generate
from edgeq.validate.runners import open_runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged(tiny_onnx, tmp_path_factory):
    path, _ = tiny_onnx
    root = tmp_path_factory.mktemp("tiny_pkg")
    qdq = root / "tiny.w4a16.onnx"
    res = api.quantize(path, qdq, "w4a16", profile="android", progress=False)
    pkg = api.package(qdq, "android", root / "android")
    return res, qdq, pkg


def test_the_tied_table_is_one_table(packaged):
    res, qdq, _ = packaged
    import onnx

    ops = [n.op_type for n in onnx.load(str(qdq)).graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    # ONNX Runtime's transformer kernels are fused into the quantized graph (the plan is the portable graph's)
    fuse = [s for s in res.plan.imported if s.name == "fuse for android (on the quantized graph)"]
    assert fuse and fuse[0].changed and "SkipSimplifiedLayerNormalization" in ops
    assert "MultiHeadAttention" in ops or "GroupQueryAttention" in ops
    tied = [d for d in res.plan.weights if d.form.startswith("tied_")]
    assert {d.op_type for d in tied} == {"Gather", "MatMul"} and len({d.weight for d in tied}) == 1


def test_the_package_has_what_onnxruntime_genai_loads(packaged):
    _, _, pkg = packaged
    files = {p.name for p in pkg.path.iterdir()}
    assert {"model.ort", "genai_config.json", "tokenizer.json", "README.md", "manifest.json"} <= files
    cfg = json.loads((pkg.path / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.ort" and dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # every layer's attention is GroupQueryAttention: onnxruntime-genai may give past and present one buffer
    assert cfg["search"]["past_present_share_buffer"] is True
    assert "onnxruntime-genai" in (pkg.path / "README.md").read_text()


def test_the_ort_generates_what_its_qdq_model_generates(packaged):
    _, qdq, pkg = packaged
    ids = list(np.random.default_rng(0).integers(3, 256, 9))
    want = CausalLM(open_runner(qdq)).generate(ids, 12).tokens
    got = CausalLM(open_runner(pkg.model_file)).generate(ids, 12).tokens
    assert got == want
    out = generate(pkg.path, "hello there", max_tokens=4, chat=False)  # the folder finds its tokenizer.json
    assert out.generation.tokens


def test_onnxruntime_genai_runs_the_package(packaged):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip onnxruntime-genai)")
    _, _, pkg = packaged
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 256, 7)]
    model = og.Model(str(pkg.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    genai_tokens = list(gen.get_sequence(0))[len(ids):]
    ours = CausalLM(open_runner(pkg.model_file)).generate(ids, len(genai_tokens)).tokens
    assert genai_tokens == ours[:len(genai_tokens)]
