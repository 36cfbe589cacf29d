"""GPTQ for language models: an int4 table tied between the embedding and the output layer gets codes
chosen for the output layer (the Gram of the hidden states the output MatMul reads; the embedding Gather
reads the same integers), and asymmetric block grids chosen by the layer-output error they predict."""

from types import SimpleNamespace

import numpy as np
from helpers import tied_lm

from edgeq.pipeline.quantize import quantize_model
from edgeq.quant.gptq import _block_grid, _output_grid, output_error
from edgeq.quant.profile import ONNXRUNTIME_CPU
from edgeq.quant.weights import quantize_weight
from edgeq.runtime import ort_session

V, D = 96, 64


def _tied_lm(path):
    """Gather -> a float mixing MatMul whose output has a few loud, correlated channels -> tied output layer."""
    rng = np.random.default_rng(11)
    table = rng.standard_normal((V, D)).astype(np.float32)
    mix = np.eye(D, dtype=np.float32) + (rng.standard_normal((D, D)) / 4).astype(np.float32)
    mix[:, :4] *= 6.0  # loud channels: the output layer's error is not the table's plain squared error
    return tied_lm(path, table, mix, outputs=("e", "h")), table, mix


def test_the_tied_int4_table_is_rounded_for_the_output_layer(tmp_path):
    src, table, mix = _tied_lm(tmp_path / "lm.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "w4-tied4"\n[default]\nweights = "int4"\ntied_table = "int4"\n'
                      "[[rules]]\nop = [\"MatMul\"]\nname = \"^mix$\"\nweights = \"float\"\n"
                      "[algorithms]\ngptq = {act_order = true}\n")
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, V, (1, 24)).astype(np.int64)} for _ in range(16)]
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, recipe, profile=ONNXRUNTIME_CPU, calib=calib, progress=False)
    gptq = next(a for a in res.plan.algorithms if a.name == "gptq")
    assert "lm_head" in gptq.nodes
    codes = res.plan.codes["table"]
    assert codes.block_size == 32 and codes.axis == 1  # the tied form's layout: blocks along D
    assert codes.zero_point is not None and codes.zero_point.shape == (V, D // 32)  # a zero point per block
    tied = [d for d in res.plan.weights if d.weight == "table"]
    nearest = quantize_weight(table, tied[0])
    assert not np.array_equal(codes.data, nearest.data)
    # the output layer's error on the calibration hidden states: GPTQ well below round to nearest
    h = np.concatenate([(table[f["input_ids"][0]] @ mix) for f in calib]).astype(np.float64)
    gram = h.T @ h / len(h)
    err_gptq = output_error(table, codes.dequantize(), gram, k_axis=1)
    err_rtn = output_error(table, nearest.dequantize(), gram, k_axis=1)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)  # measured 0.23x
    # both readers see those integers: the Gather's rows exactly, the MatMul's logits from the same table
    ids = np.array([[0, 5, 95, 5, 17]], np.int64)
    e, hid, logits = ort_session(out, optimize=False).run(["e", "h", "logits"], {"input_ids": ids})
    deq = codes.dequantize()
    np.testing.assert_array_equal(e, deq[ids])
    ref = hid @ deq.T
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()  # MatMulNBits at accuracy level 4 (int8 activations)



def test_output_error_grids_predict_less_output_error_than_squared_error_grids():
    """Weights on a float-minimum (Q4_1-like) grid, inputs with a shared component: an integer zero point
    leaves a constant offset per block, which correlated inputs add up; a grid chosen by ``eᵀ H_bb e``
    sees it. Rounded to nearest on each block's grid (before GPTQ's compensation)."""
    rng = np.random.default_rng(4)
    block, n = 32, 48
    d_step = rng.uniform(0.01, 0.03, n)
    w = (-d_step * rng.uniform(5.0, 10.0, n) + d_step * rng.integers(0, 16, (block, n))).astype(np.float32)
    x = rng.standard_normal((4096, block)) + 2.0 * rng.standard_normal((4096, 1))  # a shared component
    gram = x.T @ x / len(x)
    dec = SimpleNamespace(block=block, symmetric=False, clip_search=True)
    grids = {"squared": _block_grid(w, dec)[0], "output": _output_grid(w, gram)[0]}
    err = {k: output_error(w, g.round(w.astype(np.float64))[1], gram) for k, g in grids.items()}
    assert err["output"] < 0.5 * err["squared"], err  # measured 0.09x
