"""Where activation Q/DQ pairs go (W8A8), decided as data in two steps.

:func:`place_activations` is structural (no numbers): it starts from the *anchors* — nodes whose
weights the plan quantizes to int8 and whose recipe spec quantizes activations (Conv, MatMul,
Gemm) — and marks their activation inputs. It then walks backwards from every marked tensor:

- produced by a *fused activation* (Relu/Clip) right after an anchor: the anchor's output gets
  no Q/DQ (ONNX Runtime folds the activation into the integer kernel) and the range is kept
  inside the clip range;
- produced by an *integer op* (Add, Concat, pooling, ...; the profile lists them): the op is
  quantized too and its float inputs are marked — so integer ops are quantized exactly where
  their result feeds a quantized input, never as a dead end that only adds a requantize;
- produced by a *same-scale op* (Reshape, Transpose, MaxPool, ...): its input is marked and
  shares the output's scale, as does every input of a Concat;
- otherwise (a float op, a graph input): the tensor is quantized where it is.

Only the consumers that need a quantized input read the dequantized tensor; other readers keep
the float value (e.g. a residual branch beside a quantized MatMul). Consumers are nodes of the
main graph: a read inside an If's branches or a Loop's body is recorded as a read by that If or
Loop, whose subgraphs then read the dequantized value (silero-vad's If on its encoder output).

:func:`decide_activations` turns calibrated ranges into scales and zero points. A tensor whose
calibration saw masking constants (|x| >= 1e30, e.g. an attention mask of finfo.min) or no
finite value stays float, with its whole scale group, and the reason is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import onnx_ir as ir

from edgeq import meta
from edgeq.graph import subgraph_nodes
from edgeq.quant import formats
from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result
from edgeq.quant.calibrate import TensorRange, tensor_range
from edgeq.quant.observers import make_observer
from edgeq.quant.plan import ActivationDecision, AlgorithmResult, NodeNote, QuantPlan
from edgeq.quant.profile import TargetProfile
from edgeq.quant.recipes import ActFormat, CalibrationMethod, Recipe, WeightFormat


@dataclass(frozen=True)
class ActivationSite:
    """A tensor that will be quantized, before calibration."""

    tensor: str
    consumers: tuple[str, ...]  # node names that read the dequantized value
    group: str  # tensors with the same group share one scale and zero point
    format: ActFormat
    clip: tuple[float, float] | None = None  # a fused Relu/Clip bounds the range
    why: str = ""


@dataclass(frozen=True)
class Placement:
    sites: tuple[ActivationSite, ...]
    integer_nodes: tuple[str, ...]  # integer ops that run quantized
    notes: tuple[NodeNote, ...]  # anchors and integer ops left float, with the reason
    relays: tuple[tuple[str, str], ...] = ()  # (integer or same-scale node, the quantized tensor it produces)

    @property
    def tensors(self) -> list[str]:
        return [s.tensor for s in self.sites]


def _is_float(v: ir.Value | None) -> bool:
    if v is None or v.const_value is not None:
        return False
    return v.dtype in (None, ir.DataType.FLOAT)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, math.inf
    lo, hi = -math.inf, math.inf
    ins = list(node.inputs)
    if len(ins) > 1 and ins[1] is not None:
        if ins[1].const_value is None:
            return None
        lo = float(ins[1].const_value.numpy())
    if len(ins) > 2 and ins[2] is not None:
        if ins[2].const_value is None:
            return None
        hi = float(ins[2].const_value.numpy())
    if "min" in node.attributes:  # Clip before opset 11
        lo = node.attributes.get_float("min", lo)
        hi = node.attributes.get_float("max", hi)
    return lo, hi


# nodes a scaling or a protection inserted: never integer ops — their outputs are quantized as they are
_REWRITE_ROLES = (meta.Role.SCALING, meta.Role.PROTECT_MASK, meta.Role.PROTECT_ADD)


class _Groups:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def place_activations(model: ir.Model, plan: QuantPlan, recipe: Recipe, profile: TargetProfile) -> Placement:
    """Choose the tensors to quantize (structure only; see the module docstring)."""
    int8_weights = {d.node for d in plan.weights if d.format == WeightFormat.INT8}
    blocked = {d.node for d in plan.weights if d.format != WeightFormat.INT8}
    notes: list[NodeNote] = []
    need: dict[str, list[str]] = {}  # tensor -> consumer node names
    why: dict[str, str] = {}
    fmt: dict[str, ActFormat] = {}
    clip: dict[str, tuple[float, float]] = {}
    values: dict[str, ir.Value] = {}
    groups = _Groups()
    integer_nodes: list[str] = []
    relays: dict[str, str] = {}
    anchors: set[str] = set()
    work: list[str] = []
    owner = {id(s): n for n in model.graph for s in subgraph_nodes(n)}  # branch / body node -> its If / Loop

    def mark(v: ir.Value, consumer: ir.Node, reason: str, f: ActFormat) -> None:
        if v.is_graph_input() and not recipe.placement.quantize_model_inputs:
            return
        consumer = owner.get(id(consumer), consumer)
        if v.name not in need:
            need[v.name], why[v.name], fmt[v.name], values[v.name] = [], reason, f, v
            groups.find(v.name)
            work.append(v.name)
        if consumer.name not in need[v.name]:
            need[v.name].append(consumer.name)

    weighted = {d.node for d in plan.weights}
    for node in model.graph:
        if node.op_type not in profile.anchor_ops:
            if node.name in weighted and recipe.spec_for(node.op_type, node.name)[0].activations != ActFormat.FLOAT:
                notes.append(NodeNote(node.name, node.op_type, f"activations stay float: {profile.name} has no integer "
                                                               f"{node.op_type} kernel; its weights are quantized alone"))
            continue
        spec, _ = recipe.spec_for(node.op_type, node.name)
        if spec.activations == ActFormat.FLOAT:
            continue
        if node.name in blocked:
            notes.append(NodeNote(node.name, node.op_type, "activations stay float: quantized activations need int8 "
                                                           "weights, this node has blocked weights"))
            continue
        if node.name not in int8_weights:
            continue  # no constant weight, or the weight stays float: the plan already says why
        if profile.activation_formats and spec.activations not in profile.activation_formats:
            notes.append(NodeNote(node.name, node.op_type, f"{profile.name} does not run {spec.activations.value} activations"))
            continue
        anchors.add(node.name)
        x = node.inputs[0]
        if x is not None and x.is_graph_input() and not recipe.placement.quantize_model_inputs:
            notes.append(NodeNote(node.name, node.op_type, f"reads model input {x.name} in float "
                                                           "(recipe: quantize_model_inputs = false)"))
            continue
        if _is_float(x):
            mark(x, node, f"input of {node.op_type} {node.name}", spec.activations)

    def walk() -> None:
        while work:
            name = work.pop()
            v = values[name]
            p = v.producer()
            if p is None:
                continue
            if p.op_type in profile.fused_activations and p.inputs and p.inputs[0] is not None:
                src = p.inputs[0].producer()
                bounds = _clip_bounds(p)
                if (src is not None and src.name in anchors and bounds is not None and len(p.inputs[0].uses()) == 1
                        and not p.inputs[0].is_graph_output()):
                    clip[name] = bounds
                    why[name] += f"; {p.op_type} {p.name} fused into {src.op_type} {src.name}"
                    continue
            if (p.op_type in profile.integer_ops and p.domain in ("", "ai.onnx")
                    and meta.role_of(p.metadata_props) not in _REWRITE_ROLES):
                spec, rule = recipe.spec_for(p.op_type, p.name)
                ins = [i for i in p.inputs if i is not None]
                if spec.activations == ActFormat.FLOAT:
                    notes.append(NodeNote(p.name, p.op_type, f"excluded by rule {rule}" if rule else "recipe default is float"))
                    continue
                if any(i.const_value is not None or i.is_initializer() for i in ins):
                    notes.append(NodeNote(p.name, p.op_type, "has a constant operand: left float, its output is quantized"))
                    continue
                if not all(_is_float(i) for i in ins):
                    continue
                if p.name not in integer_nodes:
                    integer_nodes.append(p.name)
                relays[p.name] = name
                for i in ins:
                    mark(i, p, f"input of {p.op_type} {p.name}", fmt[name])
                    if p.op_type == "Concat":
                        groups.union(name, i.name)
                continue
            if p.op_type in profile.same_scale_ops and p.inputs and _is_float(p.inputs[0]):
                src = p.inputs[0]
                mark(src, p, f"input of {p.op_type} {p.name} (same scale as its output)", fmt[name])
                groups.union(name, src.name)
                relays[p.name] = name
                continue


    walk()
    # Anchors whose output must be quantized even where no consumer reads it quantized: ONNX Runtime
    # runs a Conv as QLinearConv only with a Q on both sides, else a float Conv that dequantizes its
    # weight every run (EfficientNet-Lite0's head Conv before ReduceMean: W8A8 1.80x → 2.01x float).
    for node in model.graph:
        if node.name not in anchors or node.op_type not in profile.quantized_outputs:
            continue
        out = node.outputs[0]
        users = out.uses()
        if len(users) == 1 and users[0].node.op_type in profile.fused_activations and not out.is_graph_output():
            out = users[0].node.outputs[0]  # after the fused Relu/Clip (its range is kept inside the clip)
        if out.name in need or out.is_graph_output() or not _is_float(out) or not out.uses():
            continue
        spec, _ = recipe.spec_for(node.op_type, node.name)
        for use in out.uses():
            mark(out, use.node, f"output of {node.op_type} {node.name} (the integer kernel needs it quantized)",
                 spec.activations)
    walk()

    sites = tuple(
        ActivationSite(t, tuple(need[t]), groups.find(t), fmt[t], clip.get(t), why[t])
        for t in _graph_order(model, need)
    )
    return Placement(sites, tuple(integer_nodes), tuple(notes), tuple(relays.items()))


def _graph_order(model: ir.Model, names) -> list[str]:
    order = [v.name for v in model.graph.inputs if v.name in names]
    for node in model.graph:
        order += [o.name for o in node.outputs if o.name in names]
    return order


def decide_activations(placement: Placement, ranges: dict[str, TensorRange]
                       ) -> tuple[tuple[ActivationDecision, ...], tuple[NodeNote, ...]]:
    """Scales and zero points from calibrated ranges.

    A group with masking constants (or no finite value) stays float; then every quantized input
    that only existed to feed it — through an integer or same-scale op — stays float too.
    """
    by_group: dict[str, list[ActivationSite]] = {}
    for s in placement.sites:
        by_group.setdefault(s.group, []).append(s)
    notes: list[NodeNote] = []
    dropped: set[str] = set()
    for group, sites in by_group.items():
        group_ranges = [ranges[s.tensor] for s in sites]
        bad = next((r for r in group_ranges if r.ignored or r.seen == 0), None)
        if bad is None:
            continue
        if bad.seen == 0:
            reason = f"tensor {bad.name} received no finite calibration value"
        else:
            reason = (f"tensor {bad.name} carries masking constants or non-finite values ({bad.ignored} of "
                      f"{bad.ignored + bad.seen} values, |x| >= 1e30): left float so the mask keeps its effect")
        for s in sites:
            dropped.add(s.tensor)
            notes += [NodeNote(c, "", f"input {s.tensor} left float: {reason}") for c in s.consumers]
    # Propagate: a consumer that relays into a dropped tensor no longer needs a quantized input.
    relay = dict(placement.relays)
    consumers = {s.tensor: list(s.consumers) for s in placement.sites}
    changed = True
    while changed:
        changed = False
        for s in placement.sites:
            if s.tensor in dropped:
                continue
            keep = [c for c in consumers[s.tensor] if relay.get(c) not in dropped]
            if len(keep) != len(consumers[s.tensor]):
                gone = [c for c in consumers[s.tensor] if c not in keep]
                notes += [NodeNote(c, "", f"runs in float: its output {relay[c]} stays float") for c in gone]
                consumers[s.tensor] = keep
                changed = True
            if not keep:
                dropped.add(s.tensor)
    notes = list(dict.fromkeys(notes))
    decisions: list[ActivationDecision] = []
    for group, sites in by_group.items():
        sites = [s for s in sites if s.tensor not in dropped]
        if not sites:
            continue
        group_ranges = [ranges[s.tensor] for s in sites]
        lo, hi = min(r.lo for r in group_ranges), max(r.hi for r in group_ranges)
        for s in sites:
            if s.clip is not None:  # keep the representable range inside the fused clip range
                lo, hi = max(lo, s.clip[0]), min(hi, s.clip[1])
        hi = max(hi, lo)
        fmt = sites[0].format
        if fmt == ActFormat.INT8:
            scale, zp = formats.quantize_int8_symmetric_per_tensor(lo, hi), 0
            q_lo, q_hi = -128 * scale, 127 * scale
        else:
            scale, zp = formats.quantize_uint8_per_tensor(lo, hi)
            q_lo, q_hi = (0 - zp) * scale, (255 - zp) * scale
        for s in sites:
            decisions.append(ActivationDecision(s.tensor, tuple(consumers[s.tensor]), group, fmt, scale, zp,
                                                q_lo, q_hi, s.why))
    order = {s.tensor: i for i, s in enumerate(placement.sites)}
    decisions.sort(key=lambda d: order[d.tensor])
    return tuple(decisions), tuple(notes)


def source_tensor(model: ir.Model, tensor: str) -> str:
    """The float-model tensor behind ``tensor``: through the Muls a scaling or a protection inserted."""
    values = {o.name: o for n in model.graph for o in n.outputs}
    v = values.get(tensor)
    while v is not None and v.producer() is not None and \
            meta.role_of(v.producer().metadata_props) in (meta.Role.SCALING, meta.Role.PROTECT_MASK):
        v = v.producer().inputs[0]
    return v.name if v is not None else tensor


class RangeStatistic:
    """A range observer as a calibration statistic: its result is the :class:`TensorRange` it chose."""

    def __init__(self, tensor: str, method: CalibrationMethod, options: dict):
        self.tensor, self.method = tensor, method
        self.observer = make_observer(method.value, tensor, **options)

    def update(self, x) -> None:
        self.observer.update(x)

    def state_nbytes(self) -> int:
        return self.observer.state_nbytes()

    def result(self) -> TensorRange:
        return tensor_range(self.tensor, self.observer, self.method.value)


class ActivationRanges(Algorithm):
    """W8A8 activation Q/DQ placement and scales, from calibrated ranges (always on when activations are quantized)."""

    name = "activation_ranges"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.quantizes_activations

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        cal = ctx.recipe.calibration
        options = {"percentile": cal.percentile} if cal.method == CalibrationMethod.PERCENTILE else {}
        placement = place_activations(ctx.model, plan, ctx.recipe, ctx.profile)
        return [Request("range", t, lambda t=t: RangeStatistic(t, cal.method, options)) for t in placement.tensors]

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        placement = place_activations(ctx.model, plan, ctx.recipe, ctx.profile)
        decisions, dropped = decide_activations(placement, stats.of_kind("range"))
        op_of = {n.name: n.op_type for n in ctx.model.graph}
        dropped = tuple(replace(n, op_type=n.op_type or op_of.get(n.node, "")) for n in dropped)
        decisions = tuple(replace(d, source=source_tensor(ctx.model, d.tensor)) for d in decisions)
        result = AlgorithmResult(
            self.name, f"{len(decisions)} activation tensors quantized ({ctx.recipe.calibration.method.value} ranges), "
                       f"{len(dropped)} consumers left reading float", ran=bool(decisions))
        plan = replace(plan, activations=decisions, floats=plan.floats + placement.notes + dropped,
                       integer_nodes=_still_integer(placement.integer_nodes, decisions))
        return add_result(plan, result)


def _still_integer(integer_nodes, decisions) -> tuple[str, ...]:
    """Integer ops all of whose quantized inputs survived calibration."""
    fed: dict[str, int] = {}
    for d in decisions:
        for c in d.consumers:
            fed[c] = fed.get(c, 0) + 1
    return tuple(n for n in integer_nodes if n in fed)
