"""Scoring QDQ-graph variants against the float model: what ``edgeq analyze`` and ``--budget`` share.

:func:`prepare_float` loads the float model (named as the quantizer names it) and the evaluation
feeds; an :class:`Evaluator` runs the float model once and then scores any variant on the same
feeds (worst output SQNR, mean per-sample cosine, top-1 agreement); :class:`Variants` derives
variants of one QDQ graph with chosen layers bypassed — a bypassed layer gets its float node back
(original weights and bias, with an input scaling's exact row scaling kept), or int8 weights in
place of int4, and a bypassed activation Q/DQ pair routes its consumer to the float tensor. The
edits edgeq made are found by their ``edgeq.role`` metadata (:mod:`edgeq.meta`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from edgeq import meta, onnx_io
from edgeq.errors import InputError
from edgeq.pipeline.quantize import load_model
from edgeq.quant.plan import WeightDecision
from edgeq.quant.recipes import WeightFormat
from edgeq.quant.weights import quantize_weight
from edgeq.runtime import ort_session
from edgeq.validate.compare import carry_state
from edgeq.validate.feeds import load_feeds
from edgeq.validate.metrics import TensorStats
from edgeq.validate.state import recurrent_state_pairs

PREFIX = "edgeq_analyze"
_MEMORY = "edgeq-memory"  # the external-data location of initializers handed to ONNX Runtime in memory
_MIN_SHARED_BYTES = 4096
# weights' dtypes that numpy (hence OrtValue.ortvalue_from_numpy) holds natively; int4/uint4/float4 stay in
# the proto, and so do integer tensors, which may be shapes or axes that shape inference must read
_SHAREABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class InMemoryModel:
    """A serialized model whose large initializers ONNX Runtime takes from memory (``OrtValue``s shared by
    every variant's session) instead of from the proto: analyze and --budget build ~80 variants of one
    model, and serializing and parsing its weights each time cost more than running some of them."""

    proto: bytes
    names: list[str] = field(default_factory=list)
    values: list = field(default_factory=list)

    def session(self, **kwargs):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.names:
            so.add_external_initializers(self.names, self.values)
        return ort_session(self.proto, options=so, **kwargs)


@dataclass(frozen=True)
class Score:
    sqnr_db: float  # worst output
    cosine: float  # worst output's mean per-sample cosine
    top1_agreement: float = float("nan")  # first output's argmax over the last axis agrees with the float model's

    def as_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "cosine": self.cosine}

    def metric(self, name: str) -> float:
        return {"sqnr": self.sqnr_db, "cosine": self.cosine, "top1_agreement": self.top1_agreement}[name]


def prepare_float(model, data, limit: int | None):
    """(model path, data, float model with edgeq's node names, evaluation feeds, their description).

    ``data`` defaults to the sample named like the model file (``minilm.onnx`` → ``minilm``).
    """
    from edgeq import sources

    model = Path(model)
    if not model.exists():
        raise InputError(f"model file not found: {model}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if data is None:
        if not sources.is_sample(model.stem):
            raise InputError("no evaluation data", hint="pass --data (a sample name, an .npz file or a folder of them)")
        data = model.stem
    float_ir = load_model(model)  # named as quantize_model names it, so nodes match across the two graphs
    float_proto = ir.to_proto(float_ir)
    del float_ir
    feeds, desc = load_feeds(data, onnx_io.io_specs(float_proto), split="evaluation", limit=limit)
    if not feeds:
        raise InputError(f"no feeds in {desc}")
    return model, data, float_proto, feeds, desc


class Evaluator:
    """Runs model variants on fixed evaluation feeds and scores them against the float model.

    A recurrent state output is scored as :mod:`edgeq.validate.compare` gates it: not on its own but
    through the other outputs of a second call from the state the variant returned."""

    def __init__(self, float_proto: onnx.ModelProto | None, feeds: list, *, _shared: Evaluator | None = None):
        self.feeds = feeds
        self.runs = 0
        if _shared is not None:  # a prefix of another evaluator's feeds: its reference, not a second float run
            self.outputs, self.states = _shared.outputs, _shared.states
            self.reference = _shared.reference[:len(feeds)]
            return
        self.outputs = [o.name for o in float_proto.graph.output]
        self.states = {o: i for i, o in recurrent_state_pairs(float_proto)}
        if not set(self.outputs) - set(self.states):
            self.states = {}  # only states: each is judged on its own
        self.reference = self.run(float_proto.SerializeToString())

    def subset(self, n: int | None) -> Evaluator:
        """An evaluator on the first ``n`` feeds (itself when that is all of them)."""
        if not n or n >= len(self.feeds):
            return self
        return Evaluator(None, self.feeds[:n], _shared=self)

    @property
    def has_class_scores(self) -> bool:
        """The first output has class scores on its last axis (what top-1 agreement reads)."""
        first = self.reference[0][0]
        return first.ndim >= 1 and first.shape[-1] > 1

    def run(self, model: bytes | InMemoryModel) -> list[list[np.ndarray]]:
        """Per feed, the outputs scored: all of them, or (with states) the other outputs of this call
        and of the call from the returned state."""
        if not isinstance(model, InMemoryModel):
            model = InMemoryModel(model)
        # spin=False: between runs this process scores outputs in numpy; spinning ORT threads would take its CPU
        sess = model.session(what=" (a variant of the quantized model)", spin=False)
        if not self.states:
            return [sess.run(self.outputs, f) for f in self.feeds]
        judged = [k for k, o in enumerate(self.outputs) if o not in self.states]
        out = []
        for f in self.feeds:
            first = sess.run(self.outputs, f)
            second = sess.run(self.outputs, carry_state(f, dict(zip(self.outputs, first)), self.states))
            out.append([first[k] for k in judged] + [second[k] for k in judged])
        return out

    def score(self, model: bytes | InMemoryModel) -> Score:
        results = self.run(model)
        self.runs += 1
        sq, cs = [], []
        for k in range(len(self.reference[0])):
            st = TensorStats()
            for ref, got in zip(self.reference, results):
                st.update(ref[k], got[k])
            sq.append(st.sqnr_db)
            cs.append(float(np.mean(st.cosines)) if st.cosines else float("nan"))
        agree = [np.argmax(r[0], axis=-1) == np.argmax(g[0], axis=-1) for r, g in zip(self.reference, results)
                 if r[0].ndim >= 1 and r[0].shape[-1] > 1]
        top1 = float(np.mean(np.concatenate([a.reshape(-1) for a in agree]))) if agree else float("nan")
        return Score(worst(sq), worst(cs), top1)


def _with_subgraph_nodes(node: onnx.NodeProto):
    """``node`` and every node inside its subgraphs (an If's branches, a Loop's body), at any depth."""
    yield node
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                yield from _with_subgraph_nodes(n)


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names ``node`` reads, its subgraphs' reads of the graph around them included (a name a
    subgraph makes itself is listed too: harmless where this decides what to keep)."""
    return {x for n in _with_subgraph_nodes(node) for x in n.input if x}


def _constant_inputs(float_proto: onnx.ModelProto) -> dict:
    """Tensor name -> a function making its float value, for initializers and for the transposed initializers
    a tied output layer reads (``MatMul(x, Transpose(table))``, as the causal LM export writes it)."""
    inits = {t.name: t for t in float_proto.graph.initializer}
    out = {name: (lambda t=t: numpy_helper.to_array(t)) for name, t in inits.items()}
    for n in float_proto.graph.node:
        if n.op_type == "Transpose" and n.input and n.input[0] in inits:
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            out[n.output[0]] = lambda t=inits[n.input[0]], perm=perm: np.ascontiguousarray(
                np.transpose(numpy_helper.to_array(t), perm))
    return out


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def worst(values: list[float]) -> float:
    if any(math.isnan(v) for v in values):
        return float("nan")
    return min(values) if values else float("nan")


def nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


class Variants:
    """Builds QDQ-graph variants with chosen layers (and activation Q/DQ pairs) bypassed."""

    def __init__(self, float_proto: onnx.ModelProto, qdq: onnx.ModelProto, plan):
        self.base = qdq
        graph = qdq.graph
        self.nodes = list(graph.node)
        float_nodes = {n.name: n for n in float_proto.graph.node}
        producer = {o: n for n in self.nodes for o in n.output}
        qdq_inits = {t.name: t for t in graph.initializer}
        # an activation Q/DQ pair: DequantizeLinear reading a QuantizeLinear's output -> the float tensor
        self.act_dq: dict[str, str] = {}
        for n in self.nodes:
            if n.op_type == "DequantizeLinear" and n.input[0] in producer \
                    and producer[n.input[0]].op_type == "QuantizeLinear":
                self.act_dq[n.output[0]] = producer[n.input[0]].input[0]
        index = {n.name: i for i, n in enumerate(self.nodes)}
        # a layer the weight pass replaced (a Gather by one node or a few: rows, scales, cast, scale; a tied
        # output layer by one MatMulNBits): found by its metadata; the float node takes the place of the
        # group's node that makes the layer's output
        for i, n in enumerate(self.nodes):
            props = meta.proto_props(n)
            source = props.get(meta.SOURCE)
            if meta.role_of(props) in (meta.Role.GATHER_QUANTIZED, meta.Role.WEIGHT) and source in float_nodes \
                    and float_nodes[source].output[0] in n.output:
                index[source] = i
        constant = _constant_inputs(float_proto)
        self.layers: list[str] = []
        self.float_node: dict[int, onnx.NodeProto] = {}  # index in the QDQ graph -> the float replacement
        self.layer_of: dict[int, str] = {}
        extra: list[onnx.TensorProto] = []
        self.decision = {d.node: d for d in plan.weights}
        self.float_weight: dict[int, tuple[int, np.ndarray]] = {}  # the layer's weight input (index, float array)
        self._int8: dict[int, tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.TensorProto]]] = {}
        for layer in dict.fromkeys(d.node for d in plan.weights):
            i = index.get(layer)
            if i is None or layer not in float_nodes:
                continue
            q, f = self.nodes[i], float_nodes[layer]
            node = onnx.NodeProto()
            node.CopyFrom(f)
            scale = self._smoothing_scale(q, producer, qdq_inits) if q.name == layer else None
            for k, name in enumerate(f.input):
                if name in constant:
                    arr = constant[name]()
                    if k == 1 and scale is not None and arr.ndim == 2 and arr.shape[0] == scale.shape[0]:
                        arr = (arr * scale[:, None]).astype(arr.dtype)  # SmoothQuant: diag(s) W, exact in float
                    new = f"{PREFIX}/{layer}/{name}"
                    extra.append(numpy_helper.from_array(arr, new))
                    node.input[k] = new
                    if k == self.decision[layer].input_index:
                        self.float_weight[i] = (k, arr)
                elif k < len(q.input) and q.name == layer:
                    node.input[k] = q.input[k]  # activations: the QDQ graph's tensor (maybe smoothed or Q/DQ'd)
            del node.output[:]
            node.output.extend(q.output)
            self.float_node[i] = node
            self.layer_of[i] = layer
            self.layers.append(layer)
        self.extra = extra
        self.outputs = {o.name for o in graph.output}
        self._shared: dict[str, tuple[onnx.TensorProto, object]] = {}  # name -> (stub, OrtValue)

    @staticmethod
    def _smoothing_scale(q, producer, inits) -> np.ndarray | None:
        """The per-row scale s when ``q``'s data input is a scaling ``Mul(x, 1/s)`` (possibly behind Q/DQ)."""
        if not q.input:
            return None
        t = q.input[0]
        p = producer.get(t)
        if p is not None and p.op_type == "DequantizeLinear":
            p = producer.get(p.input[0])
            if p is not None and p.op_type == "QuantizeLinear":
                p = producer.get(p.input[0])
        if p is None or meta.role_of(meta.proto_props(p)) != meta.Role.SCALING or p.input[1] not in inits:
            return None
        inv = numpy_helper.to_array(inits[p.input[1]]).astype(np.float32)
        return (1.0 / inv).astype(np.float32) if inv.ndim == 1 else None

    def _int8_node(self, i: int) -> tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.TensorProto]]:
        """(DequantizeLinear, the layer reading it, initializers): layer ``i`` with int8 per-channel weights."""
        if i not in self._int8:
            layer, node = self.layer_of[i], self.float_node[i]
            d = self.decision[layer]
            k, w = self.float_weight[i]
            axis = {"MatMul": 1, "Gemm": 0 if _attr(node, "transB") else 1}.get(d.op_type, 0)
            q = quantize_weight(w, WeightDecision(layer, d.op_type, k, d.weight, w.shape, WeightFormat.INT8, axis=axis))
            base = f"{PREFIX}/{layer}/int8"
            inits = [numpy_helper.from_array(q.data, f"{base}_data"), numpy_helper.from_array(q.scale, f"{base}_scale"),
                     numpy_helper.from_array(np.zeros(q.scale.shape, np.int8), f"{base}_zero_point")]
            dq = onnx.helper.make_node("DequantizeLinear", [t.name for t in inits], [f"{base}_weight"],
                                       name=f"{base}_dequantize", axis=axis)
            reader = onnx.NodeProto()
            reader.CopyFrom(node)
            reader.input[k] = dq.output[0]
            self._int8[i] = (dq, reader, inits)
        return self._int8[i]

    def build(self, quantized: set[str], act_owners: set[str] | None, float_acts: set[str] = frozenset(),
              int8: set[str] = frozenset()) -> bytes:
        """Serialized model: layers in ``quantized`` keep their quantized weights, the others get float ones
        (or, for layers in ``int8``, int8 per-channel weights rounded from the float ones).

        Activation Q/DQ pairs read by a node are kept when ``act_owners`` is None (all kept) or holds
        the reader, and never for readers in ``float_acts``.
        """
        return self._model(quantized, act_owners, float_acts, int8).SerializeToString()

    def build_in_memory(self, quantized: set[str], act_owners: set[str] | None, float_acts: set[str] = frozenset(),
                        int8: set[str] = frozenset()) -> InMemoryModel:
        """:meth:`build`'s model with its large initializers shared in memory (see :class:`InMemoryModel`)."""
        m = self._model(quantized, act_owners, float_acts, int8, stubs=True)
        names = [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        return InMemoryModel(m.SerializeToString(), names, [self._shared[n][1] for n in names])

    def _stub(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """``t`` itself, or (when large and numpy-typed) a stub pointing at an OrtValue made once."""
        if t.data_type not in _SHAREABLE or t.ByteSize() < _MIN_SHARED_BYTES or not t.dims \
                or t.data_location == onnx.TensorProto.EXTERNAL:  # (ORT reads a scalar OrtValue as shape [1])
            return t
        if t.name not in self._shared:
            import onnxruntime as ort

            stub = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type,
                                    data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value=_MEMORY)
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(numpy_helper.to_array(t)))
            self._shared[t.name] = (stub, value)
        return self._shared[t.name][0]

    def _model(self, quantized, act_owners, float_acts, int8, stubs: bool = False) -> onnx.ModelProto:
        nodes = []
        extra = []
        for i, n in enumerate(self.nodes):
            layer = self.layer_of.get(i)
            if layer is not None and layer in int8 and i in self.float_weight:
                dq, node, inits = self._int8_node(i)
                nodes.append(dq)
                extra.extend(inits)
            else:
                node = n if layer is None or layer in quantized else self.float_node[i]
            name = layer or node.name
            keep = (act_owners is None or name in act_owners) and name not in float_acts
            if not keep and any(x in self.act_dq for x in _reads(node)):
                node2 = onnx.NodeProto()
                node2.CopyFrom(node)
                for sub in _with_subgraph_nodes(node2):  # an If reads the value inside its branches
                    for k, x in enumerate(sub.input):
                        if x in self.act_dq:
                            sub.input[k] = self.act_dq[x]
                node = node2
            nodes.append(node)
        # drop nodes nothing reads any more (bypassed Q/DQ pairs, unused weight DequantizeLinear)
        needed = set(self.outputs)
        kept = []
        for n in reversed(nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(_reads(n))
        kept.reverse()
        m = onnx.ModelProto()
        m.CopyFrom(self._shell())
        m.graph.node.extend(kept)
        inits = [t for group in (self.base.graph.initializer, self.extra, extra) for t in group if t.name in needed]
        m.graph.initializer.extend([self._stub(t) for t in inits] if stubs else inits)
        return m

    def _shell(self) -> onnx.ModelProto:
        if not hasattr(self, "_shell_proto"):
            s = onnx.ModelProto()
            s.CopyFrom(self.base)
            del s.graph.node[:]
            del s.graph.initializer[:]
            del s.graph.value_info[:]
            self._shell_proto = s
        return self._shell_proto
