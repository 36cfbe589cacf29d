"""Pre-flight for Android: every reason a QDQ ONNX model cannot ship as an ``.ort``, before
anything is written.

The checks, in order (each problem names the node, its op and what to do):

1. **Opsets and domains** against the profile's newest opset and the domains ONNX Runtime has
   kernels for (a custom domain needs a custom-op library linked into the app).
2. **Kernels**: each node must match a CPU kernel of this ONNX Runtime (``onnxruntime-android``
   is a full build with the same CPU kernels): op, domain, opset version and the element types of
   its inputs and outputs, read from ORT's own kernel registry and operator schemas.
3. **Weight formats** against the profile: a quantized weight (DequantizeLinear or
   GatherBlockQuantized on an initializer) feeding MatMul, Gemm, Conv or Gather must use a format
   the profile lists for that op (e.g. no int4 Conv: the ORT format stores no 4-bit tensors).
4. **Storable tensors**: a tensor of a type the ORT format has no code for (int4, uint4,
   float4e2m1) ships only when the converter packs it into MatMulNBits (a 4-bit weight behind a
   DequantizeLinear feeding MatMul/Gemm). Whether ORT packs each one is not guessed: the
   conversion's own optimizer runs (saving ONNX into a temporary folder) and every 4-bit weight
   it leaves is a problem (ORT 1.32 leaves a MatMul followed by Relu or Clip, for one).
   The written ``.ort`` is checked again after the conversion (:mod:`targets.android.convert`).
5. **Activation formats**: the zero-point type of each QuantizeLinear against the profile.

ORT's mobile usability checker (``onnxruntime.tools.check_onnx_model_mobile_usability``) does not
decide anything here: the package targets the CPU EP. Its NNAPI partition estimate is reported in
the manifest by :func:`nnapi_partitions` for users weighing NNAPI.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator

import onnx

from edgeq.errors import first_line
from edgeq.onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES
from edgeq.quant.profile import TargetProfile
from edgeq.quant.recipes import ActFormat, WeightFormat, exact_name_rule
from targets.android.ortformat import storable_types, type_name
from targets.base import Problem

ONNX_DOMAINS = ("", "ai.onnx")
_WEIGHT_FORMATS = {
    onnx.TensorProto.INT8: WeightFormat.INT8, onnx.TensorProto.UINT8: WeightFormat.INT8,
    onnx.TensorProto.INT4: WeightFormat.INT4, onnx.TensorProto.UINT4: WeightFormat.INT4,
    onnx.TensorProto.FLOAT4E2M1: WeightFormat.MXFP4,
}
_ACT_FORMATS = {onnx.TensorProto.UINT8: ActFormat.UINT8, onnx.TensorProto.INT8: ActFormat.INT8}
# a 4-bit weight reaches the .ort only packed into MatMulNBits: DequantizeLinear → these ops
_PACKED_4BIT_CONSUMERS = ("MatMul", "Gemm")
_REQUANTIZE = "quantize the float model again with `--profile android`: the plan then falls back to a format Android runs"


# --- ORT's registry ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _kernels() -> dict[tuple[str, str], list[tuple[int, int, dict[str, list[str]]]]]:
    """CPU kernels of this ONNX Runtime: (domain, op) → [(first version, last version, type constraints)]."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    out = defaultdict(list)
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            lo, hi = k.version_range
            out[(k.domain, k.op_name)].append((lo, hi, dict(k.type_constraints)))
    return dict(out)


