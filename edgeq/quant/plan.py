"""The quantization plan: every decision as data, before any graph edit.

``make_plan`` walks the float graph, asks the recipe which spec each node gets (first matching
rule, else the default) and the target profile whether that format runs for that op, falling
back (mxfp4 → int4 → int8 → float) with the reason recorded. ``apply`` (the QDQ pass) only
carries the plan out; reports read it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from edgeq.quant.profile import FALLBACK, ONNXRUNTIME_CPU, TargetProfile
from edgeq.quant.recipes import Recipe, WeightFormat


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
    form: str = "dq"  # "dq": DequantizeLinear before the op; "gather_block_quantized": the fused Gather
    symmetric: bool = True  # int4: False = a zero point per block
    scale_dtype: str = "float32"  # "float16" halves the scales where the runtime allows it
    reason: str = ""
    rule: int | None = None


@dataclass(frozen=True)
class NodeNote:
    """A node left float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class QuantPlan:
    recipe: str
    profile: str
    weights: tuple[WeightDecision, ...]
    floats: tuple[NodeNote, ...]
    activations: tuple = field(default=())  # ActivationDecision, after calibration (W8A8)
    integer_nodes: tuple[str, ...] = ()  # ops without weights that run on quantized inputs (Add, Concat, ...)
    bias_corrected: tuple[str, ...] = ()  # nodes whose bias absorbed the mean error of weight rounding
    notes: tuple[NodeNote, ...] = ()  # adjustments worth knowing that leave a node quantized
    gptq: tuple[str, ...] = ()  # nodes whose weights GPTQ rounded (the rest: round to nearest)
    algorithms: tuple[str, ...] = ()  # one line per algorithm: what it did, or why it did not run

    def summary(self) -> dict:
        fmt = Counter(d.format.value for d in self.weights)
        out = {
            "recipe": self.recipe,
            "profile": self.profile,
            "weights": dict(sorted(fmt.items())),
            "float_nodes": len(self.floats),
            "fallbacks": sum(1 for d in self.weights if "fell back" in d.reason),
        }
        if self.activations:
            out["activations"] = dict(sorted(Counter(a.format.value for a in self.activations).items()))
            out["integer_ops"] = len(self.integer_nodes)
        if self.bias_corrected:
            out["bias_corrected"] = len(self.bias_corrected)
        if self.gptq:
            out["gptq"] = len(self.gptq)
        return out

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

    def explain(self, *, all_nodes: bool = False) -> str:
        """The plan as text: each weighted node's format or why it stays float."""
        lines = [f"plan: recipe {self.recipe}, profile {self.profile}"]
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
        for a in self.algorithms:
            lines.append(f"algorithm: {a}")
        if self.activations:
            lines.append(f"activations ({len(self.activations)} tensors quantized):")
            for a in self.activations:
                lines.append(f"  {a.tensor:<40} {a.format.value:<6} scale {a.scale:.4g} zp {a.zero_point:<4} "
                             f"[{a.lo:.4g}, {a.hi:.4g}]  {a.why}")
        s = self.summary()
        lines.append(f"summary: {s['weights']}; {s['fallbacks']} fallbacks"
                     + (f"; activations {s['activations']}, {s['integer_ops']} integer ops" if self.activations else ""))
        return "\n".join(lines)


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    return None


def _weight_site(node: ir.Node) -> tuple[int, ir.Value] | None:
    """The (input index, value) of the constant weight a node can quantize, if any."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    ins = list(node.inputs)
    if op == "MatMul" and len(ins) == 2 and _const(ins[1]) is not None and len(_const(ins[1]).shape) == 2:
        return 1, ins[1]
    if op == "Gemm" and len(ins) >= 2 and _const(ins[1]) is not None:
        return 1, ins[1]
    if op == "Conv" and len(ins) >= 2 and _const(ins[1]) is not None and len(_const(ins[1]).shape) in (3, 4):
        return 1, ins[1]
    if op == "Gather" and _const(ins[0]) is not None and len(_const(ins[0]).shape) == 2:
        axis = node.attributes.get_int("axis", 0)
        if axis == 0:
            return 0, ins[0]
    return None


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
    return None, False, f"{op} weights are not quantizable"


def make_plan(model: ir.Model, recipe: Recipe, *, profile: TargetProfile = ONNXRUNTIME_CPU) -> QuantPlan:
    """Decide, for every node, the weight format (or float and why)."""
    weights: list[WeightDecision] = []
    floats: list[NodeNote] = []
    seen_weights: dict[str, str] = {}
    for node in model.graph:
        name = node.name or f"{node.op_type}_{len(weights) + len(floats)}"  # callers name nodes first
        site = _weight_site(node)
        if site is None:
            floats.append(NodeNote(name, node.op_type, "no constant weight"))
            continue
        index, value = site
        spec, rule = recipe.spec_for(node.op_type, name)
        chosen_by = f"rule {rule}" if rule else "default"
        if spec.weights == WeightFormat.FLOAT:
            floats.append(NodeNote(name, node.op_type, f"excluded by {chosen_by}" if rule else "recipe default is float"))
            continue
        if value.name in seen_weights:
            floats.append(NodeNote(name, node.op_type, f"weight {value.name} is shared with {seen_weights[value.name]}; "
                                                       "quantized once there"))
            continue
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
            floats.append(NodeNote(name, node.op_type, reason))
            continue
        seen_weights[value.name] = name
        blocked = fmt in (WeightFormat.INT4, WeightFormat.MXFP4)
        int4 = fmt == WeightFormat.INT4
        weights.append(WeightDecision(
            node=name, op_type=node.op_type, input_index=index, weight=value.name, shape=shape, format=fmt,
            axis=axis, block=(spec.block if blocked else None), clip_search=spec.clip_search and fmt == WeightFormat.INT4,
            transpose=bool(transpose), reason=reason, rule=rule,
            form="gather_block_quantized" if node.op_type == "Gather" and fmt in profile.gather_block_quantized else "dq",
            # embedding tables are not fused into a kernel: symmetric with half-size scales saves
            # 0.7 MB on MiniLM; fused MatMul/Gemm/Conv blocks get a zero point (more accurate)
            symmetric=not (int4 and spec.asymmetric and node.op_type != "Gather"),
            scale_dtype="float16" if int4 and node.op_type in profile.fp16_scale_ops else "float32",
        ))
    return QuantPlan(recipe.name, profile.name, tuple(weights), tuple(floats))

