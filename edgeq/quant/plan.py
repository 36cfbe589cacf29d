"""The quantization plan: every decision as data, before any graph edit.

``make_plan`` walks the float graph, asks the recipe which spec each node gets (first matching
rule, else the default) and the target profile whether that format runs for that op, falling
back (mxfp4 → int4 → int8 → float) with the reason recorded. The algorithms
(:mod:`edgeq.quant.algorithms`) then add their decisions — which channels are protected or
scaled, which integer codes each weight gets, which biases are corrected or stored as int32 —
each with a result saying what it did (or why it did nothing) and what it cost. The apply
pipeline (:mod:`edgeq.pipeline.apply`) only carries the finished plan out; reports read it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from edgeq.quant.formats import QuantizedTensor
from edgeq.quant.profile import FALLBACK, ONNXRUNTIME_CPU, TargetProfile
from edgeq.quant.recipes import ActFormat, Recipe, WeightFormat


@dataclass(frozen=True)
class WeightDecision:
    """How one node's constant weight is stored."""

    node: str
    op_type: str
    input_index: int
    weight: str
    shape: tuple[int, ...]
    format: WeightFormat
    axis: int | None = None  # int8: the channel axis; int4/mxfp4: the block (reduction) axis
    block: int | None = None
    clip_search: bool = False
    transpose: bool = False  # Gemm transB=1 with blocks: store Wᵀ and set transB=0 (ORT fuses that form)
    form: str = "dq"  # how the op reads it: "dq" | "gather_rows" | "gather_block_quantized" (TargetProfile.gather_forms)
    # | "matmulnbits" (com.microsoft.MatMulNBits written directly: recipe gguf's kept int4 weights on ONNX Runtime)
    # | the tied-table forms (TargetProfile.tied_forms)
    accuracy_level: int = 4  # the MatMulNBits forms: ONNX Runtime's accuracy level (0: fp32 compute, 4: int8 activations)
    symmetric: bool = True  # int4: False = a zero point per block
    scale_dtype: str = "float32"  # "float16" halves the scales where the runtime allows it
    reason: str = ""
    rule: int | None = None


