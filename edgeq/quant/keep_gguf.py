"""Keep a GGUF file's own integers (recipe ``gguf``, algorithm ``keep_gguf``): no second rounding.

A model exported from a GGUF is the file's integers dequantized. Re-quantizing it rounds those
values again (SmolLM2 W4A16: perplexity ×1.136 of float, where llama.cpp on the file is +0.5 %).
This handler finds each planned weight's rows in the file (:class:`~edgeq.quant.gguf_blocks.GGUFRows`,
by exact float32 value) and, when they are Q4_0, Q4_1 or Q8_0 blocks the target can read, sets the
weight's codes to the file's and its decision to their format:

- Q8_0 → int8, symmetric, blocks of 32 along the input dimension (a tied embedding/output table:
  the tied-table form, ``GatherBlockQuantized`` + ``MatMulNBits`` sharing bytes on ONNX Runtime);
- Q4_0 → int4 ``q − 8``, symmetric, blocks of 32 (exact: DequantizeLinear's ``(q − 0)·d``);
- Q4_1 → int4 ``q − 8`` at scale ``d`` plus a float offset ``m + 8d`` per block
  (:class:`~edgeq.quant.gguf_blocks.BlockOffsetTensor`; see :mod:`edgeq.passes.weight_qdq` for its
  graph form); MatMul weights only — an embedding lookup has no per-block offset form.

On ONNX Runtime profiles the int4 weights are written as MatMulNBits at the recipe's accuracy level
(default 0: fp32 compute, the file's values exactly; 4: int8 activations as llama.cpp computes, faster)
(their scales, and Q4_1's offsets, stored as the file's float16 read through Casts, or as float32 with
``float32_constants``: an .ort is not optimized again at load, so those Casts run on every call) and Q8_0
weights run with int8 activations (ORT's 8-bit MatMulNBits in fp32 has no fast kernel: 60×
slower, measured on 576 × 49152).

Everything else keeps the recipe's decision and is rounded by the recipe's algorithms (GPTQ, then
nearest), with the reason in the plan: K-quant and other types, float tensors, formats the target
does not run, weights no file row equals.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import MappingProxyType

import numpy as np

from edgeq.errors import InputError
from edgeq.quant.algorithms import Algorithm, Context, Stage, Stats, add_result
from edgeq.quant.gguf_blocks import BLOCK, GGUF_FILE_KEY, KEPT_TYPES, GGUFRows, to_quantized
from edgeq.quant.plan import AlgorithmResult, QuantPlan, WeightDecision
from edgeq.quant.recipes import KeepGGUFConfig, WeightFormat

K_QUANTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"})
_K_QUANT_WHY = ("256-value super-blocks whose sub-blocks carry 6- or 8-bit scales of a float16 super-scale: "
                "no DequantizeLinear or MatMulNBits form")


def _type_reason(qtype: str) -> str:
    if qtype in K_QUANTS:
        return f"GGUF {qtype} is a K-quant ({_K_QUANT_WHY})"
    if qtype in ("F32", "F16", "BF16"):
        return f"the GGUF stores it as {qtype} (not block-quantized)"
    return f"GGUF {qtype} has no DequantizeLinear or MatMulNBits form (edgeq keeps {', '.join(KEPT_TYPES)})"


class KeepGGUF(Algorithm):
    """Codes for the weights the GGUF holds as Q4_0/Q4_1/Q8_0 blocks (config :class:`KeepGGUFConfig`)."""

    name = "keep_gguf"
    config_type = KeepGGUFConfig
    needs_data = False

    def stage(self, recipe) -> Stage:
        return Stage.PREPASS  # before anything observes or rounds: later handlers see the kept codes

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        cfg = ctx.recipe.algorithms.keep_gguf or KeepGGUFConfig()
        path = cfg.file or ctx.model.metadata_props.get(GGUF_FILE_KEY, "")
        if not path:
            raise InputError("recipe keep_gguf needs the GGUF file the model's weights came from, and this model "
                             "does not name one",
                             hint="export it from the .gguf (edgeq export model.gguf), or name the file: "
                                  "[algorithms] keep_gguf = {file = \"model.gguf\"}")
        rows = GGUFRows(path)
        inits = ctx.model.graph.initializers
        decisions = list(plan.weights)
        codes = dict(plan.codes)
        by_weight: dict[str, list[int]] = {}
        for i, d in enumerate(decisions):
            if d.weight not in codes:
                by_weight.setdefault(d.weight, []).append(i)
        kept: Counter = Counter()
        details, requantized = [], []
        for weight, idx in by_weight.items():
            ds = [decisions[i] for i in idx]
            w = inits[weight].const_value.numpy()
            outcome = _keep(ds, w, rows, ctx.profile, cfg.accuracy_level, cfg.float32_constants)
            if isinstance(outcome, str):
                requantized.append(weight)
                details.append(f"{weight}: re-quantized by the recipe: {outcome}")
                for i in idx:
                    decisions[i] = replace(decisions[i], reason=f"re-quantized: {outcome}; {decisions[i].reason}")
                continue
            new, q, qtype, names = outcome
            codes[weight] = q
            kept[qtype] += 1
            extra = f" ({q.inexact_offsets} block offsets rounded in float32)" if getattr(q, "inexact_offsets", 0) else ""
            details.append(f"{weight}: kept GGUF {qtype} {' + '.join(names)}{extra}")
            for i, d in zip(idx, new):
                decisions[i] = d
        made = ", ".join(f"{t} ×{k}" for t, k in sorted(kept.items()))
        summary = (f"kept {sum(kept.values())} weights as {rows.path.name}'s own integers ({made or 'none'}); "
                   f"{len(requantized)} re-quantized by the recipe")
        plan = replace(plan, weights=tuple(decisions), codes=MappingProxyType(codes))
        return add_result(plan, AlgorithmResult(self.name, summary, tuple(d.node for d in decisions
                                                                         if d.weight in codes), tuple(details)))


def _runs_matmulnbits(profile) -> bool:
    """The profile's runtime is ONNX Runtime with its contrib kernels: it reads tied tables with MatMulNBits."""
    return any("tied_matmulnbits" in forms for forms in profile.tied_forms.values())


