"""Recurrent ops: ONNX GRU and LSTM as MIL ``gru`` / ``lstm`` (one op per direction).

Layouts. ONNX: ``X`` [seq, batch, input] (``layout=0``) or [batch, seq, input] (``layout=1``);
``W`` [dirs, G·H, input], ``R`` [dirs, G·H, H], ``B`` [dirs, 2·G·H] (input biases, then recurrent
ones), ``initial_h`` / ``initial_c`` [dirs, batch, H], ``P`` [dirs, 3·H] (LSTM peepholes);
outputs ``Y`` [seq, dirs, batch, H], ``Y_h`` / ``Y_c`` [dirs, batch, H]. MIL: ``x`` [seq, batch,
input], weights [G·H, input] in its own gate order, one bias vector, states [batch, H].
Gate order: ONNX LSTM i o f c → MIL i f o c (peepholes i o f → i f o); ONNX GRU z r h → MIL r h z.

- Bias: MIL takes the sum of the input and recurrent biases, which is what ONNX computes wherever
  both sit outside the reset gate: every LSTM gate, and a GRU with ``linear_before_reset=0``.
- GRU ``linear_before_reset=1`` (PyTorch's GRU: the reset gate scales ``R_h·h + Rb_h``) is MIL's
  iOS 18 ``gru(reset_after=True)`` with the two biases apart (``input_bias``, ``bias``); iOS 17's
  gru has no such form (a pre-flight error). Note: coremltools marks its own PyTorch-parity test
  of ``reset_after`` as an expected failure on Core ML (rdar://128479517): the reference executor
  runs the documented semantics; only a Mac can confirm what the device computes.
- Reverse: MIL's unidirectional ``reverse`` emits its sequence in processing order (coremltools'
  op tests), ONNX aligns it with the input, so edgeq runs a forward op on the time-reversed input
  and reverses the output. Bidirectional LSTM is MIL's bidirectional lstm (time-aligned,
  [forward | backward] on the hidden axis); a bidirectional GRU is two ops.
- Weights must be constants or constexpr ops feeding the op directly (coremltools refuses even a
  cast in between). iOS 18: int8 ``W``/``R`` (per row, per tensor, or int8 blocks along the input
  axis) are ``constexpr_blockwise_shift_scale`` ops of the QDQ ONNX's integers, one per direction,
  their rows (and per-row / per-block scales with them) in MIL's gate order. An fp16 program needs
  the op's output in fp16, so the scales are stored rounded to fp16 (a relative change ≤ 2⁻¹¹ per
  row, far below the int8 step); an fp32 program keeps them float32. A partial last block (input
  width not a multiple of the block, GE2E's 40 mel bands in blocks of 32) is stored as blocks of
  gcd(block, width) with each scale repeated — the same weights — since Core ML infers the block
  from the shapes and a slice after the constexpr is not allowed. Otherwise (iOS 17, scales outside
  fp16's normal range, blocks that would be narrower than :data:`MIN_BLOCK`) the weights are
  dequantized at conversion (see ``lower_model``) and stored as float constants.
- Not lowered (pre-flight names the node): ``sequence_lens``, ``clip``, LSTM ``input_forget``, and
  activations other than Sigmoid / Tanh / Relu.
"""

from __future__ import annotations

import math

import numpy as np

from targets.coreml.lower.context import Context, LoweringError, WeightRecord, attrs, is_known, mil_name
from targets.coreml.lower.registry import lowers

_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu"}
# narrowest block a partial last block is re-expressed in (int8 + one fp16 scale per 8 codes: 1.25
# bytes a weight against fp16's 2)
MIN_BLOCK = 8
_FP16_TINY = float(np.finfo(np.float16).tiny)
_DEFAULTS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _all_activations(node) -> list[str]:
    acts = attrs(node).get("activations", [])
    return [x.decode() if isinstance(x, bytes) else x for x in acts] or list(_DEFAULTS[node.op_type])


def _activations(node) -> list[str]:
    """The activations of the first direction (``_check`` requires the same in the second)."""
    return _all_activations(node)[: len(_DEFAULTS[node.op_type])]


