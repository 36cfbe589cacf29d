"""GPTQ: weight rounding that compensates each rounding error with the weights not yet rounded.

For a weight ``W [K, N]`` read as ``y = x · W``, calibration gives ``H = E[x xᵀ]`` ([K, K], the
Gram of the layer's input). Rounding input row ``k`` of ``W`` moves the output by ``x_k · δ_k``;
the rows after ``k`` can absorb most of that through their correlation with ``x_k``. GPTQ
(Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") does this row by row with the upper Cholesky factor ``U`` of ``H⁻¹``:
``e = (w_k - ŵ_k) / U[k, k]``, then ``W[k+1:] -= e ⊗ U[k, k+1:]``, which minimizes
``E‖x·W - x·Ŵ‖²`` greedily. Block (group) scales and zero points are chosen when the first row
of the block is reached, from the weights as compensated so far (the paper's group rule), with
the format's own clip search. The result is an ordinary :class:`~edgeq.quant.formats.QuantizedTensor`
in the plan's layout: a target cannot tell it from round-to-nearest except by its error.

An int4 table tied between a language model's embedding and its output layer is rounded for the
output layer (:func:`is_tied_int4`): that role is where its error costs (SmolLM2, rest float: int4
round to nearest costs KLD 0.021 as the embedding, 0.121 as the output layer; GPTQ for the output
layer 0.065 there, 0.091 for both roles).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from edgeq.quant import formats
from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result, fingerprint
from edgeq.quant.plan import AlgorithmResult, QuantPlan, WeightDecision
from edgeq.quant.recipes import GPTQConfig, WeightFormat
from edgeq.quant.sequence_starts import is_causal_lm
from edgeq.quant.stats import Gram

LAZY_ROWS = 128  # rows compensated inside a block before the rest of W is updated in one product
MAX_DAMP_TRIES = 6


def reduction_axis(d: WeightDecision) -> int:
    """The axis of the (transposed, if the plan says so) 2-D weight that the layer sums over."""
    return d.axis if d.block else 1 - d.axis


def supports(d: WeightDecision, shape: tuple[int, ...]) -> bool:
    """GPTQ applies to 2-D int4/int8 weights of a MatMul/Gemm and to an int4 table tied to an output MatMul
    (conv kernels and untied embedding tables: not here)."""
    if d.op_type not in ("MatMul", "Gemm") or len(shape) != 2:
        return False
    return (d.form == "dq" and d.format in (WeightFormat.INT4, WeightFormat.INT8)) or is_tied_int4(d)


def is_tied_int4(d: WeightDecision) -> bool:
    """An output MatMul reading an int4 table tied to an embedding (``[V, D]``, blocks along D).

    Its codes are chosen for the output layer (the Gram of the final hidden states): the embedding
    Gather reads the same integers, one row per token, where a row's rounding error costs much less
    (SmolLM2: int4 for the embedding alone +1 % perplexity, for the output layer alone +9 %).
    """
    return d.op_type == "MatMul" and d.form.startswith("tied_") and d.input_index == 1 \
        and d.format == WeightFormat.INT4 and bool(d.block)


def prepare_hessian(h: np.ndarray, damp: float) -> np.ndarray | None:
    """``U``, the upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; None if H is unusable.

    Inputs never seen non-zero get ``H[k, k] = 1`` (their rows round plainly and pass nothing on).
    ``λ`` grows tenfold until the factorization succeeds (a rank-deficient H from few samples).
    """
    h = np.array(h, dtype=np.float64, copy=True)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.all(np.isfinite(h)):
        return None
    diag = np.diag(h).copy()
    dead = diag <= 0
    live = diag[~dead]
    if live.size == 0:
        return None
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    lam = damp * float(live.mean())
    eye = np.eye(h.shape[0])
    flip = h[::-1, ::-1]
    for _ in range(MAX_DAMP_TRIES):
        try:
            # With J the order reversal and JHJ = L Lᵀ: H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is
            # upper triangular — one factorization and one triangular inverse, no explicit H⁻¹.
            lower = np.linalg.cholesky(flip + lam * eye)
            return np.linalg.solve(lower, eye)[::-1, ::-1].copy()
        except np.linalg.LinAlgError:
            lam = lam * 10.0 if lam > 0 else 1e-8 * float(live.mean())
    return None


def _factor(gram: np.ndarray, damp: float, ordered: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(the rounding order or None, :func:`prepare_hessian` of the Gram in that order)."""
    if not ordered:
        return None, prepare_hessian(gram, damp)
    order = act_order(gram)
    return order, prepare_hessian(np.asarray(gram)[np.ix_(order, order)], damp)


