"""ConvertOpsetPass: old opsets reach the target and compute the same; failures name the node."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from import_models import assert_same_outputs, copy, ops

from edgeq.errors import InputError
from edgeq.passes.convert_opset import ConvertOpsetPass

# ops whose definition changed after opset 11: axes/split attributes became inputs, Softmax's axis
OPSET11 = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[N, 4, 6] x) => (float[N, 1, 6] m, float[N, 2, 6] a, float[N, 4, 6] s, float[N, 1, 4, 6] u) {
    m = ReduceMean <axes = [1]> (x)
    a, b = Split <axis = 1, split = [2, 2]> (x)
    s = Softmax <axis = 1> (x)
    u = Unsqueeze <axes = [1]> (x)
}
"""

IF_OPSET11 = """
<ir_version: 6, opset_import: ["" : 11]>
g (bool c, float[2, 3] x) => (float[3] y) {
    y = If (c) <then_branch = thenb () => (float[3] ty) {
            mx = ReduceMax <axes = [0]> (x)
            ty = Squeeze <axes = [0]> (mx)
        }, else_branch = elseb () => (float[3] ey) {
            ey = ReduceMean <axes = [0], keepdims = 0> (x)
        }>
}
"""


def test_opset11_model_reaches_opset21_and_computes_the_same():
    model = ir.from_onnx_text(OPSET11)
    before = copy(model)
    result = ConvertOpsetPass(21)(model)
    assert result.modified and (result.from_opset, result.to_opset) == (11, 21)
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    assert result.adapted == {"ReduceMean": 1, "Split": 1, "Softmax": 1, "Unsqueeze": 1}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))


def test_if_branches_are_converted_too():
    model = ir.from_onnx_text(IF_OPSET11)
    before = copy(model)
    ConvertOpsetPass(21)(model)
    # ReduceMax/ReduceMean/Squeeze-21 take axes as an input: the converter added them in both branches
    assert "Constant" in ops(model)
    reduce_nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type.startswith("Reduce")]
    assert all(len(n.inputs) == 2 and "axes" not in n.attributes for n in reduce_nodes)
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    for c in (True, False):
        assert_same_outputs(before, model, {"c": np.array(c), "x": x}, min_sqnr_db=float("inf"))


@pytest.mark.parametrize("opset", [21, 23])
def test_a_model_at_or_above_the_target_is_kept(opset):
    model = ir.from_onnx_text(f"""
    <ir_version: 11, opset_import: ["" : {opset}]>
    g (float[N, 2] x) => (float[N, 2] y) <float[2, 2] w = {{1, 2, 3, 4}}>
    {{
        h = MatMul (x, w)
        y = Relu (h)
    }}
    """)
    proto = ir.to_proto(model).SerializeToString()
    result = ConvertOpsetPass(21)(model)
    assert not result.modified and result.from_opset == opset
    assert ir.to_proto(model).SerializeToString() == proto


def test_a_conversion_the_converter_cannot_do_names_the_node():
    # BatchNormalization-7 with spatial=0 (per-element statistics) has no opset-9+ equivalent
    text = """
    <ir_version: 4, opset_import: ["" : 7]>
    g (float[1, 2, 3] x) => (float[1, 2, 3] y)
    <float[2, 3] s = {1, 1, 1, 1, 1, 1}, float[2, 3] b = {0, 0, 0, 0, 0, 0},
     float[2, 3] m = {0, 0, 0, 0, 0, 0}, float[2, 3] v = {1, 1, 1, 1, 1, 1}>
    {
        r = Relu (x)
        y = BatchNormalization <spatial = 0> (r, s, b, m, v)
    }
    """
    model = ir.from_onnx_text(text)
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"
    with pytest.raises(InputError) as info:
        ConvertOpsetPass(21)(model)
    message = str(info.value)
    assert "'node1' (BatchNormalization, opset 7)" in message
    assert "spatial must have value 1" in message
    assert "opset_version=21" in message  # the hint: export again at the target opset
