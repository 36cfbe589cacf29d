"""MIL ``gru`` and ``lstm`` (iOS 17/18) in numpy.

Semantics as coremltools' op tests pin them (their numpy references, which Core ML passes):

- gru, gates [r, o, z]: ``r = σ(W_r x + R_r h + b_r)``, ``z = σ(W_z x + R_z h + b_z)``,
  ``o = act(W_o x + R_o (r * h) + b_o)`` (the reset gate scales h before ``R_o``), ``h = (1 - z) o + z h``.
  iOS 18 ``reset_after=True``: ``o = act(W_o x + ib_o + r * (R_o h + b_o))`` with the input biases
  ``input_bias`` apart (PyTorch's GRU).
- lstm, gates [i, f, o, z]: ``c = f c + i z`` (``clip`` bounds c), ``h = o act(c)``; peepholes
  [i, f, o] read the previous cell state for i and f, the new one for o.
- ``direction="reverse"`` runs from the last step to the first and emits states in that order;
  ``"bidirectional"`` (lstm) emits both halves aligned with the input, [forward | backward].

The whole op is one kernel: float32 arithmetic inside, the outputs rounded by the executor to the
program's dtype (the fp16-storage model of the other ops).
"""

from __future__ import annotations

import numpy as np

from targets.coreml.executor.ops_math import _sigmoid, f32

_ACT = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "scaled_tanh": np.tanh,  # with its default alpha = beta = 1
    "relu": lambda x: np.maximum(x, 0),
    "linear": lambda x: x,
    "hard_sigmoid": lambda x: np.clip(np.float32(0.2) * x + np.float32(0.5), 0, 1),
}


def _act(name) -> callable:
    return _ACT[str(name).lower()]


def _thirds(a: np.ndarray):
    n = a.shape[-1] // 3
    return a[..., :n], a[..., n : 2 * n], a[..., 2 * n :]


def _gru(x, initial_h, weight_ih, weight_hh, bias=None, direction="forward", output_sequence=False,
         recurrent_activation="sigmoid", activation="tanh", reset_after=False, input_bias=None):
    x, h = f32(x), f32(initial_h).copy()
    w_ih, w_hh = f32(weight_ih), f32(weight_hh)
    hidden = w_hh.shape[1]
    b = f32(bias) if bias is not None else np.zeros(3 * hidden, np.float32)
    gate, act = _act(recurrent_activation), _act(activation)
    steps = range(x.shape[0] - 1, -1, -1) if str(direction) == "reverse" else range(x.shape[0])
    xw = np.einsum("sbi,gi->sbg", x, w_ih)  # every step's input projection at once
    if bool(reset_after) and input_bias is not None:
        xw = xw + f32(input_bias)
    _, w_ho, _ = _thirds(w_hh.T)  # [H, H] columns of the o gate
    b_r, b_o, b_z = _thirds(b)
    out = []
    for t in steps:
        xr, xo, xz = _thirds(xw[t])
        hh = h @ w_hh.T
        hr, ho, hz = _thirds(hh)
        r = gate(xr + hr + b_r)
        z = gate(xz + hz + b_z)
        o = act(xo + r * (ho + b_o)) if bool(reset_after) else act(xo + (r * h) @ w_ho + b_o)
        h = (1 - z) * o + z * h
        out.append(h)
    seq = np.stack(out) if bool(output_sequence) else h[None]
    return seq.astype(np.float32), h.astype(np.float32)


def _lstm_direction(x, h, c, w_ih, w_hh, b, p, reverse, gate, cell_act, out_act, clip):
    hidden = w_hh.shape[1]
    xw = np.einsum("sbi,gi->sbg", x, w_ih) + b
    p_i, p_f, p_o = (p[:hidden], p[hidden : 2 * hidden], p[2 * hidden :]) if p is not None else (0, 0, 0)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    out = []
    for t in steps:
        g = xw[t] + h @ w_hh.T
        gi, gf, go, gz = (g[:, k * hidden : (k + 1) * hidden] for k in range(4))
        i = gate(gi + c * p_i)
        f = gate(gf + c * p_f)
        c = f * c + i * cell_act(gz)
        if clip is not None:
            c = np.clip(c, -clip, clip)
        o = gate(go + c * p_o)
        h = o * out_act(c)
        out.append(h)
    return out, h, c


def _lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias=None, peephole=None, weight_ih_back=None,
          weight_hh_back=None, bias_back=None, peephole_back=None, direction="forward", output_sequence=False,
          recurrent_activation="sigmoid", cell_activation="tanh", activation="tanh", clip=None):
    x = f32(x)
    acts = (_act(recurrent_activation), _act(cell_activation), _act(activation))
    clip = None if clip is None else float(np.asarray(clip))
    hidden = f32(weight_hh).shape[1]

    def params(w_ih, w_hh, b, p):
        b = f32(b) if b is not None else np.zeros(4 * hidden, np.float32)
        return f32(w_ih), f32(w_hh), b, (f32(p) if p is not None else None)

    h0, c0 = f32(initial_h), f32(initial_c)
    if str(direction) != "bidirectional":
        out, h, c = _lstm_direction(x, h0, c0, *params(weight_ih, weight_hh, bias, peephole),
                                    str(direction) == "reverse", *acts, clip)
        seq = np.stack(out) if bool(output_sequence) else h[None]
        return seq, h, c
    fwd, h_f, c_f = _lstm_direction(x, h0[:, :hidden], c0[:, :hidden],
                                    *params(weight_ih, weight_hh, bias, peephole), False, *acts, clip)
    bwd, h_b, c_b = _lstm_direction(x, h0[:, hidden:], c0[:, hidden:],
                                    *params(weight_ih_back, weight_hh_back, bias_back, peephole_back), True, *acts, clip)
    if bool(output_sequence):
        seq = np.concatenate([np.stack(fwd), np.stack(bwd[::-1])], axis=-1)  # backward aligned with the input
    else:
        seq = np.concatenate([h_f, h_b], axis=-1)[None]
    return seq, np.concatenate([h_f, h_b], axis=-1), np.concatenate([c_f, c_b], axis=-1)


OPS = {"gru": _gru, "lstm": _lstm}