class _Grid:
    """One block's (or, for int8, one channel's) grid: codes in [lo, hi], ``ŵ = (q - z) · s``."""

    def __init__(self, scale: np.ndarray, zero: np.ndarray | None, lo: int, hi: int):
        self.scale = scale  # stored dtype (float32/float16), per output column
        self.s64 = scale.astype(np.float64)
        self.zero = zero  # float64 codes (0..15) or None
        self.lo, self.hi = lo, hi

    def round(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.zero is None:
            q = np.clip(np.rint(w / self.s64), self.lo, self.hi)
            return q, q * self.s64
        q = np.clip(np.rint(w / self.s64) + self.zero, self.lo, self.hi)
        return q, (q - self.zero) * self.s64


def _block_grid(rows: np.ndarray, d: WeightDecision) -> tuple[_Grid, np.ndarray | None]:
    """The grid for rows [g, N] of one block, chosen by the format's own rule (clip search included)."""
    if not d.symmetric:
        q = formats.quantize_int4_blockwise_asymmetric(rows, 0, d.block, clip_search=d.clip_search)
        z = q.zero_point[0].astype(np.float64) + 8.0
        return _Grid(q.scale[0], z, 0, 15), q.zero_point[0]
    scale_dtype = np.float16 if d.scale_dtype == "float16" else np.float32
    q = formats.quantize_int4_blockwise(rows, 0, d.block, clip_search=d.clip_search, scale_dtype=scale_dtype)
    return _Grid(q.scale[0], None, -8, 7), None


# output-error grids: the plain clip ratios plus two that widen the block's range (a grid whose zero
# point lands off the block's own minimum spreads the rounding error instead of shifting the block)
OUTPUT_GRID_RATIOS = (1.0667, 1.0333, *formats.INT4_CLIP_RATIOS)


def _output_grid(rows: np.ndarray, h_block: np.ndarray) -> tuple[_Grid, np.ndarray]:
    """An asymmetric block's grid chosen, per output column, by the layer-output error it predicts,
    ``eᵀ H_bb e`` with ``H_bb`` the block's part of the input Gram, instead of the weights' squared error.

    The error of a block is partly a constant offset (its zero point is an integer: SmolLM2's Q4_1
    weights put 42-44 % of the round-to-nearest error there), and a constant offset is what correlated
    inputs add up; ``H_bb`` sees that. SmolLM2 W4A16 Android .ort, held-out text: perplexity x1.136 ->
    x1.108 of float, KLD 0.156 -> 0.148 (screened on other text in a torch simulation: KLD 0.1725 -> 0.1522).
    The grid is chosen before GPTQ's compensation, which can undo the gain (a synthetic layer with one
    strong shared input component came out worse), so it runs for causal LMs only, where it was measured.
    """
    w = rows.astype(np.float64)  # [block, N]
    lo0, hi0 = np.minimum(w.min(axis=0), 0.0), np.maximum(w.max(axis=0), 0.0)
    best = None
    for r in OUTPUT_GRID_RATIOS:
        s = formats._safe_scale((hi0 - lo0) * r / 15.0).astype(np.float64)  # float32 scales, as stored
        z = np.clip(np.rint(-(lo0 * min(r, 1.0)) / s), 0, 15)
        q = np.clip(np.rint(w / s) + z, 0, 15)
        e = w - (q - z) * s
        best = formats.keep_better(best, s, z, np.sum((h_block @ e) * e, axis=0))
    scale, z = best[0].astype(np.float32), best[1]
    return _Grid(scale, z, 0, 15), (z - 8).astype(np.int8)


def act_order(hessian: np.ndarray) -> np.ndarray:
    """The input rows in the order act-order GPTQ rounds them: largest ``E[x_k²]`` first (stable)."""
    return np.argsort(-np.diag(hessian), kind="stable")


def gptq_quantize(w: np.ndarray, d: WeightDecision, factor: np.ndarray,
                  order: np.ndarray | None = None, hessian: np.ndarray | None = None) -> formats.QuantizedTensor | None:
    """``w`` (as stored in the graph) quantized per decision ``d`` with GPTQ; None if ``factor`` does not fit.

    ``factor`` is :func:`prepare_hessian` of the layer input's ``E[x xᵀ]`` (``K × K``; layers
    reading the same tensor share it). With ``order`` (a permutation of the K input rows, see
    :func:`act_order`) rows are rounded in that order and ``factor`` must be that of the permuted
    Hessian ``H[order][:, order]``; int4 block grids are then chosen from ``w`` before any
    compensation (a block's rows are no longer rounded together). With ``hessian`` (the Gram in the
    weight's own row order) as well, asymmetric int4 grids are chosen by :func:`_output_grid`.
    """
    if d.transpose:
        w = w.T
    k_axis = reduction_axis(d)
    wk = np.moveaxis(np.asarray(w, dtype=np.float64), k_axis, 0)  # [K, N]
    k, n = wk.shape
    if factor.shape != (k, k) or (order is not None and order.shape != (k,)):
        return None
    u = factor
    perm = np.arange(k) if order is None else np.asarray(order)
    work = wk.T[:, perm].copy()  # [N, K]: one column per input row (in rounding order), the layout the updates run along
    codes = np.empty((n, k))
    blocked = d.format == WeightFormat.INT4
    static = blocked and order is not None
    if blocked:
        nb = -(-k // d.block)
        scales = np.empty((nb, n), dtype=np.float16 if d.scale_dtype == "float16" and d.symmetric else np.float32)
        zeros = None if d.symmetric else np.empty((nb, n), dtype=np.int8)
        lazy = max(LAZY_ROWS // d.block, 1) * d.block  # a whole number of blocks
        grids = []
        if static:
            by_output = hessian is not None and not d.symmetric and hessian.shape == (k, k)
            for b in range(nb):
                rows = slice(b * d.block, (b + 1) * d.block)
                g, zp = _output_grid(wk[rows], np.asarray(hessian, np.float64)[rows, rows]) if by_output \
                    else _block_grid(wk[rows], d)
                grids.append(g)
                scales[b] = g.scale
                if zeros is not None:
                    zeros[b] = zp
    else:
        grid = _Grid(formats.quantize_int8_per_channel(wk, 1).scale, None, -127, 127)
        lazy = LAZY_ROWS
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = work[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the input row in the weight's own order
            if static:
                grid = grids[col // d.block]
            elif blocked and col % d.block == 0:
                end = min(i + d.block, i2 - i1)
                grid, zp = _block_grid(w1[:, i:end].T, d)
                scales[col // d.block] = grid.scale
                if zeros is not None:
                    zeros[col // d.block] = zp
            wcol = w1[:, i]
            q, deq = grid.round(wcol)
            codes[:, col] = q
            e = (wcol - deq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        work[:, i1:i2] = w1
        if i2 < k:
            work[:, i2:] -= err1 @ u[i1:i2, i2:]
    data = codes.T  # [K, N]
    if blocked:
        if not d.symmetric:
            data = data - 8.0  # stored as int4: codes 0..15 shift to -8..7, as the RTN path stores them
        if k_axis == 1:
            data, scales = data.T, scales.T
            zeros = zeros.T if zeros is not None else None
        return formats.QuantizedTensor(np.ascontiguousarray(data).astype(np.int8), np.ascontiguousarray(scales),
                                       None if zeros is None else np.ascontiguousarray(zeros), d.axis, d.block, "int4")
    if k_axis == 1:
        data = data.T
    return formats.QuantizedTensor(np.ascontiguousarray(data).astype(np.int8), grid.scale, None, d.axis, None, "int8")


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray, k_axis: int = 0) -> float:
    """``E‖x·W - x·Ŵ‖²`` summed over outputs: ``tr(ΔWᵀ H ΔW)`` for the layer's input Gram ``H``."""
    delta = np.moveaxis(np.asarray(w_hat, np.float64) - np.asarray(w, np.float64), k_axis, 0)
    return float(np.sum((hessian @ delta) * delta))


def gptq_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """node -> the activation tensor whose Gram GPTQ needs: MatMul/Gemm ``x · W`` with a 2-D int weight."""
    nodes = {n.name: n for n in model.graph}
    out = {}
    for d in plan.weights:
        n = nodes[d.node]
        if not supports(d, d.shape) or d.input_index != 1:
            continue
        if n.op_type == "Gemm" and n.attributes.get_int("transA", 0):
            continue
        x = n.inputs[0]
        if x is not None and x.const_value is None:
            out[d.node] = x.name
    return out


class GPTQHandler(Algorithm):
    """GPTQ (config :class:`~edgeq.quant.recipes.GPTQConfig`): codes for MatMul/Gemm weights, after AWQ."""

    name = "gptq"
    config_type = GPTQConfig

    def _inputs(self, ctx: Context, plan: QuantPlan) -> dict[str, str]:
        return {node: t for node, t in gptq_inputs(ctx.model, plan).items() if ctx.settings(node).gptq is not None}

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        # weights already coded (a GGUF's kept blocks, decided in the prepass) need no Gram: with recipe
        # gguf and --calib, SmolLM2's full calibration pass was spent on nothing
        gram_of = self._inputs(ctx, plan)
        wanted = {gram_of[d.node] for d in plan.weights if d.node in gram_of and d.weight not in plan.codes}
        return [Request("gram", t, Gram) for t in sorted(wanted)]

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        gram_of = self._inputs(ctx, plan)  # after protection/AWQ: the tensors the MatMuls now read
        if not gram_of:
            return self.skipped(plan, "nothing to do: no MatMul/Gemm with a 2-D int4/int8 weight")
        nodes = ctx.nodes()
        damp_of = {node: (ctx.settings(node).gptq.damp, ctx.settings(node).gptq.act_order) for node in gram_of}
        # one factorization per input tensor, damp and order: (the order or None, the factor)
        factors: dict[tuple[str, tuple[float, bool]], tuple[np.ndarray | None, np.ndarray] | None] = {}
        codes = dict(plan.codes)
        done = []
        by_output = is_causal_lm(ctx)
        for d in ctx.bar([d for d in plan.weights if d.node in gram_of], "gptq", "weight"):
            t = gram_of[d.node]
            if d.weight in codes:
                continue
            key = (t, damp_of[d.node])
            if key not in factors:
                g = stats.get("gram", t)
                factors[key] = None if g is None else ctx.memo.get(
                    ("gptq-factor", fingerprint(g, *key[1])), lambda g=g, damp=key[1][0], ordered=key[1][1]:
                    _factor(g, damp, ordered))
            if factors[key] is None or factors[key][1] is None:
                continue
            if is_tied_int4(d):  # the MatMul reads the table [V, D] through a Transpose: D is the reduction axis
                w = ctx.model.graph.initializers[d.weight].const_value.numpy().astype(np.float32)
            else:
                w = nodes[d.node].inputs[d.input_index].const_value.numpy().astype(np.float32)
            order, factor = factors[key]
            # causal LMs: asymmetric grids chosen by the output error (measured on SmolLM2; encoders such
            # as MiniLM keep the squared-error grids they were measured with)
            gram = stats.get("gram", t) if by_output else None
            q = ctx.memo.get(("gptq", fingerprint(w, repr(d), factor, order, gram if gram is not None else 0)),
                             lambda: gptq_quantize(w, d, factor, order, gram))
            if q is not None:
                codes[d.weight] = q
                done.append(d.node)
        damps = sorted(set(damp_of[n][0] for n in done)) or sorted(set(v[0] for v in damp_of.values()))
        ordered = sum(1 for n in done if damp_of[n][1])
        details = []
        skipped = sorted(set(gram_of) - set(done))
        if skipped:
            details.append(f"{len(skipped)} weights rounded to nearest (input Gram unusable): "
                           + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        result = AlgorithmResult(
            self.name, f"{len(done)} MatMul/Gemm weights rounded with error compensation "
                       f"(damp {', '.join(f'{x:g}' for x in damps)}, {stats.samples} calibration samples"
                       + (f"; {ordered} in act order" if ordered else "") + ")",
            nodes=tuple(done), details=tuple(details))
        return add_result(replace(plan, codes=MappingProxyType(codes)), result)
