"""Where a W8A8 model's error comes from, when it fails its gates: each activation quantizer alone.

Every per-tensor activation ``QuantizeLinear`` of the QDQ file is applied alone to the float model's
value of its tensor on the evaluation feeds: its own SQNR says how much that rounding costs, and
their noise powers added up (as if each reached the output at unit gain) estimate the error of
quantizing them all. On PP-OCRv4's recognizer (86 quantized activations, near-optimal ranges:
median 36.5 dB each, the worst 24.5 dB) the sum is 14.4 dB and the W8A8 model measures 14.5 dB:
no layer carries the error, every rounding adds a little. The build names the worst tensors, the
median and the sum in the failed row's notes, so the user sees whether one layer to keep in higher
precision (a recipe rule, ``quantize --budget``) or the activations as a whole (``--recipe w8a16``)
is the remedy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_FEEDS = 16  # evaluation feeds the float model runs on for this (enough for the ranking)


@dataclass(frozen=True)
class ActivationNoise:
    per_tensor: tuple[tuple[str, float], ...]  # (tensor, its own SQNR dB), worst first
    summed_db: float  # the noise powers added: the SQNR to expect with all of them
    weights_db: float | None = None  # the outputs with every activation Q/DQ pair bypassed (the weights' own error)

    @property
    def median_db(self) -> float:
        return float(np.median([db for _, db in self.per_tensor]))

    def note(self, floor_db: float | None, worst: int = 3) -> str:
        names = ", ".join(f"{t} {db:.1f} dB" for t, db in self.per_tensor[:worst])
        n = len(self.per_tensor)
        below = f" (< {floor_db:g} dB)" if floor_db is not None and self.summed_db < floor_db else ""
        spread = self.per_tensor[0][1] >= self.summed_db + 6  # the worst alone is far from the total
        weights = "" if self.weights_db is None else f"; weights alone (activations float) {self.weights_db:.1f} dB"
        return (f"{n} quantized activations, each alone {self.per_tensor[0][1]:.1f}-{self.per_tensor[-1][1]:.1f} dB "
                f"(median {self.median_db:.1f}); their noise added up: {self.summed_db:.1f} dB{below}; worst: {names}"
                + weights + ("; the error is spread over many layers: keep the activations float (a recipe with "
                             "activations = \"float\" and this one's algorithms)" if spread
                             else "; keep the worst in higher precision (a recipe rule, or quantize --budget)"))


def _quantizers(qdq) -> list[tuple[str, float, int, int, int]]:
    """(tensor, scale, zero point, lo, hi) of each per-tensor activation QuantizeLinear of ``qdq``."""
    from onnx import numpy_helper as nh

    inits = {t.name: t for t in qdq.graph.initializer}
    out = []
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[1] not in inits:
            continue
        scale = nh.to_array(inits[n.input[1]])
        zp = nh.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else np.zeros((), np.uint8)
        if scale.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        out.append((n.input[0], float(scale), int(zp), int(info.min), int(info.max)))
    return list({q[0]: q for q in out}.values())


def _bypassed(qdq, tensors: set[str]):
    """``qdq`` with the activation Q/DQ pairs of ``tensors`` bypassed: each such DequantizeLinear becomes an
    Identity of the float tensor (graph outputs keep their names)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    q_out = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in tensors}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out:
            src = q_out[n.input[0]]
            n.op_type, n.domain = "Identity", ""
            del n.input[:]
            n.input.append(src)
            del n.attribute[:]
    return m


def activation_noise(float_path: str | Path, qdq_path: str | Path, feeds) -> ActivationNoise | None:
    """:class:`ActivationNoise` of the QDQ model's activation quantizers on ``feeds`` (None: nothing to measure)."""
    import onnx
    from onnx import helper as oh

    from edgeq.runtime import ort_session

    qdq = onnx.load(str(qdq_path))
    qs = _quantizers(qdq)
    model = onnx.load(str(float_path))
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    qs = [q for q in qs if q[0] in known]
    if not qs:
        return None
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(oh.make_tensor_value_info(q[0], onnx.TensorProto.FLOAT, None)
                              for q in qs if q[0] not in present)
    sess = ort_session(model.SerializeToString(), what=" (float model, activation noise)")
    inputs = {i.name for i in sess.get_inputs()}
    names = [q[0] for q in qs]
    outs = [o.name for o in qdq.graph.output]
    wsess = ort_session(_bypassed(qdq, set(names)).SerializeToString(), what=" (weights alone)")
    # streamed power sums (nothing kept): per tensor [signal, noise], and the outputs' with activations bypassed
    power = {n: np.zeros(2) for n in names}
    out_power = np.zeros(2)
    for feed in itertools.islice(feeds, MAX_FEEDS):
        feed = {k: v for k, v in feed.items() if k in inputs}
        res = sess.run(names + outs, feed)
        for (name, scale, zp, lo, hi), v in zip(qs, res):
            x = np.asarray(v, np.float64).reshape(-1)
            xq = (np.clip(np.rint(x / scale) + zp, lo, hi) - zp) * scale
            power[name] += (np.dot(x, x), np.dot(x - xq, x - xq))
        for ref, got in zip(res[len(names):], wsess.run(outs, feed)):
            ref, got = np.asarray(ref, np.float64).reshape(-1), np.asarray(got, np.float64).reshape(-1)
            out_power += (np.dot(ref, ref), np.dot(ref - got, ref - got))
    per = [(n, _db(*power[n])) for n in names if np.isfinite(power[n]).all() and power[n][0] > 0]
    if not per:
        return None
    per.sort(key=lambda p: p[1])
    summed = -10 * np.log10(np.sum([10 ** (-db / 10) for _, db in per if np.isfinite(db)]) or 1e-30)
    weights = _db(*out_power)
    return ActivationNoise(tuple(per), float(summed), weights)


def _db(signal: float, noise: float) -> float:
    """SQNR in dB from power sums (inf when exact)."""
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))
