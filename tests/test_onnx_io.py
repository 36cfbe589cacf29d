import os

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeq import onnx_io
from edgeq.errors import InputError


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found: .*missing.onnx"):
        onnx_io.read_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    with pytest.raises(InputError, match="corrupt.onnx"):
        onnx_io.read_onnx(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="no ONNX graph"):
        onnx_io.read_onnx(empty)
    with pytest.raises(InputError, match="folder"):
        onnx_io.read_onnx(tmp_path)


def test_io_specs_reads_dynamic_axes(mlp_onnx):
    (spec,) = onnx_io.io_specs(onnx.load(mlp_onnx))
    assert spec.name == "x" and spec.shape == ("batch", 4) and spec.dtype == "float32"
    (out,) = onnx_io.io_specs(onnx.load(mlp_onnx), outputs=True)
    assert out.name == "y"


def test_io_specs_names_unknown_and_negative_dims():
    # paddle2onnx writes -1 and "?" for dynamic axes (PP-OCR's classifier: x [-1, 3, ?, ?])
    model = onnx.parser.parse_model("""
<ir_version: 7, opset_import: ["" : 11]>
g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu(x) }
""")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1
    dims[2].dim_param = "?"
    dims[3].ClearField("dim_param")
    (spec,) = onnx_io.io_specs(model)
    assert spec.shape == ("x_dim0", 3, "x_dim2", "x_dim3")


def test_save_refuses_existing_and_unwritable(tmp_path, mlp_onnx):
    model = onnx_io.load_ir(mlp_onnx)
    with pytest.raises(InputError, match="already exists"):
        onnx_io.save_ir(model, mlp_onnx)
    onnx_io.save_ir(model, tmp_path / "no" / "such" / "m.onnx")  # missing folders are made
    assert (tmp_path / "no" / "such" / "m.onnx").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        onnx_io.save_ir(model, afile / "m.onnx")
    with pytest.raises(InputError, match="not writable"):
        onnx_io.save_ir(model, "/proc/m.onnx")  # a mount nobody can create files in, root included
    onnx_io.save_ir(model, mlp_onnx, force=True)


def test_failed_write_leaves_nothing(tmp_path, mlp_onnx):
    dest = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError):
        with onnx_io.atomic_output(dest) as tmp:
            (tmp / dest.name).write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def _big_model(n_tensors: int, elements: int) -> ir.Model:
    """y = x + sum of n constant vectors; zeros cost no RAM until written."""
    x = ir.Value(name="x", shape=ir.Shape([elements]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph(inputs=[x], outputs=[], nodes=[], opset_imports={"": 21}, name="big")
    prev = x
    for i in range(n_tensors):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor(np.zeros(elements, np.float32), name=f"w{i}"))
        graph.register_initializer(w)
        node = ir.node("Add", [prev, w], name=f"add{i}")
        graph.append(node)
        prev = node.outputs[0]
    prev.name = "y"
    prev.shape = ir.Shape([elements])
    prev.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(prev)
    return ir.Model(graph, ir_version=10)


def test_small_threshold_routes_through_external_data(tmp_path):
    model = _big_model(2, 1000)
    files = onnx_io.save_ir(model, tmp_path / "m.onnx", external_data_threshold=4000)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size >= 8000
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": np.ones(1000, np.float32)})[0]
    assert (out == 1).all()


def test_model_over_2gb_is_saved_with_external_data(tmp_path):
    # 3 x 760 MB of weights: past protobuf's 2 GiB limit, so it must go to external data.
    elements = 190_000_000
    model = _big_model(3, elements)
    assert onnx_io.tensor_bytes(model) > 2**31
    files = onnx_io.save_ir(model, tmp_path / "big.onnx")
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 1_000_000
    assert (tmp_path / "big.onnx.data").stat().st_size >= 3 * elements * 4
    proto = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_missing_parent_folders_are_made_when_writing_and_removed_when_it_fails(tmp_path):
    from edgeq.onnx_io import atomic_folder, atomic_output, check_output_folder, check_output_path

    dest = tmp_path / "dist" / "deep" / "android"
    check_output_folder(dest)  # checking creates nothing
    assert not (tmp_path / "dist").exists()
    with atomic_folder(dest) as tmp:
        (tmp / "model.ort").write_bytes(b"x")
    assert (dest / "model.ort").read_bytes() == b"x"
    out = tmp_path / "new" / "m.onnx"
    check_output_path(out)
    with pytest.raises(RuntimeError):
        with atomic_output(out):
            raise RuntimeError("the write failed")
    assert not (tmp_path / "new").exists()  # the folders made for it are gone again
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(InputError, match="file.txt is not a folder"):
        check_output_path(tmp_path / "file.txt" / "sub" / "m.onnx")
