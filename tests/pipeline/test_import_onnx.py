"""The import stage on tiny models: every step reports what it did, outputs stay the same, a clean
model comes out byte for byte, and failures are errors a user can act on."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeq.errors import InputError
from edgeq.pipeline.import_onnx import import_onnx
from edgeq.validate.metrics import sqnr_db

MIN_SQNR_DB = 100.0  # BatchNorm folding only reorders float32 arithmetic (~140 dB here)


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _floats(rng, n):
    return ", ".join(f"{v:.6f}" for v in rng.standard_normal(n))


def _messy(path):
    """What paddle2onnx writes: opset 11, weights in Constant nodes, Conv + BatchNormalization,
    Dropout and Identity, -1 and ? dims, unnamed nodes."""
    rng = np.random.default_rng(0)
    var = ", ".join(f"{v:.4f}" for v in rng.uniform(0.5, 2.0, 4))
    text = f"""
    <ir_version: 6, opset_import: ["" : 11]>
    g (float[N, 3, H, W] x) => (float[N, 4] y)
    {{
        w = Constant <value = float[4, 3, 3, 3] {{{_floats(rng, 108)}}}> ()
        s = Constant <value = float[4] {{{_floats(rng, 4)}}}> ()
        b = Constant <value = float[4] {{{_floats(rng, 4)}}}> ()
        m = Constant <value = float[4] {{{_floats(rng, 4)}}}> ()
        v = Constant <value = float[4] {{{var}}}> ()
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        n = BatchNormalization <epsilon = 0.00001> (c, s, b, m, v)
        r = Relu (n)
        d = Dropout <ratio = 0.1> (r)
        i = Identity (d)
        p = ReduceMean <axes = [2, 3], keepdims = 0> (i)
        y = Softmax <axis = 1> (p)
    }}
    """
    proto = onnx.parser.parse_model(text)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1  # as paddle2onnx writes a dynamic batch
    dims[2].dim_param = dims[3].dim_param = "?"
    proto.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(proto, str(path))
    return proto


def test_a_messy_model_is_imported_step_by_step(tmp_path):
    path = tmp_path / "messy.onnx"
    original = _messy(path)
    result = import_onnx(path)
    model = result.model
    steps = {s.name: s for s in result.steps}
    assert list(steps) == ["convert opset", "remove Identity/Dropout", "fold constants", "fold BatchNormalization",
                           "name dynamic dims", "name nodes"]
    assert steps["convert opset"].detail.startswith("opset 11 → 21")
    assert "ReduceMean ×1" in steps["convert opset"].detail
    assert steps["remove Identity/Dropout"].changed == 2
    # the 5 weights and the converter's ReduceMean axes; Dropout's ratio went with the Dropout
    assert steps["fold constants"].detail.startswith(
        "6 Constant nodes became initializers; 1 Constant nodes were folded into other results or read by nothing")
    assert steps["fold BatchNormalization"].detail == "1 BatchNormalization folded into Conv ×1"
    assert steps["name dynamic dims"].detail.startswith("named 4 unknown: x[0] → x_dim0, x[2] → x_dim2")
    assert steps["name nodes"].changed == 4  # Conv, Relu, ReduceMean, Softmax had no name
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "ReduceMean", "Softmax"]
    assert [n.name for n in model.graph] == ["Conv_5", "Relu_7", "ReduceMean_12", "Softmax_13"]
    assert model.opset_imports[""] == 21 and all(v.is_initializer() for v in model.graph.node(0).inputs[1:])
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 9)).astype(np.float32)
    (want,), (got,) = _run(original, {"x": x}), _run(model, {"x": x})
    assert sqnr_db(want, got) >= MIN_SQNR_DB


def test_a_clean_model_comes_out_byte_for_byte(tmp_path):
    rng = np.random.default_rng(2)
    model = ir.from_onnx_text(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[batch, 8] x) => (float[batch, 4] y) <float[8, 4] w = {{{_floats(rng, 32)}}}, float[4] b = {{{_floats(rng, 4)}}}>
    {{
        h = MatMul (x, w)
        y = Add (h, b)
    }}
    """)
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"
    path, again = tmp_path / "clean.onnx", tmp_path / "again.onnx"
    ir.save(model, path)
    # without the intermediate's shape (edgeq's exporter writes them all) the folder infers it, and says so
    assert import_onnx(path).step("fold constants").detail.endswith("shapes inferred for 1 values that had none")
    h = model.graph.node(0).outputs[0]
    h.shape, h.dtype = ir.Shape(["batch", 4]), ir.DataType.FLOAT
    ir.save(model, path)
    result = import_onnx(path)
    assert not result.changed and all(s.changed == 0 for s in result.steps)
    assert result.step("fold constants").detail == "no Constant nodes and nothing computed from constants (2 initializers)"
    ir.save(result.model, again)
    assert again.read_bytes() == path.read_bytes()


def test_an_ir_model_is_imported_in_place():
    model = ir.from_onnx_text("""
    <ir_version: 6, opset_import: ["" : 11]>
    g (float[N, 4] x) => (float[N, 4] y) { y = Identity (x) }
    """)
    result = import_onnx(model)
    assert result.model is model and model.opset_imports[""] == 21


def test_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(InputError, match="not found"):
        import_onnx(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="opset from 13"):
        import_onnx(ir.from_onnx_text('<ir_version: 10, opset_import: ["" : 21]> g (float[2] x) => (float[2] y) '
                                      '{ y = Relu (x) }'), opset=11)
    path = tmp_path / "old.onnx"
    onnx.save(onnx.parser.parse_model("""
    <ir_version: 4, opset_import: ["" : 7]>
    g (float[1, 2, 3] x) => (float[1, 2, 3] y)
    <float[2, 3] s = {1, 1, 1, 1, 1, 1}, float[2, 3] b = {0, 0, 0, 0, 0, 0},
     float[2, 3] m = {0, 0, 0, 0, 0, 0}, float[2, 3] v = {1, 1, 1, 1, 1, 1}>
    { y = BatchNormalization <spatial = 0> (x, s, b, m, v) }
    """), str(path))
    with pytest.raises(InputError) as info:
        import_onnx(path)
    assert str(info.value).startswith(f"{path}: onnx's version converter cannot bring the node computing 'y' "
                                      "(BatchNormalization, opset 7) from opset 7 to 21")
