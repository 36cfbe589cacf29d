"""The bad inputs of the corpus, made in code: tiny models (good, corrupt and odd), data files, recipes.

:func:`make_corpus` writes every file into one folder; each test case runs in a copy of it. The
models are a few KB: MLP-sized graphs written as ONNX text (``onnx.parser``) or with
``onnx.helper`` where the text form cannot express the fault (a wrong-length scale, a missing
external data file).
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import onnx
from helpers import make_onnx, mlp_text
from onnx import TensorProto, helper, numpy_helper

# torch factories for `edgeq export` / `edgeq build` (imported from the case's folder)
FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    def tiny():
        return Tiny()

    def broken():
        raise RuntimeError("weights missing")

    def not_a_module():
        return 42

    not_callable = 42
    """
)

OTHER_INPUTS = f"""
<ir_version: 10, opset_import: ["" : 21]>
other (float[batch, 4] z) => (float[batch, 3] y) <float[4, 3] w = {{{", ".join(["0.5"] * 12)}}}>
{{
    y = MatMul(z, w)
}}
"""

CUSTOM_OP = """
<ir_version: 10, opset_import: ["" : 21, "com.example" : 1]>
custom (float[batch, 4] x) => (float[batch, 4] y)
{
    y = com.example.FancyOp(x)
}
"""

IMAGE_DECODER = """
<ir_version: 10, opset_import: ["" : 21]>
decoder (uint8[n] encoded) => (uint8[h, w, 3] image)
{
    image = ImageDecoder <pixel_format = "RGB"> (encoded)
}
"""

RECIPES = {
    "bad_key.toml": '[default]\nweights = "int8"\nbits = 8\n',
    "bad_syntax.toml": "[default\nweights = int8\n",
    "bad_type.toml": '[default]\nweights = "int8"\nblock = "32"\n',
    "bad_value.toml": '[default]\nweights = "int7"\n',
}


def _model(nodes, inputs, outputs, inits, opset=21) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def qdq_mlp(scale_len: int | None = None) -> onnx.ModelProto:
    """x: float[batch, 4] → MatMul with an int8 per-channel weight [4, 8] behind DequantizeLinear.

    ``scale_len`` gives the per-axis scale that many entries instead of 8: an invalid model the
    ONNX checker accepts and ONNX Runtime only rejects when the node runs.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = np.round(w / scale).astype(np.int8)
    if scale_len is not None:
        scale = np.resize(scale, scale_len)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], name="fc_w_dequantize", axis=1),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                  [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_s")])


def int4_conv() -> onnx.ModelProto:
    """A Conv whose weight is int4 blocks of 32: the .ort format cannot hold it (Android pre-flight)."""
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (4, 32, 1, 1))
    scale = np.full((4, 1, 1, 1), 0.01, np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], name="conv_w_dequantize",
                              axis=1, block_size=32),
             helper.make_node("Conv", ["image", "w_dq"], ["out"], name="conv")]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 32, 4, 4])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 4, 4])],
                  [helper.make_tensor("w_q", TensorProto.INT4, [4, 32, 1, 1], q.flatten().tolist()),
                   numpy_helper.from_array(scale, "w_s")])


def nan_weights(good: Path) -> onnx.ModelProto:
    model = onnx.load(str(good))
    for t in model.graph.initializer:
        if t.name == "w2":
            w = numpy_helper.to_array(t).copy()
            w[0, 0] = np.nan
            t.CopyFrom(numpy_helper.from_array(w, "w2"))
    return model


def make_corpus(folder: Path) -> Path:
    """Write every file the cases use into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder
    # models: the MLP (x: float[batch, 4] -> y: float[batch, 3]) and its bad twins
    tiny = Path(make_onnx(mlp_text(), f / "tiny.onnx"))
    data = tiny.read_bytes()
    (f / "empty.onnx").write_bytes(b"")
    (f / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (f / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(512))
    (f / "text.onnx").write_text("this is not a model\n")
    (f / "folder.onnx").mkdir()
    (f / "folder.onnx" / "model.onnx").write_bytes(data)
    (f / "notes.txt").write_text("not a model either\n")
    onnx.save(nan_weights(tiny), str(f / "nan_weights.onnx"))
    ext = onnx.load(str(tiny))
    for t in ext.graph.initializer:  # raw bytes: only those move to an external file
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    onnx.save(ext, str(f / "external.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=0)
    (f / "external.onnx.data").unlink()  # the weights file that should sit beside it is missing
    for opset in (11, 40):  # older than the QDQ forms edgeq writes need; newer than any ONNX release
        text = mlp_text().replace('"" : 21', f'"" : {opset}')
        onnx.save(onnx.parser.parse_model(text), str(f / f"opset{opset}.onnx"))
    dangling = onnx.parser.parse_model(mlp_text())
    dangling.graph.node[2].input[0] = "nope"  # Relu reads a tensor nothing makes
    onnx.save(dangling, str(f / "dangling.onnx"))
    make_onnx(OTHER_INPUTS, f / "other_inputs.onnx")
    custom = onnx.parser.parse_model(CUSTOM_OP)
    custom.graph.node[0].name = "fancy"
    onnx.save(custom, str(f / "custom_op.onnx"))
    make_onnx(IMAGE_DECODER, f / "image_decoder.onnx")
    onnx.save(qdq_mlp(), str(f / "qdq.onnx"))
    onnx.save(qdq_mlp(scale_len=5), str(f / "broken_dq.onnx"))
    onnx.save(int4_conv(), str(f / "int4_conv.onnx"))

    # data (feeds for tiny.onnx: x float32[batch, 4])
    rng = np.random.default_rng(1)
    good = rng.standard_normal((3, 4)).astype(np.float32)
    np.savez(f / "good.npz", x=good)
    np.savez(f / "zero.npz", x=np.zeros((0, 4), np.float32))
    np.savez(f / "nan.npz", x=np.where(np.arange(12).reshape(3, 4) == 5, np.nan, good).astype(np.float32))
    np.savez(f / "wrong_name.npz", image=good)
    np.savez(f / "wrong_dtype.npz", x=good.astype(np.float64))
    np.savez(f / "wrong_shape.npz", x=rng.standard_normal((3, 5)).astype(np.float32))
    np.savez(f / "wrong_rank.npz", x=good[0])
    np.savez(f / "extra_input.npz", x=good, mask=np.ones((3, 4), np.int64))
    np.savez(f / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    (f / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (f / "empty_dir").mkdir()
    (f / "empty_dir" / "README").write_text("no feeds here\n")
    (f / "mixed").mkdir()
    np.savez(f / "mixed" / "a.npz", x=good)
    np.savez(f / "mixed" / "b.npz", x=good.astype(np.int32))
    (f / "a_file.txt").write_text("a file, not a folder\n")

    for name, text in RECIPES.items():
        (f / name).write_text(text)
    (f / "my_models.py").write_text(FACTORIES)
    (f / "existing.onnx").write_text("precious\n")
    (f / "existing_dir").mkdir()
    (f / "existing_dir" / "keep.txt").write_text("precious\n")
    return f


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too) with a hash of its bytes.

    Python's own ``__pycache__`` (written when a case imports a factory module) is left out.
    """
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if "__pycache__" in rel.parts:
            continue
        out[str(rel)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
