"""tools/bench/llm_methods.py: untying the tied output layer so ORT's MatMulNBitsQuantizer sees it."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench.llm_methods import untie_output_layer  # noqa: E402

VOCAB, HIDDEN = 96, 64


def tied_model() -> onnx.ModelProto:
    """Embedding Gather and logits Transpose -> MatMul reading one table, as edgeq's export stores it."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Relu", ["emb"], ["h"]),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "table_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "seq", VOCAB])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0]


def test_untie_is_exact_and_lets_ort_quantize_the_output_layer():
    ids = np.array([[3, 17, 95, 0, 42]], np.int64)
    model = tied_model()
    want = run(model, ids)
    untied = tied_model()
    changed = untie_output_layer(untied)
    assert len(changed) == 1 and "table.untied_T" in changed[0]
    assert [n.op_type for n in untied.graph.node] == ["Gather", "Relu", "MatMul"]
    np.testing.assert_array_equal(run(untied, ids), want)  # a transposed copy: bit-exact

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ops, axes = ("MatMul", "Gather"), (("MatMul", 0), ("Gather", 1))
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, op_types_to_quantize=ops, quant_axes=axes)
    q = MatMulNBitsQuantizer(untied, block_size=32, is_symmetric=True, op_types_to_quantize=ops, quant_axes=axes,
                             algo_config=cfg)
    q.process()
    quantized = q.model.model
    assert sorted(n.op_type for n in quantized.graph.node) == ["GatherBlockQuantized", "MatMulNBits", "Relu"]
    got = run(quantized, ids)
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2))
    assert sqnr > 15  # int4 block 32 on both reads of a Gaussian table: ~20 dB


def test_untie_leaves_other_transposes_alone():
    model = tied_model()
    for n in model.graph.node:
        if n.op_type == "Transpose":
            n.attribute[0].ints[:] = [0, 1]  # not a 2-D transpose of the table: left as it is
    assert untie_output_layer(model) == []
    assert [n.op_type for n in model.graph.node].count("Transpose") == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_worker_opens_an_onnx_model_as_a_runner(tmp_path):
    """The fidelity and speed jobs open ONNX / .ort models through edgeq's runner (a broken import here
    once left every row of a long benchmark run unmeasured)."""
    from bench.llm_worker import _open

    path = tmp_path / "tied.onnx"
    onnx.save(tied_model(), str(path))
    runner = _open({"name": "tied", "kind": "onnx", "artifact": str(path)}, 1)
    ids = np.array([[1, 5, 7]], np.int64)
    out = runner.run({"ids": ids})
    np.testing.assert_array_equal(next(iter(out.values())) if isinstance(out, dict) else out[0],
                                  run(tied_model(), ids))


def test_the_tied_int4_method_is_the_w4a16_preset_with_an_int4_table(tmp_path):
    """The bench's W4A16_TIED_INT4 recipe spells out the preset: only the tied table's format differs."""
    from dataclasses import replace

    from bench.llm_methods import W4A16_TIED_INT4

    from edgeq.quant.recipes import WeightFormat, load_recipe, preset

    path = tmp_path / "r.toml"
    path.write_text(W4A16_TIED_INT4)
    mine = load_recipe(path)
    ref = preset("w4a16", block=32)  # a pinned block: no block choice, as causal LMs keep the recipe's block
    assert mine.default == replace(ref.default, tied_table=WeightFormat.INT4)
    assert mine.algorithms == ref.algorithms and mine.rules == ref.rules


def test_the_tied_int4_variants_add_one_rule_each(tmp_path):
    """b16: the embedding Gather (which decides the tied table) in blocks of 16; int8 ends: layers 0, 28, 29's
    seven projections int8. Otherwise the tied-int4 recipe."""
    from bench.llm_methods import W4A16_TIED_INT4, W4A16_TIED_INT4_B16, W4A16_TIED_INT4_INT8_ENDS

    from edgeq.quant.recipes import WeightFormat, load_recipe

    recipes = {}
    for key, text in (("base", W4A16_TIED_INT4), ("b16", W4A16_TIED_INT4_B16), ("ends", W4A16_TIED_INT4_INT8_ENDS)):
        path = tmp_path / f"{key}.toml"
        path.write_text(text)
        recipes[key] = load_recipe(path)
    for key in ("b16", "ends"):
        assert recipes[key].default == recipes["base"].default and recipes[key].algorithms == recipes["base"].algorithms
        assert len(recipes[key].rules) == 1
    b16, ends = recipes["b16"].rules[0], recipes["ends"].rules[0]
    assert b16.op_types == ("Gather",) and b16.matches("Gather", "node_embedding") and b16.spec.block == 16
    assert ends.spec.weights == WeightFormat.INT8
    int8 = [i for i in range(211) if ends.matches("MatMul", f"node_linear_{i}")]  # SmolLM2: 7 per layer, in order
    assert len(int8) == 21 and {i // 7 for i in int8} == {0, 28, 29}


def test_the_gguf_tied_int4_method_is_recipe_gguf_with_an_int4_table(tmp_path):
    from dataclasses import replace

    from bench.llm_methods import GGUF_TIED_INT4

    from edgeq.quant.recipes import WeightFormat, load_recipe, preset

    path = tmp_path / "r.toml"
    path.write_text(GGUF_TIED_INT4)
    mine, ref = load_recipe(path), preset("gguf")
    assert mine.default == replace(ref.default, tied_table=WeightFormat.INT4)
    assert mine.algorithms == ref.algorithms and mine.rules == ref.rules
