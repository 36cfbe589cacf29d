"""LSTM/GRU int8 weights on iOS 18: the QDQ ONNX's W/R integers stored as constexpr ops (rows in MIL's
gate order, scales moved with their rows), read back out of the saved .mlpackage bit for bit, and the
reference executor against ONNX Runtime on the QDQ ONNX itself.

Thresholds: fp32 compute ≥ 90 dB (the same dequantized weights, float32 summation order only); fp16
compute ≥ 35 dB (weights, scales, inputs and outputs in fp16; measured 56-69 dB here).
"""

import numpy as np
import onnx
import pytest
from coreml_models import ort_run, package_and_load, rng_array
from onnx import TensorProto, helper, numpy_helper

from edgeq.validate.metrics import sqnr_db
from targets.coreml.executor import load_program

S, B, H = 6, 2, 8
GATES = {"LSTM": 4, "GRU": 3}
MIL_ORDER = {"LSTM": [0, 2, 1, 3], "GRU": [1, 2, 0]}  # ONNX i o f c -> i f o c; z r h -> r h z


def _codes(rng, shape):
    return rng.integers(-127, 128, shape).astype(np.int8)


def _qdq_rnn(op: str, *, dirs: int, width: int, block: int, zero_point: bool = False, seed: int = 0):
    """x[S, B, width] -> op (W, R int8 through DequantizeLinear, float B) -> Y, Y_h (, Y_c). ``block``
    0: one scale per gate row (axis 1, shared by the directions, as edgeq writes it); else int8 blocks
    of ``block`` along the input axis (one scale per direction, row and block)."""
    rng = np.random.default_rng(seed)
    gh = GATES[op] * H
    inits, nodes, qdq = [], [], {}
    for name, k in (("w", width), ("r", H)):
        q = _codes(rng, (dirs, gh, k))
        attrs = {"axis": 1}
        if block and k > block:
            s = rng.uniform(0.002, 0.02, (dirs, gh, -(-k // block))).astype(np.float32)
            attrs = {"axis": 2, "block_size": block}
        else:
            s = rng.uniform(0.002, 0.02, gh).astype(np.float32)
        ins = [f"{name}_q", f"{name}_s"]
        inits += [numpy_helper.from_array(q, ins[0]), numpy_helper.from_array(s, ins[1])]
        if zero_point:
            zp = rng.integers(-3, 4, s.shape).astype(np.int8)
            inits.append(numpy_helper.from_array(zp, f"{name}_zp"))
            ins.append(f"{name}_zp")
        nodes.append(helper.make_node("DequantizeLinear", ins, [name], name=f"{name}_dq", **attrs))
        qdq[name] = (q, s, attrs)
    inits.append(numpy_helper.from_array(rng_array((dirs, 2 * gh), seed + 3, scale=0.3), "b"))
    outs = ["y", "y_h", "y_c"][: 3 if op == "LSTM" else 2]
    attrs = {"hidden_size": H, "direction": {1: "forward", 2: "bidirectional"}[dirs]}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    nodes.append(helper.make_node(op, ["x", "w", "r", "b"], outs, name="rnn", **attrs))
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, B, width])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    onnx.checker.check_model(model, full_check=True)
    return model, {"x": rng_array((S, B, width), seed + 7)}, qdq


def _stored(q, s, attrs, d, op, width, compute):
    """What direction ``d``'s constexpr op must hold: the codes and scales, rows in MIL's gate order,
    a partial last block as blocks of gcd(block, width) with the scales repeated."""
    rows = np.concatenate([np.arange(g * H, (g + 1) * H) for g in MIL_ORDER[op]])
    if "block_size" in attrs:
        blk = attrs["block_size"]
        g = np.gcd(blk, q.shape[2])
        scale = np.repeat(s[d], blk // g, axis=1)[:, : q.shape[2] // g]
    else:
        scale = s.reshape(-1, 1)
    return q[d][rows], scale[rows].astype(np.float16 if compute == "fp16" else np.float32)


CASES = {  # op, directions, input width, block
    "lstm_per_row": ("LSTM", 1, 16, 0),
    "lstm_bidirectional_per_row": ("LSTM", 2, 16, 0),
    "lstm_blocks_partial_last": ("LSTM", 1, 40, 32),  # GE2E's first layer: 40 mel bands, blocks of 32
    "gru_per_row": ("GRU", 1, 16, 0),
    "gru_bidirectional_blocks": ("GRU", 2, 64, 32),
}


@pytest.mark.parametrize("compute", ["fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_weights_are_the_qdq_integers(case, compute, tmp_path):
    op, dirs, width, block = CASES[case]
    model, feed, qdq = _qdq_rnn(op, dirs=dirs, width=width, block=block)
    ex, low, _, pkg = package_and_load(model, tmp_path, deployment=18, compute=compute)
    prog, _ = load_program(pkg)
    ops = {o.name: o for o in prog.functions["main"].operations}
    assert len(low.weights) == 2 * dirs and all(r.dtype == "int8" for r in low.weights)
    for rec in low.weights:
        name = rec.onnx_node[0]  # w_dq / r_dq
        d = int(rec.mil_op.rsplit("_dir", 1)[1])
        stored = ops[rec.mil_op]
        assert stored.op_type == "constexpr_blockwise_shift_scale"
        want_q, want_s = _stored(*qdq[name], d, op, width, compute)
        assert np.asarray(stored.data.val).dtype == np.int8 and np.array_equal(stored.data.val, want_q), rec
        got_s = np.asarray(stored.scale.val)
        assert got_s.dtype == want_s.dtype and np.array_equal(got_s, want_s), rec
        assert stored.offset is None
    floats = [np.asarray(o.outputs[0].val) for o in ops.values() if o.op_type == "const"]
    assert not [v for v in floats if v.dtype.kind == "f" and v.size >= GATES[op] * H * H], "a float copy of a weight"
    want, got = ort_run(model, feed), ex.run(feed)
    floor = 35 if compute == "fp16" else 90
    for o, w in zip(["y", "y_h", "y_c"], want):
        assert sqnr_db(w, got[o]) >= floor, (o, sqnr_db(w, got[o]))


def test_zero_points_are_stored_as_offsets(tmp_path):
    model, feed, qdq = _qdq_rnn("LSTM", dirs=1, width=16, block=0, zero_point=True)
    ex, low, _, pkg = package_and_load(model, tmp_path, deployment=18, compute="fp32")
    prog, _ = load_program(pkg)
    ops = {o.name: o for o in prog.functions["main"].operations}
    zps = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zp")}
    rows = np.concatenate([np.arange(g * H, (g + 1) * H) for g in MIL_ORDER["LSTM"]])
    for rec in low.weights:
        off = ops[rec.mil_op].offset.val
        assert np.array_equal(np.asarray(off).reshape(-1), zps[f"{rec.onnx_node[0]}_zp"][rows])
    want, got = ort_run(model, feed), ex.run(feed)
    assert all(sqnr_db(w, got[o]) >= 90 for o, w in zip(["y", "y_h", "y_c"], want))


def test_ios17_and_unrepresentable_blocks_keep_float_weights(tmp_path):
    """iOS 17 has no constexpr form here (no fp16-output blockwise op for a partial block; today's
    fp16 weights); blocks of 32 over a width of 36 would need blocks of 4: both stay float."""
    for sub, (deployment, width, block) in {"ios17": (17, 16, 0), "narrow": (18, 36, 32)}.items():
        model, feed, _ = _qdq_rnn("LSTM", dirs=1, width=width, block=block)
        folder = tmp_path / sub
        folder.mkdir()
        ex, low, _, _ = package_and_load(model, folder, deployment=deployment, compute="fp16")
        assert [r.onnx_node for r in low.weights] == (["r_dq"] if sub == "narrow" else []), sub
        want, got = ort_run(model, feed), ex.run(feed)
        assert all(sqnr_db(w, got[o]) >= 35 for o, w in zip(["y", "y_h", "y_c"], want)), sub