@dataclass(frozen=True)
class NodeNote:
    """A node left float (or adjusted), and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class Protection:
    """Channels ``channels`` of ``tensor`` bypass quantization for the MatMuls ``consumers``."""

    tensor: str
    consumers: tuple[str, ...]
    channels: np.ndarray  # int64, sorted
    scores: np.ndarray  # the score of each protected channel (× the 90th percentile)
    float_bytes: int  # the protected weight rows, float32
    macs_per_row: int  # extra multiply-adds per input row (token / pixel)

    def describe(self) -> str:
        chans = ", ".join(f"{int(c)} ({s:.0f}×)" for c, s in zip(self.channels, self.scores))
        return (f"{self.tensor}: channels {chans} for {', '.join(self.consumers)}; "
                f"+{self.float_bytes / 1024:.1f} KB float, +{self.macs_per_row} MACs per row")


@dataclass(frozen=True, eq=False)
class Scaling:
    """Divide ``tensor`` by ``scale`` for ``consumers`` and fold ``scale`` into their weight rows.

    ``algorithm`` says who decided it (``smoothing`` or ``awq``).
    """

    tensor: str
    consumers: tuple[str, ...]
    scale: np.ndarray  # [K], float32
    algorithm: str = "smoothing"


@dataclass(frozen=True)
class ActivationDecision:
    """A quantized activation tensor with its parameters."""

    tensor: str
    consumers: tuple[str, ...]
    group: str
    format: ActFormat
    scale: float
    zero_point: int
    lo: float  # the range the parameters represent (after widening to 0 and clipping)
    hi: float
    why: str = ""
    source: str = ""  # the float-model tensor it quantizes (differs when a scaling/protection made it)


@dataclass(frozen=True, eq=False)
class IntegerBias:
    """A W8A8 Conv/Gemm bias stored as int32 at scale ``s_in · s_w`` per output channel."""

    node: str
    data: np.ndarray  # int32
    scale: np.ndarray  # float32, one per output channel


@dataclass(frozen=True)
class ImportStep:
    """What one step of the import stage (edgeq.pipeline.import_onnx) did: ``changed`` things (0: nothing)."""

    name: str
    changed: int
    detail: str


@dataclass(frozen=True)
class AlgorithmResult:
    """What one algorithm did (or why it did nothing), and what it cost."""

    name: str  # protect | smoothing | awq | gptq | conv_rounding | bias_correction | integer_bias
    summary: str
    nodes: tuple[str, ...] = ()  # the nodes it changed
    details: tuple[str, ...] = ()  # one line per decision (e.g. each protected tensor)
    ran: bool = True

    def lines(self) -> list[str]:
        return [f"{self.name}: {self.summary}"] + [f"  {d}" for d in self.details]

    def as_dict(self) -> dict:
        return {"name": self.name, "ran": self.ran, "summary": self.summary, "nodes": list(self.nodes),
                "details": list(self.details)}


def _frozen(mapping: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class QuantPlan:
    recipe: str
    profile: str
    weights: tuple[WeightDecision, ...]
    floats: tuple[NodeNote, ...]
    activations: tuple[ActivationDecision, ...] = ()  # after calibration (W8A8)
    integer_nodes: tuple[str, ...] = ()  # ops without weights that run on quantized inputs (Add, Concat, ...)
    notes: tuple[NodeNote, ...] = ()  # adjustments worth knowing that leave a node quantized
    protections: tuple[Protection, ...] = ()  # applied first (edgeq.passes.protect)
    scalings: tuple[Scaling, ...] = ()  # applied next, in order (edgeq.passes.scale_inputs)
    codes: Mapping[str, QuantizedTensor] = field(default_factory=_frozen)  # weight name -> its integers
    biases: Mapping[str, np.ndarray] = field(default_factory=_frozen)  # node -> corrected float bias
    integer_biases: tuple[IntegerBias, ...] = ()  # W8A8 int32 biases
    algorithms: tuple[AlgorithmResult, ...] = ()
    weighted_float: tuple[str, ...] = ()  # one entry (its node) per constant weight the plan left float
    imported: tuple[ImportStep, ...] = ()  # what the import stage did to the model before planning

    def result(self, name: str) -> AlgorithmResult | None:
        return next((r for r in self.algorithms if r.name == name), None)

    def summary(self) -> dict:
        fmt = Counter({d.weight: d.format.value for d in self.weights}.values())  # a tied table counts once
        out = {
            "recipe": self.recipe,
            "profile": self.profile,
            "weights": dict(sorted(fmt.items())),
            "float_nodes": len(self.floats),
            "fallbacks": sum(1 for d in self.weights if "fell back" in d.reason),
        }
        blocks = Counter({d.weight: d.block for d in self.weights if d.format == WeightFormat.INT4}.values())
        if len(blocks) > 1:  # the block choice (edgeq.quant.block_choice) mixed block sizes
            out["int4_blocks"] = {f"block {b}": k for b, k in sorted(blocks.items())}
        if self.activations:
            out["activations"] = dict(sorted(Counter(a.format.value for a in self.activations).items()))
            out["integer_ops"] = len(self.integer_nodes)
        if self.biases:
            out["bias_corrected"] = len(self.biases)
        gptq = self.result("gptq")
        if gptq is not None and gptq.nodes:
            out["gptq"] = len(gptq.nodes)
        return out

    def coverage(self) -> dict:
        """How many weights got quantized, of how many constant weights the quantizable ops hold (shared ones once)."""
        quantized = len({d.weight for d in self.weights})
        return {"quantized": quantized, "quantizable": quantized + len(self.weighted_float)}

    def float_reasons(self, limit: int = 3) -> str:
        """Why weighted nodes stayed float, most common reasons first (for a one-line message)."""
        left = set(self.weighted_float)
        reasons = Counter(n.reason for n in self.floats if n.node in left)
        return "; ".join(f"{k} ({v} nodes)" for k, v in reasons.most_common(limit)) or "no node has a constant weight"

    def rows(self) -> list[dict]:
        rows = [
            {
                "node": d.node, "op": d.op_type, "weight": d.weight, "shape": list(d.shape),
                "format": d.format.value, "axis": d.axis, "block": d.block, "reason": d.reason,
            }
            for d in self.weights
        ]
        rows += [{"node": n.node, "op": n.op_type, "format": "float", "reason": n.reason} for n in self.floats]
        rows += [{"node": n.node, "op": n.op_type, "note": n.reason} for n in self.notes]
        rows += [
            {"tensor": a.tensor, "format": a.format.value, "scale": a.scale, "zero_point": a.zero_point,
             "range": [a.lo, a.hi], "consumers": list(a.consumers), "reason": a.why}
            for a in self.activations
        ]
        return rows

    def algorithm_lines(self) -> list[str]:
        """One line per algorithm (what it did or why not), each followed by its decisions."""
        return [line for r in self.algorithms for line in r.lines()]

    def as_dict(self) -> dict:
        """The plan for machines (``quantize --json``, ``build.json``)."""
        return {"summary": self.summary(), "plan": self.rows(),
                "import": [{"step": i.name, "changed": i.changed, "detail": i.detail} for i in self.imported],
                "algorithms": [r.as_dict() for r in self.algorithms],
                "protected": [{"tensor": p.tensor, "channels": [int(c) for c in p.channels],
                               "consumers": list(p.consumers), "float_bytes": p.float_bytes} for p in self.protections],
                "scaled": [{"tensor": s.tensor, "algorithm": s.algorithm, "consumers": list(s.consumers),
                            "max_scale": float(np.max(s.scale)), "scaled_channels": int(np.sum(s.scale != 1.0))}
                           for s in self.scalings],
                "quantized_tensors": [{"tensor": a.tensor, "source": a.source or a.tensor} for a in self.activations]}

    def explain(self, *, all_nodes: bool = False) -> str:
        """The plan as text: each weighted node's format or why it stays float."""
        lines = [f"plan: recipe {self.recipe}, profile {self.profile}"]
        for i in self.imported:
            if i.changed:
                lines.append(f"import: {i.name}: {i.detail}")
        if self.imported and not any(i.changed for i in self.imported):
            lines.append("import: the model needed no change")
        for d in self.weights:
            where = f" axis {d.axis}" + (f" block {d.block}" if d.block else "") if d.axis is not None else ""
            lines.append(f"  {d.node:<40} {d.op_type:<8} {d.format.value:<6}{where:<18} {d.reason}")
        weighted_float = [n for n in self.floats if n.reason != "no constant weight"]
        for n in weighted_float:
            lines.append(f"  {n.node:<40} {n.op_type:<8} float  {'':<18} {n.reason}")
        rest = Counter(n.op_type for n in self.floats if n.reason == "no constant weight")
        if rest:
            if all_nodes:
                for n in self.floats:
                    if n.reason == "no constant weight":
                        lines.append(f"  {n.node:<40} {n.op_type:<8} float  {'':<18} {n.reason}")
            else:
                lines.append("  other nodes (no constant weight): " + ", ".join(f"{k} {v}" for k, v in rest.most_common()))
        for n in self.notes:
            lines.append(f"  {n.node:<40} note: {n.reason}")
        for a in self.algorithm_lines():
            lines.append(f"algorithm: {a}")
        if self.activations:
            lines.append(f"activations ({len(self.activations)} tensors quantized):")
            for a in self.activations:
                lines.append(f"  {a.tensor:<40} {a.format.value:<6} scale {a.scale:.4g} zp {a.zero_point:<4} "
                             f"[{a.lo:.4g}, {a.hi:.4g}]  {a.why}")
        s = self.summary()
        lines.append(f"summary: {s['weights']}; {s['fallbacks']} fallbacks"
                     + (f"; int4 {s['int4_blocks']}" if "int4_blocks" in s else "")
                     + (f"; activations {s['activations']}, {s['integer_ops']} integer ops" if self.activations else ""))
        return "\n".join(lines)


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    return None


