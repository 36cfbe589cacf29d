"""The lowering registry and the target's pre-flight read their own data (issue 15's two bugs)."""

import dataclasses

import onnx
import pytest
from coreml_models import rng_array, single_op

from targets.coreml import IOS18Target
from targets.coreml import profile as profiles
from targets.coreml.lower.registry import CHECKS, LOWERINGS, lowers


def test_a_second_lowering_for_an_op_is_an_error_and_the_first_stays():
    op = "EdgeqTestOnlyOp"
    try:
        first = lowers(op)(lambda ctx, node, ins: ins)
        with pytest.raises(ValueError, match=f"registered twice.*{op}"):
            lowers(op, check=lambda node: None)(lambda ctx, node, ins: [])
        assert LOWERINGS[op] is first and op not in CHECKS
    finally:
        LOWERINGS.pop(op, None)
        CHECKS.pop(op, None)


def test_a_real_op_cannot_be_silently_replaced():
    relu = LOWERINGS["Relu"]
    with pytest.raises(ValueError, match="Relu"):
        lowers("Relu")(lambda ctx, node, ins: ins)
    assert LOWERINGS["Relu"] is relu


class _OpsetTwentyTarget(IOS18Target):
    """An iOS target whose profile stops at opset 20 (below the module-wide maximum)."""

    name = "ios18-opset20"

    @property
    def profile(self):
        return dataclasses.replace(profiles.IOS18, name=self.name, max_opset=20)


def test_preflight_checks_the_opset_against_its_own_profile():
    model, _ = single_op("Relu", {"x": ("input", rng_array((2, 3), 1))}, opset=21)
    assert profiles.MAX_OPSET > 21 and not IOS18Target().preflight(model)
    problems = _OpsetTwentyTarget().preflight(model)
    assert [p.op_type for p in problems] == ["model"]
    assert "opset 21" in problems[0].message and "≤ 20" in problems[0].message
    onnx.checker.check_model(model)


@pytest.mark.parametrize("scales", [4, 5])
def test_per_axis_scale_of_the_wrong_length_fails_preflight(scales, tmp_path):
    """4 scales for 8 channels must not become blocks of 2 (Core ML infers blocks from shapes)."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edgeq.errors import UnsupportedError

    q = numpy_helper.from_array(np.arange(-32, 32, dtype=np.int8).reshape(8, 8), "wq")
    s = numpy_helper.from_array(np.full(scales, 0.01, np.float32), "ws")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1, name="w_dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])], [q, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    problems = IOS18Target().preflight(model)
    assert [(p.node, p.op_type) for p in problems] == [("w_dq", "DequantizeLinear")]
    assert f"{scales} values for the 8 indices of axis 1" in problems[0].message
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedError, match="w_dq"):
        IOS18Target().package(path, tmp_path / "pkg")
