"""FoldBatchNormPass: BatchNormalization folds into the weights before it; what stays says why."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from import_models import EXACT_SQNR_DB, assert_same_outputs, copy, floats, ops

from edgeq.passes.fold_batchnorm import FoldBatchNormPass


def _bn_params(rng, c: int) -> str:
    """scale, bias, mean and a positive variance for ``c`` channels, as initializer text."""
    var = ", ".join(f"{v:.6f}" for v in rng.uniform(0.2, 2.0, c))
    return (f"float[{c}] s = {{{floats(rng, c)}}}, float[{c}] b = {{{floats(rng, c)}}}, "
            f"float[{c}] m = {{{floats(rng, c)}}}, float[{c}] v = {{{var}}}")


def _named(text: str) -> ir.Model:
    model = ir.from_onnx_text(text)
    for node in model.graph:
        node.name = f"my_{node.op_type.lower()}"
    return model


CASES = {
    "conv": ("float[N, 3, 6, 6] x", "float[N, 4, 6, 6] y", "float[4, 3, 3, 3] w = {{{w}}}", 108,
             "c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = BatchNormalization <epsilon = 0.001> (c, s, b, m, v)", 4),
    "conv_bias": ("float[N, 3, 6, 6] x", "float[N, 4, 6, 6] y",
                  "float[4, 3, 1, 1] w = {{{w}}}, float[4] cb = {{0.1, -0.2, 0.3, 0.0}}", 12,
                  "c = Conv (x, w, cb)\n y = BatchNormalization (c, s, b, m, v)", 4),
    # paddle2onnx: ConvTranspose, then its bias as an Add of [1, C, 1, 1], then BatchNormalization
    "convtranspose_add": ("float[N, 4, 3, 3] x", "float[N, 6, 6, 6] y",
                          "float[4, 3, 2, 2] w = {{{w}}}, float[1, 6, 1, 1] ab = {{1, 2, 3, 4, 5, 6}}", 48,
                          "c = ConvTranspose <group = 2, strides = [2, 2]> (x, w)\n a = Add (c, ab)\n y = BatchNormalization (a, s, b, m, v)",
                          6),
    "gemm": ("float[N, 5] x", "float[N, 4] y", "float[4, 5] w = {{{w}}}", 20,
             "c = Gemm <transB = 1> (x, w)\n y = BatchNormalization (c, s, b, m, v)", 4),
    "matmul_add": ("float[N, 5] x", "float[N, 4] y", "float[5, 4] w = {{{w}}}, float[4] ab = {{1, 2, 3, 4}}", 20,
                   "c = MatMul (x, w)\n a = Add (ab, c)\n y = BatchNormalization (a, s, b, m, v)", 4),
    "matmul": ("float[N, 5] x", "float[N, 4] y", "float[5, 4] w = {{{w}}}", 20,
               "c = MatMul (x, w)\n y = BatchNormalization (c, s, b, m, v)", 4),
}


@pytest.mark.parametrize("case", CASES)
def test_batchnorm_folds_into_the_weights_before_it(case):
    x_type, y_type, weights, n, body, channels = CASES[case]
    rng = np.random.default_rng(0)
    model = _named(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g ({x_type}) => ({y_type}) <{weights.format(w=floats(rng, n))}, {_bn_params(rng, channels)}>
    {{
        {body}
    }}
    """)
    weighted = next(n for n in model.graph if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    before = copy(model)
    result = FoldBatchNormPass()(model)
    kind = "Gemm" if weighted.op_type == "MatMul" else weighted.op_type
    assert result.folded == {kind: 1} and not result.kept
    assert ops(model) == [kind]
    assert model.graph.node(0).name == weighted.name  # the name plans refer to
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    shape = [d if isinstance(d, int) else 2 for d in before.graph.inputs[0].shape]
    x = rng.standard_normal(shape).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=EXACT_SQNR_DB)


def test_batchnorm_that_cannot_fold_stays_with_the_reason():
    rng = np.random.default_rng(1)
    model = _named(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] z)
    <float[4, 4, 1, 1] w = {{{floats(rng, 16)}}}, {_bn_params(rng, 4)}>
    {{
        r = Relu (x)
        y = BatchNormalization (r, s, b, m, v)
        c1 = Conv (x, w)
        c2 = Conv (c1, w)
        z = BatchNormalization (c2, s, b, m, v)
    }}
    """)
    for node, name in zip(model.graph, ["relu", "bn_after_relu", "conv_a", "conv_b", "bn_shared_weight"]):
        node.name = name
    before = copy(model)
    result = FoldBatchNormPass()(model)
    assert not result.modified and result.folded == {}
    assert result.kept == (
        ("bn_after_relu", "it follows Relu 'relu', which has no weights to fold into"),
        ("bn_shared_weight", "Initializer 'w' is used by another node 'conv_a' outside the matched pattern."),
    )
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))