def _keep(ds: list[WeightDecision], w: np.ndarray, rows: GGUFRows, profile, accuracy_level: int,
          float32_constants: bool = False):
    """(new decisions, codes, GGUF type, source tensor names) for one weight read by decisions ``ds``, or why not.

    A MatMulNBits weight's ``scale_dtype`` says how its constants are stored: ``float16`` (the file's bytes, widened
    by Casts at run time) or, with ``float32_constants``, ``float32`` (no Cast at run time)."""
    d0 = ds[0]
    if w.ndim != 2:
        return f"a rank-{w.ndim} weight ({d0.op_type}): GGUF rows match 2-D weights"
    tied = d0.form.startswith("tied_")
    if d0.transpose:
        w = w.T
    axis = 1 if d0.op_type == "Gather" or tied else 0  # the block (input) axis of the weight as stored
    if w.shape[axis] % BLOCK:
        return f"its input dimension {w.shape[axis]} is not a multiple of {BLOCK}"
    sources = rows.find(w.T if axis == 0 else w)
    found = [s for s in sources if s is not None]
    if len(found) < len(sources):
        unread = sorted({rows.types[t] for t in rows.skipped})
        why = (f"or in a tensor of a type the gguf package cannot dequantize: {', '.join(unread)}" if unread
               else "changed by the export or an import step")
        return f"{len(sources) - len(found)} of its {len(sources)} rows equal no row of the GGUF ({why})"
    types = sorted({rows.types[s.tensor] for s in found})
    names = list(dict.fromkeys(s.tensor for s in found))
    if len(types) > 1:
        return f"its rows come from GGUF tensors of different types ({', '.join(types)}: {', '.join(names)})"
    qtype = types[0]
    if qtype not in KEPT_TYPES:
        return f"{' + '.join(names)}: {_type_reason(qtype)}"
    fmt = WeightFormat.INT8 if qtype == "Q8_0" else WeightFormat.INT4
    if tied and fmt == WeightFormat.INT8 and d0.format == WeightFormat.INT4:
        return f"{' + '.join(names)} ({qtype}): the recipe's tied_table asks int4 (the table costs half the bytes)"
    why = _form_problem(ds, fmt, qtype, tied, profile)
    if why:
        return f"{' + '.join(names)} ({qtype}): {why}"
    blocks = rows.blocks(found)
    if not np.array_equal(blocks.dequantize(), w.T if axis == 0 else w):  # found by digest: confirm the values
        return f"{' + '.join(names)}: its values differ from the file's dequantized blocks"
    half = fmt == WeightFormat.INT4 and d0.scale_dtype == "float16"  # GGUF scales are float16: exact either way
    q = to_quantized(blocks, axis, scale_dtype=np.float16 if half else np.float32)
    reason = f"kept: GGUF {qtype} {' + '.join(names)} (the file's integers, bit for bit)"
    new = []
    for d in ds:
        form = d.form
        if d.op_type == "Gather" and not tied:
            form = profile.gather_forms.get(fmt, "dq")
        elif tied:
            gather_form, matmul_form = profile.tied_forms.get(fmt, ("tied_dq", "tied_dq"))
            form = gather_form if d.op_type == "Gather" else matmul_form
        elif d.op_type == "MatMul" and fmt == WeightFormat.INT4 and _runs_matmulnbits(profile):
            # written as MatMulNBits at the recipe's accuracy level (ONNX Runtime's DequantizeLinear → MatMul
            # fusion would take the session's, 4 by default: int8 activations, +0.5 % perplexity on SmolLM2)
            form = "matmulnbits"
        nbits = form == "matmulnbits"
        scale_dtype = ("float32" if float32_constants else "float16") if nbits else d.scale_dtype
        how = (f"; its scales{' and offsets' if qtype == 'Q4_1' else ''} stored as "
               + ("float32 (no Cast at run time)" if float32_constants else "the file's float16, cast at run time")
               if nbits else "")
        new.append(replace(d, format=fmt, axis=axis, block=BLOCK, symmetric=True, clip_search=False, form=form,
                           accuracy_level=accuracy_level if nbits else d.accuracy_level, scale_dtype=scale_dtype,
                           reason=f"{reason}; {d.reason}" if tied else reason + how))
    return new, q, qtype, names


def _form_problem(ds: list[WeightDecision], fmt: WeightFormat, qtype: str, tied: bool, profile) -> str:
    """Why the decisions ``ds`` cannot read a weight in ``fmt`` blocks of 32 on ``profile`` ('' if they can)."""
    for d in ds:
        if not profile.supports(d.op_type, fmt):
            return profile.why_not(d.op_type, fmt)
        if d.op_type not in ("MatMul", "Gemm", "Gather"):
            return f"{d.op_type} weights are not kept"
        if qtype == "Q4_1" and (d.op_type != "MatMul" or tied):
            return ("its float minimum per block has an offset form for MatMul weights only "
                    f"({'a tied table' if tied else d.op_type} reads integer zero points)")
    if not tied and ds[0].op_type == "Gather" and profile.gather_forms.get(fmt, "dq") == "gather_rows":
        return f"{profile.name} reads {fmt.value} embedding rows with one scale per row, not per block of {BLOCK}"
    return ""

