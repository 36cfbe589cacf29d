"""NameDimsPass: every dynamic dim of the model's inputs and outputs becomes a valid, stable name."""

import numpy as np
import onnx
import onnx_ir as ir
from import_models import assert_same_outputs, copy
from onnx import helper as oh

from edgeq.passes.name_dims import NameDimsPass


def _model(inputs, outputs, value_info=()) -> ir.Model:
    """Relu of each input, dims given as ONNX helper shapes (ints, strings, None; -1 as an int)."""
    graph = oh.make_graph(
        [oh.make_node("Relu", [f"x{i}"], [f"y{i}"], name=f"relu{i}") for i in range(len(inputs))], "g",
        [oh.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, s) for i, s in enumerate(inputs)],
        [oh.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, s) for i, s in enumerate(outputs)])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    for name, shape in value_info:
        proto.graph.value_info.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    if any(d == "-1" for s in inputs + outputs for d in s):  # make_tensor_value_info refuses -1: set it by hand
        for vi in [*proto.graph.input, *proto.graph.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == "-1":
                    d.Clear()
                    d.dim_value = -1
    return ir.from_proto(proto)


def _dims(v: ir.Value) -> list:
    return [d if isinstance(d, int) else d.value for d in v.shape]


def test_odd_unknown_and_negative_dims_become_valid_distinct_names():
    # paddle2onnx and older exporters: dotted names, "?", -1, no name; the batch of x1 is on axis 1
    model = _model(
        inputs=[["p2o.DynamicDimension.0", 3, "?", "-1"], [2, "p2o.DynamicDimension.0", "batch size"], ["_n", None]],
        outputs=[["p2o.DynamicDimension.0", 3, "?", "-1"], [2, "p2o.DynamicDimension.0", "batch size"], ["-1", "4x"]])
    before = copy(model)
    result = NameDimsPass()(model)
    x0, x1, x2 = model.graph.inputs
    y0, y1, y2 = model.graph.outputs
    assert _dims(x0) == ["p2o_DynamicDimension_0", 3, "x0_dim2", "x0_dim3"]
    assert _dims(x1) == [2, "p2o_DynamicDimension_0", "batch_size"]  # the same original name, the same new one
    assert _dims(x2) == ["n", "x2_dim1"]
    assert _dims(y0) == ["p2o_DynamicDimension_0", 3, "y0_dim2", "y0_dim3"]  # unknowns are each their own axis
    assert _dims(y1) == _dims(x1)
    assert _dims(y2) == ["y2_dim0", "dim_4x"]
    assert result.renamed == {"p2o.DynamicDimension.0": "p2o_DynamicDimension_0", "batch size": "batch_size",
                              "_n": "n", "4x": "dim_4x"}
    # the same model gives the same names
    again = NameDimsPass()(copy(before))
    assert [_dims(v) for v in again.model.graph.inputs] == [_dims(v) for v in model.graph.inputs]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    rng = np.random.default_rng(0)
    feeds = {"x0": rng.standard_normal((2, 3, 4, 5)), "x1": rng.standard_normal((2, 2, 7)),
             "x2": rng.standard_normal((3, 1))}
    assert_same_outputs(before, model, {k: v.astype(np.float32) for k, v in feeds.items()}, min_sqnr_db=float("inf"))


def test_new_names_do_not_collide_with_existing_ones():
    model = _model(inputs=[["batch", "batch.", None]], outputs=[["batch", "batch.", "x0_dim2"]])
    NameDimsPass()(model)
    assert _dims(model.graph.inputs[0]) == ["batch", "batch_1", "x0_dim2_1"]
    assert _dims(model.graph.outputs[0]) == ["batch", "batch_1", "x0_dim2"]


def test_valid_names_and_expressions_on_intermediate_values_stay():
    # torch's exporter writes relations such as Min(512, sequence) on intermediate values
    model = _model(inputs=[["batch", "sequence"]], outputs=[["batch", "sequence"]],
                   value_info=[("hidden", ["batch", "Min(512, sequence)"])])
    proto = ir.to_proto(model).SerializeToString()
    result = NameDimsPass()(model)
    assert not result.modified and ir.to_proto(model).SerializeToString() == proto


def test_an_expression_on_an_input_or_output_is_renamed_everywhere():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[batch, S] x) => (float[batch, S] y)
    {
        r = Relu (x)
        y = Neg (r)
    }
    """)
    x, r, y = model.graph.inputs[0], model.graph.node(0).outputs[0], model.graph.outputs[0]
    x.shape = y.shape = ir.Shape(["batch", "2*s"])
    r.shape = ir.Shape(["p.q", "2*s"])  # an odd name that is no expression: renamed on intermediates too
    NameDimsPass()(model)
    assert _dims(x) == _dims(y) == ["batch", "dim_2_s"]
    assert _dims(r) == ["p_q", "dim_2_s"]


def test_generated_unknown_names_on_outputs_get_the_outputs_names_everywhere():
    # ONNX shape inference and tf2onnx write unk__N: equal dims share one, so the new name is shared too
    model = _model(inputs=[["unk__3", 4]], outputs=[["unk__3", 4]])
    result = NameDimsPass()(model)
    assert result.renamed == {"unk__3": "x0_dim0"}
    assert _dims(model.graph.outputs[0]) == ["x0_dim0", 4]


def test_negative_sizes_on_intermediate_values_become_unknown():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x) => (float[N, 4] y)
    {
        r = Relu (x)
        y = Neg (r)
    }
    """)
    model.graph.node(0).outputs[0].shape = ir.Shape([-1, 4])
    result = NameDimsPass()(model)
    assert result.cleared == 1
    assert model.graph.node(0).outputs[0].shape == ir.Shape([None, 4])