RECURRENT_OPS = ("GRU", "LSTM", "RNN")


@dataclass(frozen=True)
class TiedTable:
    """A table ``[V, D]`` read by one embedding Gather and, through ``Transpose(perm=[1, 0])``, by output MatMuls."""

    weight: str
    gather: str
    matmuls: tuple[str, ...]
    transposes: tuple[str, ...]


def tied_tables(model: ir.Model) -> dict[str, TiedTable]:
    """Tables tied between an embedding and an output layer (a language model's ``lm_head``), by gather node."""
    out = {}
    for v in model.graph.initializers.values():
        if v.const_value is None or len(v.const_value.shape) != 2:
            continue
        uses = list(v.uses())
        gathers = [u.node for u in uses if u.node.op_type == "Gather" and u.idx == 0
                   and u.node.attributes.get_int("axis", 0) == 0]
        transposes = [u.node for u in uses if u.node.op_type == "Transpose"
                      and list(u.node.attributes.get_ints("perm", [1, 0])) == [1, 0]]
        if len(gathers) != 1 or not transposes or len(gathers) + len(transposes) != len(uses):
            continue
        matmuls = [u for t in transposes for u in t.outputs[0].uses()]
        if any(u.node.op_type != "MatMul" or u.idx != 1 for u in matmuls) or \
                any(t.outputs[0].is_graph_output() for t in transposes) or not matmuls:
            continue
        out[gathers[0].name] = TiedTable(v.name, gathers[0].name, tuple(u.node.name for u in matmuls),
                                         tuple(t.name for t in transposes))
    return out


