"""Helpers of the import-pass tests: tiny models from ONNX text, run in ONNX Runtime, compared."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgeq.validate.metrics import sqnr_db

# Rewrites that only reorder float arithmetic (BatchNorm folding) stay far above this; an exact
# rewrite (renaming, removing copies, converting the opset) gives inf.
EXACT_SQNR_DB = 100.0


def floats(rng: np.random.Generator, n: int, scale: float = 1.0) -> str:
    """``n`` random values as ONNX text for an initializer."""
    return ", ".join(f"{v:.6f}" for v in rng.standard_normal(n) * scale)


def to_proto(model) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` (ir.Model or ModelProto) in ONNX Runtime's CPU provider."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_outputs(before, after, feeds: dict[str, np.ndarray], min_sqnr_db: float = EXACT_SQNR_DB) -> None:
    """Same number of outputs, same shapes, each at least ``min_sqnr_db`` against ``before``."""
    want, got = run(before, feeds), run(after, feeds)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        assert sqnr_db(w, g) >= min_sqnr_db, (sqnr_db(w, g), float(np.max(np.abs(w - g))))


def copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def ops(model: ir.Model) -> list[str]:
    """Op types of every node, subgraphs included, in order."""
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]