@functools.lru_cache(maxsize=1)
def _schemas() -> dict[tuple[str, str], list]:
    """ORT's operator schemas (ONNX and contrib): (domain, op) → schemas by since_version."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    out = defaultdict(list)
    for s in C.get_all_operator_schema():
        out[(s.domain, s.name)].append(s)
    return {k: sorted(v, key=lambda s: s.since_version) for k, v in out.items()}


def kernel_domains() -> set[str]:
    return {d for d, _ in _kernels()}


def _schema_for(domain: str, op: str, opset: int):
    candidates = [s for s in _schemas().get((domain, op), []) if s.since_version <= opset]
    return candidates[-1] if candidates else None


def _is_function(domain: str, op: str, opset: int) -> bool:
    """Constant (stored as an initializer) and ONNX ops defined by a function body ORT expands."""
    if domain in ("", "ai.onnx.ml") and op == "Constant":
        return True
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return False
    return schema.has_function or schema.has_context_dependent_function


def _formal(params, i: int):
    if i < len(params):
        return params[i]
    if params and params[-1].option.name == "Variadic":
        return params[-1]
    return None


def _kernel_problem(node: onnx.NodeProto, domain: str, opset: int, types: dict[str, str]) -> str | None:
    """Why no CPU kernel runs ``node``, or None when one does."""
    kernels = _kernels().get((domain, node.op_type))
    shown = f"{domain + ':' if domain else ''}{node.op_type}"
    if not kernels:
        if _is_function(domain, node.op_type, opset):
            return None  # ORT inlines the function body; the conversion checks what it expands to
        return f"ONNX Runtime has no CPU kernel for {shown}"
    schema = _schema_for(domain, node.op_type, opset)
    if schema is None:
        return f"{shown} does not exist at opset {opset} of domain {domain or 'ai.onnx'}"
    since = schema.since_version
    versioned = [k for k in kernels if k[0] <= since <= k[1]]
    if not versioned:
        have = ", ".join(sorted({f"{lo}-{hi}" if hi < 2**30 else f"{lo}+" for lo, hi, _ in kernels}))
        return f"ONNX Runtime has no CPU kernel for {shown} version {since} (it has versions {have})"
    bound: dict[str, str] = {}
    for params, names in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(names):
            p = _formal(params, i)
            if name and p is not None and name in types:
                bound.setdefault(p.typeStr, types[name])
    for _, _, constraints in versioned:
        if all(t in constraints[c] for c, t in bound.items() if c in constraints):
            return None
    wanted = ", ".join(f"{c}={t}" for c, t in sorted(bound.items()))
    return f"no CPU kernel of {shown}-{since} takes {wanted}"


# --- the model --------------------------------------------------------------------------------

def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD_BYTES:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # contrib ops, partial models: keep what the file says
        return model


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _tensor_types(graph: onnx.GraphProto, into: dict[str, str]) -> None:
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            into[v.name] = f"tensor({type_name(v.type.tensor_type.elem_type)})"
    for t in graph.initializer:
        into[t.name] = f"tensor({type_name(t.data_type)})"
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    into[node.output[0]] = f"tensor({type_name(a.t.data_type)})"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def preflight(model: onnx.ModelProto, profile: TargetProfile) -> list[Problem]:
    """Every reason ``model`` cannot ship for ORT Mobile; empty when it can."""
    problems: list[Problem] = []
    opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
    problems += _opset_problems(model, opsets, profile)
    typed = _with_types(model)
    types: dict[str, str] = {}
    for g in _graphs(typed.graph):
        _tensor_types(g, types)
    known = kernel_domains()
    local = _local_functions(model)
    for g in _graphs(typed.graph):
        for i, node in enumerate(g.node):
            domain = "" if node.domain in ONNX_DOMAINS else node.domain
            if domain not in known or (domain, node.op_type) in local:
                continue  # unknown domains are reported once by _opset_problems; local functions are inlined
            why = _kernel_problem(node, domain, opsets.get(domain, 1), types)
            if why:
                problems.append(Problem(_node_label(node, i), node.op_type, why,
                                        "replace or decompose this op in the model (or re-export at another opset)"))
    weight_problems, flagged = _weight_problems(model, profile)
    problems += weight_problems
    problems += _unpacked_4bit(model, flagged)
    problems += _activation_problems(model, profile)
    return _dedupe(problems)


def _opset_problems(model: onnx.ModelProto, opsets: dict[str, int], profile: TargetProfile) -> list[Problem]:
    out = []
    onnx_opset = opsets.get("")
    if onnx_opset is not None and onnx_opset > profile.max_opset:
        out.append(Problem("", "opset", f"the model uses ONNX opset {onnx_opset}; target {profile.name} runs up to "
                                        f"opset {profile.max_opset}", "export at a lower opset (--opset)"))
    known = kernel_domains()
    local = _local_functions(model)
    users = defaultdict(list)
    for g in _graphs(model.graph):
        for node in g.node:
            d = "" if node.domain in ONNX_DOMAINS else node.domain
            if d not in known and (d, node.op_type) not in local:
                users[d].append(node)
    for d, nodes in users.items():
        names = ", ".join(repr(_node_label(n, 0)) for n in nodes[:5]) + (" ..." if len(nodes) > 5 else "")
        out.append(Problem(nodes[0].name, nodes[0].op_type,
                           f"custom domain {d!r} ({len(nodes)} node(s): {names}) has no kernels in ONNX Runtime Mobile",
                           "ship a custom-op library with the app, or replace these ops before packaging"))
    return out


def _local_functions(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """Functions defined in the model itself (ORT inlines them before anything runs)."""
    return {("" if f.domain in ONNX_DOMAINS else f.domain, f.name) for f in model.functions}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for g in _graphs(model.graph):
        for node in g.node:
            for name in node.input:
                if name:
                    out[name].append(node)
    return out


def _constants(model: onnx.ModelProto) -> Iterator[tuple[str, int]]:
    for g in _graphs(model.graph):
        for t in g.initializer:
            yield t.name, t.data_type
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        yield node.output[0], a.t.data_type


def _weight_problems(model: onnx.ModelProto, profile: TargetProfile) -> tuple[list[Problem], set[str]]:
    """Quantized weights in a format the profile does not list for their op, and other tensors
    the ORT format cannot store (except 4-bit MatMul/Gemm weights, see :func:`_unpacked_4bit`)."""
    storable = storable_types()
    consumers = _consumers(model)
    out, flagged = [], set()
    for name, dtype in _constants(model):
        fmt = _WEIGHT_FORMATS.get(dtype)
        unstorable = dtype not in storable
        for user in consumers.get(name, []):
            if user.op_type == "DequantizeLinear" and name in user.input[2:3] and name != user.input[0]:
                continue  # a zero point has its data's type: the data tensor speaks for both
            if user.op_type == "DequantizeLinear" and user.input[0] == name:
                targets = [(c, c.op_type) for c in consumers.get(user.output[0], [])]
            elif user.op_type == "GatherBlockQuantized" and user.input[0] == name:
                targets = [(user, "Gather")]
            else:
                targets = [(user, None)]
            for node, op in targets:
                if fmt is not None and op in profile.weight_formats and not profile.supports(op, fmt):
                    out.append(Problem(node.name, node.op_type, f"{fmt.value} weight {name!r}: {profile.why_not(op, fmt)}",
                                       _REQUANTIZE))
                    flagged.add(name)
                elif unstorable and not (user.op_type == "DequantizeLinear" and op in _PACKED_4BIT_CONSUMERS):
                    out.append(Problem(node.name, node.op_type,
                                       f"tensor {name!r} is {type_name(dtype)}, a type the ORT format (.ort) cannot store",
                                       _REQUANTIZE))
                    flagged.add(name)
    return out, flagged


def _unpacked_4bit(model: onnx.ModelProto, flagged: set[str]) -> list[Problem]:
    """4-bit weights ONNX Runtime will not pack into MatMulNBits, found by running its optimizer.

    The profile allows int4 MatMul/Gemm weights because the conversion packs them; ORT 1.32
    declines some (a MatMul followed by Relu or Clip, a transposed Gemm, ...). Running the
    conversion's optimizer, saving ONNX into a temporary folder, shows exactly which stay.
    """
    import tempfile
    from pathlib import Path

    from targets.android.convert import optimize_to_onnx

    storable = storable_types()
    left = {name for name, dtype in _constants(model) if dtype not in storable} - flagged
    if not left or model.ByteSize() >= EXTERNAL_DATA_THRESHOLD_BYTES:
        return []  # nothing to pack, or too big to pass in memory (the conversion checks its output)
    with tempfile.TemporaryDirectory(prefix="edgeq-preflight-") as tmp:
        try:
            optimized = optimize_to_onnx(model, Path(tmp) / "optimized.onnx")
        except Exception:
            return []  # ORT cannot load the model: the kernel checks above say why, or the conversion will
    consumers = _consumers(model)
    out = []
    for name, dtype in _constants(optimized):
        if name not in left or dtype in storable:
            continue
        for dq in consumers.get(name, []):
            if dq.op_type == "DequantizeLinear" and dq.input[0] != name:
                continue  # a zero point: reported with its data tensor
            for node in consumers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else [dq]:
                after = [c.op_type for c in consumers.get(node.output[0], [])]
                why = (f" (ONNX Runtime does not fuse it when a {after[0]} follows)"
                       if len(after) == 1 and after[0] in ("Relu", "Clip") else "")
                out.append(Problem(node.name, node.op_type,
                                   f"ONNX Runtime keeps the {type_name(dtype)} weight {name!r} unpacked{why}, "
                                   "and the ORT format (.ort) cannot store 4-bit tensors",
                                   "keep this node at int8 with a TOML recipe rule: "
                                   + exact_name_rule(node.name, 'weights = "int8"').strip().replace("\n", "  ")))
    return out


def _activation_problems(model: onnx.ModelProto, profile: TargetProfile) -> list[Problem]:
    zero_points = dict(_constants(model))
    out = []
    for g in _graphs(model.graph):
        for node in g.node:
            if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not node.input[2]:
                continue
            fmt = _ACT_FORMATS.get(zero_points.get(node.input[2], 0))
            if fmt is not None and fmt not in profile.activation_formats:
                out.append(Problem(node.name, node.op_type,
                                   f"{fmt.value} activations are not in target {profile.name}'s formats", _REQUANTIZE))
    return out


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        key = (p.node, p.op_type, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# --- NNAPI partitions (information, not a check) ----------------------------------------------

def nnapi_partitions(model: onnx.ModelProto) -> dict:
    """ORT's usability-checker estimate of how NNAPI would partition the QDQ model."""
    import logging

    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    typed = _with_types(model)
    out = {}
    for fixed in (True, False):
        try:
            info = uc.check_nnapi_partitions(typed, require_fixed_input_sizes=fixed)
        except Exception as e:  # the checker needs shape information it could not get
            out["as_is" if fixed else "with_fixed_shapes"] = {"error": first_line(e, 200)}
            continue
        out["as_is" if fixed else "with_fixed_shapes"] = {
            "nodes": info.num_nodes,
            "supported_nodes": info.num_supported_nodes,
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(info.unsupported_ops),
            "suitability": info.suitability().name,
        }
    return out