def weight_sites(node: ir.Node) -> list[tuple[int, ir.Value]]:
    """The (input index, value) of each constant weight a node can quantize (GRU/LSTM/RNN: W and R)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return []
    ins = list(node.inputs)

    def const(i: int, ranks: tuple[int, ...]) -> bool:
        return len(ins) > i and _const(ins[i]) is not None and len(_const(ins[i]).shape) in ranks

    if op == "MatMul" and len(ins) == 2 and const(1, (2,)):
        return [(1, ins[1])]
    if op == "Gemm" and const(1, (2,)):
        return [(1, ins[1])]
    if op in ("Conv", "ConvTranspose") and const(1, (3, 4)):
        return [(1, ins[1])]
    if op == "Gather" and const(0, (2,)) and node.attributes.get_int("axis", 0) == 0:
        return [(0, ins[0])]
    if op in RECURRENT_OPS:
        return [(i, ins[i]) for i in (1, 2) if const(i, (3,))]
    return []


def _layout(node: ir.Node, shape: tuple[int, ...], fmt: WeightFormat, block: int) -> tuple[int | None, bool, str | None]:
    """(axis, transpose, reason-if-impossible) for a weight of ``shape`` in ``fmt``."""
    op = node.op_type
    blocked = fmt in (WeightFormat.INT4, WeightFormat.MXFP4)
    if op == "MatMul":
        return (0 if blocked else 1), False, None  # W [K, N]: blocks along K, channels along N
    if op == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        if not blocked:
            return (0 if trans_b else 1), False, None
        return 0, bool(trans_b), None  # stored as [K, N], blocks along K
    if op == "Conv":
        if not blocked:
            return 0, False, None
        if shape[1] == 1:
            return None, False, "depthwise Conv has one input channel per group: no block along the reduction axis"
        return 1, False, None
    if op == "Gather":
        return (1 if blocked else 0), False, None  # table [V, D]: blocks along D, int8 one scale per row
    if op == "ConvTranspose":  # W [C_in, C_out / group, k...]: channels along axis 1, the reduction along 0
        if blocked and node.attributes.get_int("group", 1) != 1:
            return None, False, "grouped ConvTranspose: no block along the reduction axis"
        return (0 if blocked else 1), False, None
    if op in RECURRENT_OPS:  # W [dirs, gates·H, in], R [dirs, gates·H, H]: rows per gate unit, reduction last
        return (2 if blocked else 1), False, None
    return None, False, f"{op} weights are not quantizable"


def _decide(node: ir.Node, name: str, index: int, value: ir.Value, spec, rule, chosen_by: str,
            profile: TargetProfile) -> WeightDecision | NodeNote:
    """The format of one weight: the spec's, or the first fallback the profile runs (float: a note why)."""
    shape = tuple(int(d) for d in value.const_value.shape)
    fmt = spec.weights
    reason = f"{chosen_by}"
    axis = transpose = None
    while fmt != WeightFormat.FLOAT:
        if not profile.supports(node.op_type, fmt):
            why = profile.why_not(node.op_type, fmt)
            fmt, reason = FALLBACK[fmt], f"{why}: fell back to {FALLBACK[fmt].value}"
            continue
        axis, transpose, impossible = _layout(node, shape, fmt, spec.block)
        if impossible:
            fmt, reason = FALLBACK[fmt], f"{impossible}: fell back to {FALLBACK[fmt].value}"
            continue
        break
    if fmt == WeightFormat.FLOAT:
        return NodeNote(name, node.op_type, reason)
    form = profile.gather_forms.get(fmt, "dq") if node.op_type == "Gather" else "dq"
    if form == "gather_block_quantized" and fmt == WeightFormat.INT4 and shape[1] % 2:
        form = "dq"  # rows of odd length cannot be packed two codes per byte
        if not profile.supports("Gather", WeightFormat.INT8) or "dq" != profile.gather_forms.get(WeightFormat.INT4, "dq"):
            return _decide_fallback(node, name, index, value, spec, rule, profile,
                                    "int4 rows of odd length cannot be packed two per byte")
    blocked = fmt in (WeightFormat.INT4, WeightFormat.MXFP4)
    int4 = fmt == WeightFormat.INT4
    return WeightDecision(
        node=name, op_type=node.op_type, input_index=index, weight=value.name, shape=shape, format=fmt,
        axis=axis, block=(spec.block if blocked else None), clip_search=spec.clip_search and int4,
        transpose=bool(transpose), reason=reason, rule=rule,
        form=form,
        # embedding tables are not fused into a kernel: symmetric with half-size scales saves
        # 0.7 MB on MiniLM; fused MatMul/Gemm/Conv blocks get a zero point (more accurate)
        symmetric=not (int4 and spec.asymmetric and node.op_type != "Gather"),
        scale_dtype="float16" if int4 and node.op_type in profile.fp16_scale_ops else "float32",
    )


