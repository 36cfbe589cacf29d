"""Folding per-channel constant Muls (AWQ scalings, protection masks) into their input's producer: on a small
RMSNorm + gated-MLP block as the ORT fusions leave a quantized Llama layer, the Muls go where they can, the
ones that cannot move stay, and ONNX Runtime (optimizations off: float kernels) computes the same numbers."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.fold_scalings import FoldScalingsPass
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db

D, F, BLOCK = 64, 96, 32  # hidden, MLP width, int4 block along the input axis
MIN_SQNR_DB = 110.0  # float32 rounding of gamma*c / scale*c instead of x*c: ~130 dB measured


def _weight(name: str, k: int, n: int, form: str, rng) -> tuple[list, list, str]:
    """Initializers, nodes and the value name of a [k, n] projection weight in ``form``."""
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.2
    if form == "float":
        return [numpy_helper.from_array(w, name)], [], name
    if form == "blocked":  # int4 blocks of 32 along k, asymmetric (zero points), as w4a16 writes them
        q = rng.integers(0, 16, (k, n)).astype(np.uint8)
        scale = (rng.random((k // BLOCK, n)) * 0.02 + 0.01).astype(np.float32)
        zp = rng.integers(6, 10, (k // BLOCK, n)).astype(np.uint8)
        inits = [helper.make_tensor(f"{name}_q", TensorProto.UINT4, (k, n), q.reshape(-1).tolist()),
                 numpy_helper.from_array(scale, f"{name}_s"),
                 helper.make_tensor(f"{name}_z", TensorProto.UINT4, zp.shape, zp.reshape(-1).tolist())]
        node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=0,
                                block_size=BLOCK)
        return inits, [node], name
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)  # int8, one scale per output column
    scale = (rng.random(n) * 0.01 + 0.005).astype(np.float32)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")]
    return inits, [helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=1)], name


def _layer(form: str) -> onnx.ModelProto:
    """x + residual → SkipSimplifiedLayerNormalization → ·c1 → gate/up → silu(gate)·up → ·c2 → down, then a
    protection-like mask (down also read by a Gather) → ·c3, and a Relu → ·c4 (a producer that cannot absorb)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    vec = {"gamma": rng.random(D) + 0.5, "c1": rng.random(D) + 0.5, "c2": rng.random(F) + 0.5,
           "mask": (rng.random(D) > 0.2).astype(np.float64), "c3": rng.random(D) + 0.5, "c4": rng.random(D) + 0.5}
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in vec.items()]
    inits.append(numpy_helper.from_array(np.array([1, 5], np.int64), "channels"))
    for name, k, n in (("w_gate", D, F), ("w_up", D, F), ("w_down", F, D)):
        i, ns, _ = _weight(name, k, n, form, rng)
        inits += i
        nodes += ns
    nodes += [
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "residual", "gamma"], ["normed", "", "", "sum"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("Mul", ["normed", "c1"], ["normed_s"]),
        helper.make_node("MatMul", ["normed_s", "w_gate"], ["gate"]),
        helper.make_node("MatMul", ["normed_s", "w_up"], ["up"]),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["h"]),
        helper.make_node("Mul", ["h", "c2"], ["h_s"]),
        helper.make_node("MatMul", ["h_s", "w_down"], ["down"]),
        helper.make_node("Mul", ["down", "mask"], ["masked"]),
        helper.make_node("Gather", ["down", "channels"], ["protected"], axis=-1),
        helper.make_node("Mul", ["masked", "c3"], ["masked_s"]),
        helper.make_node("Relu", ["masked_s"], ["r"]),
        helper.make_node("Mul", ["r", "c4"], ["y"]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info(n, f, [2, 3, D]) for n in ("x", "residual")],
        [helper.make_tensor_value_info("y", f, [2, 3, D]), helper.make_tensor_value_info("sum", f, [2, 3, D]),
         helper.make_tensor_value_info("protected", f, [2, 3, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _run(proto: onnx.ModelProto, feed: dict) -> dict:
    sess = ort_session(proto.SerializeToString(), optimize=False)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


@pytest.mark.parametrize("form", ["blocked", "per_column", "float"])
def test_scalings_fold_into_the_norm_and_the_up_projection(form):
    proto = _layer(form)
    model = ir.from_proto(proto)
    result = FoldScalingsPass()(model)
    # c1 into the norm's weight, c2 into w_up's columns, c3 merged into the mask; c4 after a Relu stays
    assert result.folded == {"norm_weight": 1, "projection_columns": 1, "mul": 1}
    muls = collections.Counter(tuple(sorted(v.name for v in n.inputs if v.const_value is not None))
                               for n in model.graph if n.op_type == "Mul")
    assert sum(muls.values()) == 4 and muls[("c4",)] == 1 and muls[()] == 2  # silu and its gate product
    assert {"c1", "c2", "c3"}.isdisjoint(model.graph.initializers)
    rng = np.random.default_rng(1)
    feed = {n: rng.standard_normal((2, 3, D)).astype(np.float32) for n in ("x", "residual")}
    want, got = _run(proto, feed), _run(ir.to_proto(model), feed)
    for name in want:
        assert sqnr_db(want[name], got[name]) >= MIN_SQNR_DB, name


def test_a_scaling_whose_input_is_read_elsewhere_or_whose_weight_is_shared_stays():
    proto = _layer("blocked")
    g = proto.graph
    # the norm's output is read by a second consumer; w_up's scale is read by a second DequantizeLinear
    g.node.append(helper.make_node("Relu", ["normed"], ["normed_too"]))
    g.node.append(helper.make_node("DequantizeLinear", ["w_down_q", "w_up_s", "w_down_z"], ["unused"], axis=0,
                                   block_size=BLOCK))
    g.output.append(helper.make_tensor_value_info("normed_too", TensorProto.FLOAT, [2, 3, D]))
    model = ir.from_proto(proto)
    gamma, up_scale = (model.graph.initializers[n].const_value.numpy().copy() for n in ("gamma", "w_up_s"))
    result = FoldScalingsPass()(model)
    assert result.folded == {"mul": 1}
    np.testing.assert_array_equal(model.graph.initializers["gamma"].const_value.numpy(), gamma)
    np.testing.assert_array_equal(model.graph.initializers["w_up_s"].const_value.numpy(), up_scale)