def _direction(node) -> str:
    d = attrs(node).get("direction", "forward")
    return d.decode() if isinstance(d, bytes) else d


def _check(node, deployment: int) -> str | None:
    a = attrs(node)
    if len(node.input) > 4 and node.input[4]:
        return f"{node.op_type} with sequence_lens is not supported (every sequence must have the full length)"
    if "clip" in a:
        return f"{node.op_type} with clip is not supported (MIL clips the cell state, ONNX the gate inputs)"
    if int(a.get("input_forget", 0)):
        return "LSTM with input_forget=1 (coupled input and forget gates) is not supported"
    if a.get("activation_alpha") or a.get("activation_beta"):
        return f"{node.op_type} activation_alpha/activation_beta are not supported"
    every, first = _all_activations(node), _activations(node)
    if any(x not in _ACTIVATIONS for x in every) or every[len(first):] not in ([], first):
        return (f"{node.op_type} activations {every} are not supported (Sigmoid, Tanh or Relu, the same in "
                "both directions)")
    if node.op_type == "GRU" and int(a.get("linear_before_reset", 0)) and deployment < 18:
        return "GRU with linear_before_reset=1 (PyTorch's GRU) needs iOS 18 (gru reset_after)"
    return None


def _const(ctx: Context, node, ins, i: int, what: str):
    v = ins[i] if len(ins) > i else None
    if v is None:
        return None
    if not is_known(v):
        raise LoweringError(node, f"{node.op_type} {what} must be a constant (Core ML's {node.op_type.lower()} "
                                  "takes constant weights)")
    return np.asarray(v, np.float32)


def _gates(a: np.ndarray, order: list[int], hidden: int) -> np.ndarray:
    """Rows of ``a`` (gate blocks of ``hidden`` rows each) in ``order``."""
    return np.concatenate([a[g * hidden : (g + 1) * hidden] for g in order], axis=0)