def _decide_tied(node: ir.Node, name: str, table: TiedTable, spec, rule, profile: TargetProfile
                 ) -> list[WeightDecision] | NodeNote:
    """One format for a tied table, blocked along D: a decision for the Gather and one per output MatMul,
    sharing the table's integers (both kernels read the same bytes). int4 gets a zero point per block when
    the spec is asymmetric (every tied form reads one: DequantizeLinear, GatherBlockQuantized, MatMulNBits);
    int8 stays symmetric (a GGUF's Q8_0 table exactly)."""
    shape = tuple(int(d) for d in node.inputs[0].const_value.shape)
    chosen_by = f"rule {rule}" if rule else "default"
    fmt, reason = spec.weights, chosen_by
    if rule is None and spec.tied_table is not None:
        fmt, reason = spec.tied_table, "recipe tied_table (the output layer reads this table)"
    while fmt not in (WeightFormat.FLOAT, WeightFormat.INT8, WeightFormat.INT4) or \
            (fmt != WeightFormat.FLOAT and not (profile.supports("Gather", fmt) and profile.supports("MatMul", fmt))):
        why = "a tied table is stored once as int8 or int4" if fmt == WeightFormat.MXFP4 else \
            profile.why_not("Gather" if not profile.supports("Gather", fmt) else "MatMul", fmt)
        fmt, reason = FALLBACK[fmt], f"{why}: fell back to {FALLBACK[fmt].value}"
    if fmt == WeightFormat.FLOAT:
        return NodeNote(name, node.op_type, reason if spec.weights != WeightFormat.FLOAT else
                        (f"excluded by {chosen_by}" if rule else "recipe default is float"))
    gather_form, matmul_form = profile.tied_forms.get(fmt, ("tied_dq", "tied_dq"))
    block = spec.block if fmt == WeightFormat.INT4 or gather_form == "tied_gbq" else None
    common = dict(input_index=0, weight=table.weight, shape=shape, format=fmt, axis=1 if block else 0, block=block,
                  clip_search=spec.clip_search and fmt == WeightFormat.INT4,
                  symmetric=not (fmt == WeightFormat.INT4 and spec.asymmetric), rule=rule)
    note = f"{reason}; tied with {', '.join(table.matmuls)} (one table, stored once)"
    out = [WeightDecision(node=name, op_type="Gather", form=gather_form, reason=note, **common)]
    for mm in table.matmuls:
        out.append(WeightDecision(node=mm, op_type="MatMul", form=matmul_form,
                                  reason=f"{reason}; reads the table tied with {name}", **{**common, "input_index": 1}))
    return out


