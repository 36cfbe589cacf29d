"""RemoveIdentityPass: copies and inference Dropouts go, outputs keep their names, the rest stays with a reason."""

import numpy as np
import onnx
import onnx_ir as ir
from import_models import assert_same_outputs, copy, ops

from edgeq.passes.remove_identity import RemoveIdentityPass

FEED = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


def _named(text: str) -> ir.Model:
    model = ir.from_onnx_text(text)
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        node.name = f"{node.op_type.lower()}{i}"
    return model


def test_identity_chains_and_inference_dropouts_are_removed_and_outputs_keep_their_names():
    model = _named("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) <bool no = {0}, float half = {0.5}>
    {
        a = Identity (x)
        b = Relu (a)
        c = Dropout (b)
        d = Dropout (c, half, no)
        e = Sigmoid (d)
        y = Identity (e)
        z = Identity (y)
    }
    """)
    before = copy(model)
    result = RemoveIdentityPass()(model)
    assert result.removed == {"Identity": 2, "Dropout": 2} and result.modified
    # z = Identity(y) stays: y is itself a graph output, so it cannot take z's name
    assert result.kept == (("identity6", "its input is also a graph output"),)
    assert ops(model) == ["Relu", "Sigmoid", "Identity"]
    assert [o.name for o in model.graph.outputs] == ["y", "z"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(before, model, FEED, min_sqnr_db=float("inf"))


def test_dropouts_that_may_drop_stay_with_the_reason():
    model = _named("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x, bool train) => (float[N, 4] y, bool[N, 4] mask) <bool yes = {1}, float half = {0.5}>
    {
        a = Dropout (x, half, yes)
        b = Dropout (a, half, train)
        y, mask = Dropout (b)
    }
    """)
    result = RemoveIdentityPass()(model)
    assert not result.modified
    assert result.kept == (("dropout0", "training_mode is true"), ("dropout1", "training_mode is not a constant"),
                           ("dropout2", "its mask output is used"))


def test_opset10_dropout_is_inference_only():
    model = _named("""
    <ir_version: 5, opset_import: ["" : 10]>
    g (float[N, 4] x) => (float[N, 4] y)
    {
        a = Dropout <ratio = 0.3> (x)
        y = Relu (a)
    }
    """)
    before = copy(model)
    assert RemoveIdentityPass()(model).removed == {"Dropout": 1}
    assert_same_outputs(before, model, FEED, min_sqnr_db=float("inf"))


def test_a_subgraph_output_copying_an_outer_value_stays():
    # silero-vad's If branches return outer-scope values through Identity; onnx-ir's
    # IdentityEliminationPass raises on them
    model = _named("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (bool c, float[N, 4] x) => (float[N, 4] y)
    {
        r = Relu (x)
        y = If (c) <then_branch = thenb () => (float[N, 4] t) { t = Identity (r) },
                    else_branch = elseb () => (float[N, 4] e) { n = Neg (r)
                                                             e = Identity (n) }>
    }
    """)
    before = copy(model)
    result = RemoveIdentityPass()(model)
    assert result.removed == {"Identity": 1}  # the else branch's: Neg takes the output's name
    assert result.kept == (
        ("identity2", "its output is a graph output and its input is not computed in the same graph"),)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for c in (True, False):
        assert_same_outputs(before, model, {"c": np.array(c), **FEED}, min_sqnr_db=float("inf"))
