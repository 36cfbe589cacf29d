"""Weights quantized / quantizable, read from the ONNX files themselves (not from edgeq's report).

Quantizable: every weight input of Conv, ConvTranspose, MatMul, Gemm, Gather (the table), GRU and
LSTM (W and R) in the *float* model that is constant — an initializer, a ``Constant`` node, or
computed from constants only (e.g. a Slice of an initializer); If/Loop bodies included, except the
branch of an ``If`` whose condition the model's static shapes decide (onnxscript's constant folding
removes it: silero-vad op15 carries a second LSTM for a state shape its input cannot have).
Quantized: the same weight inputs in a *quantized* model that read an integer constant through
``DequantizeLinear`` (possibly via Reshape/Transpose/...), plus the weights of ORT's integer
contrib ops (MatMulNBits, GatherBlockQuantized, QLinear*/…Integer).
By size: the elements of the weights read through ``DequantizeLinear`` against those of all weight
inputs of the quantized model (a count treats GE2E's 40-column input weights like its 1024×256 ones).
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,),
                "GRU": (1, 2), "LSTM": (1, 2), "RNN": (1, 2)}
INTEGER_OPS = {"MatMulNBits": 1, "GatherBlockQuantized": 1, "QLinearConv": 1, "QLinearMatMul": 1, "QGemm": 1,
               "ConvInteger": 1, "MatMulInteger": 1, "DynamicQuantizeLSTM": 2}
PASS_THROUGH = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Flatten"}
NON_CONSTANT = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _graphs(graph, outer: frozenset = frozenset()):
    """(graph, names constant in its scope) for the graph and every subgraph, outermost first."""
    const = set(outer) | {t.name for t in graph.initializer}
    changed = True
    while changed:  # constant propagation through nodes whose inputs are all constant
        changed = False
        for n in graph.node:
            if n.op_type in NON_CONSTANT or any(a.g.node or a.graphs for a in n.attribute):
                continue
            if all(not i or i in const for i in n.input) and not all(o in const for o in n.output):
                const.update(o for o in n.output if o)
                changed = True
    yield graph, const
    for n in graph.node:
        for a in n.attribute:
            subs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
            for g in subs:
                yield from _graphs(g, frozenset(const))


def _float_tables(graph) -> set[str]:
    """Initializers and Constant outputs that are float tensors of rank >= 2 (what a Gather table is;
    a Gather from a small integer constant is shape arithmetic, not a weight)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    out = {t.name for t in graph.initializer if t.data_type in floats and len(t.dims) >= 2}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats and len(a.t.dims) >= 2:
                    out.add(n.output[0])
    return out


def _producer_map(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _elements(graph) -> dict[str, int]:
    """Element counts of the initializers and Constant outputs of ``graph``."""
    out = {t.name: _prod(t.dims) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = _prod(a.t.dims)
    return out


def _prod(dims) -> int:
    p = 1
    for d in dims:
        p *= int(d)
    return p


def count(path) -> dict:
    """``{"slots": constant weight inputs, "dq": of them read through DequantizeLinear of an integer
    constant, "integer_ops": weights inside ORT integer/contrib ops, "float_ops": op types with a
    float constant weight left, "dq_elements" / "float_elements": the elements of the weights read
    through DequantizeLinear / left float, where a stored tensor holds them (None if some cannot be told)}``."""
    import onnx

    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    slots = dq = integer = 0
    float_ops: dict[str, int] = {}
    elements = {"dq": 0, "float": 0}
    unknown = False
    for graph, const in _graphs(model.graph):
        prod = _producer_map(graph)
        tables = _float_tables(graph)
        sizes = _elements(graph)
        for n in graph.node:
            if n.op_type in INTEGER_OPS:
                integer += INTEGER_OPS[n.op_type]
                continue
            for i in WEIGHT_SLOTS.get(n.op_type, ()):
                if i >= len(n.input) or n.input[i] not in const:
                    continue
                if n.op_type == "Gather" and n.input[i] not in tables and not _through_dq(n.input[i], prod):
                    continue
                slots += 1
                name, src = n.input[i], None
                while name in prod:
                    src = prod[name]
                    if src.op_type in PASS_THROUGH:
                        name = src.input[0]
                        continue
                    break
                if src is not None and src.op_type == "DequantizeLinear":
                    dq += 1
                    size = sizes.get(src.input[0])
                    kind = "dq"
                else:
                    float_ops[n.op_type] = float_ops.get(n.op_type, 0) + 1
                    size = sizes.get(name)
                    kind = "float"
                if size is None:
                    unknown = True
                else:
                    elements[kind] += size
    if integer:
        unknown = True  # packed integer contrib weights: not counted by size here
    return {"slots": slots, "dq": dq, "integer_ops": integer, "float_ops": float_ops,
            "dq_elements": None if unknown else elements["dq"], "float_elements": None if unknown else elements["float"]}


def _through_dq(name: str, prod: dict) -> bool:
    src = prod.get(name)
    return src is not None and src.op_type == "DequantizeLinear"


def _without_dead_branches(path: str | Path):
    """The float model with every ``If`` whose condition folds to a constant replaced by its branch
    (onnxscript's folder with ONNX shape inference); the file's own model when it has no ``If``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "If" for n in model.graph.node):
        return path
    import onnx_ir as ir
    import onnxscript.optimizer

    m = ir.from_proto(onnx.load(str(path)))
    onnxscript.optimizer.fold_constants(m, onnx_shape_inference=True)
    return ir.to_proto(m)


def summary(float_path: str | Path, quant_path: str | Path) -> dict:
    """Quantized weights of ``quant_path`` against the quantizable weights of ``float_path`` (its live branches)."""
    f, q = count(_without_dead_branches(float_path)), count(quant_path)
    quantized = q["dq"] + q["integer_ops"]
    share = None
    if q["dq_elements"] is not None and q["dq_elements"] + q["float_elements"]:
        share = q["dq_elements"] / (q["dq_elements"] + q["float_elements"])
    return {"quantized": quantized, "quantizable": f["slots"], "float_left": q["float_ops"],
            "size_share": share, "text": f"{quantized}/{f['slots']}"}