def _per_direction(p: np.ndarray, d: int, axis: int, block: int, width: int) -> np.ndarray | None:
    """A scale (or zero point) of a [dirs, rows, width] weight as direction ``d``'s blockwise
    parameter ([rows or 1, blocks or 1]), or None when Core ML cannot express it."""
    if p.ndim == 0:
        return p.reshape(1, 1)
    if block:
        if axis != 2 or p.ndim != 3:
            return None
        p = p[d]  # [rows, ceil(width / block)]
        if width % block:
            g = math.gcd(block, width)
            if g < MIN_BLOCK:
                return None
            p = np.repeat(p, block // g, axis=1)[:, : width // g]
        return p
    if p.ndim != 1:
        return None
    return {0: p[d : d + 1].reshape(1, 1), 1: p.reshape(-1, 1), 2: p.reshape(1, -1)}[axis]


def _int8_weight(ctx: Context, node, index: int, d: int, order: list[int], hidden: int):
    """Direction ``d`` of the weight at input ``index`` as an iOS 18 constexpr op of the QDQ ONNX's
    integers, rows in MIL's gate ``order``; None when it is not int8 from a DequantizeLinear or has no
    form here (the caller stores it dequantized)."""
    src = ctx.folded_dequantize.get(node.input[index]) if len(node.input) > index else None
    if ctx.deployment < 18 or src is None:
        return None
    dq, ins = src
    q, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    if not (is_known(q) and q.dtype in (np.int8, np.uint8) and q.ndim == 3 and is_known(scale)
            and scale.dtype in (np.float32, np.float16)):
        return None
    a = attrs(dq)
    axis, block = int(a.get("axis", 1)) % 3, int(a.get("block_size", 0))
    s = _per_direction(scale, d, axis, block, q.shape[2])
    off = _per_direction(zp, d, axis, block, q.shape[2]) if zp is not None else None
    if s is None or (zp is not None and off is None):
        return None
    if ctx.compute == "fp16":
        if scale.dtype == np.float32 and np.any(np.abs(s) < _FP16_TINY) | np.any(np.abs(s) > np.finfo(np.float16).max):
            return None
        s = s.astype(np.float16)  # the op's output must be the lstm's fp16 (no cast allowed in between)
    else:
        s = s.astype(np.float32)
    rows = np.concatenate([np.arange(g * hidden, (g + 1) * hidden) for g in order])
    if s.shape[0] > 1:
        s = s[rows]
    if off is not None and off.shape[0] > 1:
        off = off[rows]
    data = q[d][rows]
    name = ctx.fresh_name(f"{mil_name(dq.output[0])}_dir{d}")
    kw = {"offset": off.astype(q.dtype)} if off is not None else {}
    w = ctx.mb.constexpr_blockwise_shift_scale(data=data, scale=s, name=name, **kw)
    step = data.shape[1] // s.shape[1]
    ctx.weights.append(WeightRecord(dq.name, name, str(q.dtype), tuple(data.shape), step if s.shape[1] > 1 else None))
    return w


class _Rnn:
    """What GRU and LSTM share: layouts, states, directions, outputs."""

    def __init__(self, ctx: Context, node, ins, gates: int):
        self.ctx, self.node, self.mb = ctx, node, ctx.mb
        a = attrs(node)
        self.layout = int(a.get("layout", 0))
        self.direction = _direction(node)
        self.dirs = 2 if self.direction == "bidirectional" else 1
        self.W = _const(ctx, node, ins, 1, "W")
        self.R = _const(ctx, node, ins, 2, "R")
        self.H = int(a.get("hidden_size", self.R.shape[-1]))
        b = _const(ctx, node, ins, 3, "B")
        self.B = b if b is not None else np.zeros((self.dirs, 2 * gates * self.H), np.float32)
        x = ins[0]
        self.x = ctx.mb.transpose(x=x, perm=[1, 0, 2]) if self.layout else x
        self.acts = [_ACTIVATIONS[s] for s in _activations(node)]

    def weight(self, a: np.ndarray):
        return self.ctx.const(a)

    def matrix(self, index: int, d: int, order: list[int]):
        """W (``index`` 1) or R (2) of direction ``d`` in MIL's gate ``order``: int8 when it can be."""
        w = _int8_weight(self.ctx, self.node, index, d, order, self.H)
        if w is not None:
            return w
        return self.weight(_gates((self.W if index == 1 else self.R)[d], order, self.H))

    def state(self, ins, i: int, d: int):
        """The initial state of direction ``d`` ([batch, H]), zeros when the input is absent."""
        v = ins[i] if len(ins) > i else None
        if v is None:
            shape = self.ctx.shape(self.x)
            if shape[1] is not None:
                return self.ctx.const(np.zeros((shape[1], self.H), np.float32))
            batch = self.mb.slice_by_index(x=self.mb.shape(x=self.x), begin=np.array([1], np.int32),
                                           end=np.array([2], np.int32))
            dims = self.mb.concat(values=[batch, np.array([self.H], np.int32)], axis=0)
            return self.mb.fill(shape=dims, value=self.ctx.float_np(0.0))
        v = self.ctx.var(v)  # [dirs, batch, H], or [batch, dirs, H] with layout=1
        axis = 1 if self.layout else 0
        begin, end = np.zeros(3, np.int32), np.zeros(3, np.int32)
        begin[axis], end[axis] = d, d + 1
        part = self.mb.slice_by_index(x=v, begin=begin, end=end, end_mask=[i != axis for i in range(3)])
        return self.mb.squeeze(x=part, axes=[axis])

    def reversed_run(self, run):
        """``run(x)`` (a forward op on x) on the time-reversed input, its sequence reversed back."""
        out = run(self.mb.reverse(x=self.x, axes=[0]))
        return [self.mb.reverse(x=out[0], axes=[0]), *out[1:]]

    def outputs(self, per_dir: list[list]) -> list:
        """ONNX outputs from each direction's (sequence [s, b, H], state [b, H], ...)."""
        mb = self.mb
        n = len(self.node.output)
        seq = [mb.expand_dims(x=o[0], axes=[1]) for o in per_dir]
        y = seq[0] if len(seq) == 1 else mb.concat(values=seq, axis=1)  # [s, dirs, b, H]
        if self.layout:
            y = mb.transpose(x=y, perm=[2, 0, 1, 3])
        out = [y]
        for k in range(1, n):
            states = [mb.expand_dims(x=o[k], axes=[0]) for o in per_dir]
            s = states[0] if len(states) == 1 else mb.concat(values=states, axis=0)  # [dirs, b, H]
            out.append(mb.transpose(x=s, perm=[1, 0, 2]) if self.layout else s)
        return out


@lowers("LSTM", check=_check)
def _lstm(ctx, node, ins):
    r = _Rnn(ctx, node, ins, 4)
    H = r.H
    order = [0, 2, 1, 3]  # ONNX i o f c -> MIL i f o c

    def params(d):
        p = _const(ctx, node, ins, 7, "P")
        kw = {"bias": _gates(r.B[d][: 4 * H] + r.B[d][4 * H :], order, H)}
        if p is not None:
            kw["peephole"] = _gates(p[d], [0, 2, 1], H)
        return {"weight_ih": r.matrix(1, d, order), "weight_hh": r.matrix(2, d, order),
                **{k: r.weight(v) for k, v in kw.items()}}

    act = {"recurrent_activation": r.acts[0], "cell_activation": r.acts[1], "activation": r.acts[2]}

    def run(x, d, h0, c0, **kw):
        return list(ctx.mb.lstm(x=x, initial_h=h0, initial_c=c0, output_sequence=True, **params(d), **act, **kw))

    if r.direction == "bidirectional":
        back = {f"{k}_back": v for k, v in params(1).items()}
        h0 = ctx.mb.concat(values=[r.state(ins, 5, 0), r.state(ins, 5, 1)], axis=1)
        c0 = ctx.mb.concat(values=[r.state(ins, 6, 0), r.state(ins, 6, 1)], axis=1)
        y, h, c = run(r.x, 0, h0, c0, direction="bidirectional", **back)
        halves = [ctx.mb.split(x=v, num_splits=2, axis=-1) for v in (y, h, c)]
        per_dir = [[halves[0][d], halves[1][d], halves[2][d]] for d in range(2)]
    elif r.direction == "reverse":
        per_dir = [r.reversed_run(lambda x: run(x, 0, r.state(ins, 5, 0), r.state(ins, 6, 0)))]
    else:
        per_dir = [run(r.x, 0, r.state(ins, 5, 0), r.state(ins, 6, 0))]
    return r.outputs(per_dir)


@lowers("GRU", check=_check)
def _gru(ctx, node, ins):
    r = _Rnn(ctx, node, ins, 3)
    H = r.H
    order = [1, 2, 0]  # ONNX z r h -> MIL r h z
    reset_after = bool(int(attrs(node).get("linear_before_reset", 0)))
    if reset_after and ctx.deployment < 18:
        raise LoweringError(node, "GRU with linear_before_reset=1 (PyTorch's GRU) needs iOS 18 (gru reset_after)",
                            hint="build for ios18, or for Android (--targets android)")

    def run(x, d):
        wb, rb = r.B[d][: 3 * H], r.B[d][3 * H :]
        kw = {"weight_ih": r.matrix(1, d, order), "weight_hh": r.matrix(2, d, order)}
        if reset_after:
            kw.update(reset_after=True, input_bias=r.weight(_gates(wb, order, H)), bias=r.weight(_gates(rb, order, H)))
        else:
            kw["bias"] = r.weight(_gates(wb + rb, order, H))
        return list(ctx.mb.gru(x=x, initial_h=r.state(ins, 5, d), output_sequence=True,
                               recurrent_activation=r.acts[0], activation=r.acts[1], **kw))

    per_dir = []
    if r.direction in ("forward", "bidirectional"):
        per_dir.append(run(r.x, 0))
    if r.direction in ("reverse", "bidirectional"):
        d = 1 if r.direction == "bidirectional" else 0
        per_dir.append(r.reversed_run(lambda x: run(x, d)))
    return r.outputs(per_dir)