def _decide_fallback(node, name, index, value, spec, rule, profile, why: str) -> WeightDecision | NodeNote:
    """:func:`_decide` one step down the fallback ladder, with ``why`` as the reason."""
    from dataclasses import replace as _replace

    lower = _replace(spec, weights=FALLBACK[spec.weights])
    d = _decide(node, name, index, value, lower, rule, f"{why}: fell back to {lower.weights.value}", profile)
    return d


def make_plan(model: ir.Model, recipe: Recipe, *, profile: TargetProfile = ONNXRUNTIME_CPU) -> QuantPlan:
    """Decide, for every node, the weight format (or float and why)."""
    weights: list[WeightDecision] = []
    floats: list[NodeNote] = []
    weighted_float: list[str] = []
    notes: list[NodeNote] = []
    seen_weights: dict[str, str] = {}
    tied = tied_tables(model)
    tied_readers = {n for t in tied.values() for n in (*t.matmuls, *t.transposes)}
    for node in model.graph:
        name = node.name or f"{node.op_type}_{len(weights) + len(floats)}"  # callers name nodes first
        if name in tied_readers:
            continue  # decided with its table's Gather
        if name in tied:
            spec, rule = recipe.spec_for(node.op_type, name)
            decided = _decide_tied(node, name, tied[name], spec, rule, profile)
            if isinstance(decided, NodeNote):
                floats.append(decided)
                weighted_float.append(name)
            else:
                weights.extend(decided)
                seen_weights[tied[name].weight] = name
            continue
        sites = weight_sites(node)
        if not sites:
            floats.append(NodeNote(name, node.op_type, "no constant weight"))
            continue
        spec, rule = recipe.spec_for(node.op_type, name)
        chosen_by = f"rule {rule}" if rule else "default"
        if spec.weights == WeightFormat.FLOAT:
            floats.append(NodeNote(name, node.op_type, f"excluded by {chosen_by}" if rule else "recipe default is float"))
            weighted_float.extend([name] * len(sites))
            continue
        for index, value in sites:
            if value.name in seen_weights:
                floats.append(NodeNote(name, node.op_type, f"weight {value.name} is shared with "
                                                           f"{seen_weights[value.name]}; quantized once there"))
                continue
            decision = _decide(node, name, index, value, spec, rule, chosen_by, profile)
            if isinstance(decision, NodeNote):
                floats.append(decision)
                weighted_float.append(name)
                continue
            seen_weights[value.name] = name
            weights.append(decision)
            slow = profile.slow_weight_only.get(node.op_type)
            if slow and (spec.activations == ActFormat.FLOAT or node.op_type not in profile.anchor_ops
                         or decision.format != WeightFormat.INT8):
                notes.append(NodeNote(name, node.op_type, f"weight-only: {slow}"))
    return QuantPlan(recipe.name, profile.name, tuple(weights), tuple(floats), notes=tuple(notes),
                     weighted_float=tuple(weighted_float))

