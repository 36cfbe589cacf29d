"""The reference executor's program as one ONNX graph, run by ONNX Runtime: its fast path.

Why: the numpy executor (:class:`..Executor`) is the reference semantics, but it pays numpy's
per-op dispatch (~60 ms over MiniLM's 464 ops), single-threaded float32 BLAS and fp16 rounding in
numpy arithmetic: ~5x the ``.ort`` package's validation time. Batching does not help (validation
feeds differ in shape) and numpy has no fp16 GEMM, so the program is translated once per load
into an ONNX graph that computes what the executor computes:

- the executor is built first and its load-time work reused: every constant (constexpr weights
  dequantized exactly, their casts, constant subexpressions) becomes a float32 initializer holding
  the executor's own values;
- each remaining op becomes ONNX ops computing it in float32 (:mod:`.onnx_ops`), and an op whose
  output the program declares fp16 is followed by ``Cast(float16) → Cast(float)``: the rounding
  the executor applies, at the same places (none after ops that only move or select fp16 values,
  :data:`..VALUE_PRESERVING`). ORT keeps such a pair: its cast-chain elimination is off by
  default (``optimization.enable_cast_chain_elimination``, set to 0 here regardless);
- an activation ``quantize`` read only by its ``dequantize`` runs as one float expression,
  ``clip(rint(x / s), lo - zp, hi - zp) * s``: the same bits (integer-valued floats, exact
  additions), four kernels instead of eight.

The engines differ only where ORT's float32 kernels sum in another order than numpy's (matmul,
conv, reductions), take the layer-norm variance in one pass, or approximate erf/exp/tanh
differently: a float32 result within float32 rounding error of an fp16 midpoint rounds to the
neighbouring fp16 value (single ops: bit-identical on the op tests; GELU's tail below -3, where
``1 + erf`` cancels, differs in 16 % of fp16 inputs by a step). Through a W8A8 network such a step
can move an activation code, and the two runs drift apart like two fp16 devices (MiniLM: 31 dB
between them at the output; both 27.7 dB from float). Teacher-forced runs
(``Executor.run(force=..., keep=...)``, the W8A8 segment acceptance) do not drift: each forced
value is a graph input (fp16 values rounded as the executor rounds them) and every kept value a
graph output, one translation per (keep, forced names) pair.

W8A8 matmuls run in integers (:mod:`.integer`: ``MatMulInteger`` on the codes of a fused quantize
pair, then the scales) and rows of int8 tables are gathered as codes, in both engines alike; nodes
whose outputs nothing reads are dropped (ORT would run them).

Cost, measured on ``edgeq build``'s MiniLM W8A8 output (open the runner, run the 25 evaluation
batches; interleaved with the ``.ort``, wall time, quiet machine): load + run 1.8x the ``.ort``'s
(run alone 1.5x; the ``.ort`` needs no load-time work). Before the integer matmuls (float32 GEMM of
fp16 operands, every weight expanded at load): 3.8-3.9x (run alone 2.5x); the numpy executor ~5x.
EfficientNet-Lite0: 5.0x (numpy: 29x): float32 Conv against ``QLinearConv``, and ORT's NCHWc
reorders around every rounded conv.

A program with an op not translated here, an argument needed as a constant that the program
computes, or states (a stateful LLM) raises :class:`Untranslatable` with a one-line reason; the
runner then uses the numpy executor and says so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.errors import InputError
from targets.coreml.executor import EXACT, Executor
from targets.coreml.executor.onnx_ops import (
    ONNX_TYPE,
    OPSET,
    TRANSLATIONS,
    Graph,
    OpArgs,
    Untranslatable,
    held,
    param_along,
)

__all__ = ["OrtProgram", "Untranslatable", "translate"]


def translate(executor: Executor, keep=(), force=()) -> onnx.ModelProto:
    """The executor's program (after its load-time constant folding) as an ONNX model with an output
    ``out:<name>`` per program output and per value named in ``keep``, and an input ``force:<name>``
    per computed value named in ``force`` (:meth:`Executor.run`'s teacher forcing: the op still runs,
    its consumers read the input; ``shape:<name>`` outputs the computed shape, for the caller to check
    the forced value's against). Raises :class:`Untranslatable` naming the first op it cannot translate."""
    if executor.stateful:
        raise Untranslatable("the program keeps state (iOS 18 states)")
    if not executor.fast:
        raise Untranslatable("the executor holds fp16 values as float16 (fast=False)")
    missing = sorted({s.op.op_type for s in executor._steps if s.op.op_type not in TRANSLATIONS})
    if missing:
        raise Untranslatable(f"no translation of MIL {', '.join(missing)}")
    g = Graph()
    ranks = {v.name: v.rank for op in executor.ops for v in op.outputs}
    names: dict[str, str] = {}
    inputs = []
    for name, dtype in executor.input_dtypes.items():
        names[name] = name
        g.dtype[name] = held(dtype)
        inputs.append(helper.make_tensor_value_info(name, ONNX_TYPE[held(dtype)], None))
    keep, force = list(dict.fromkeys(keep)), list(dict.fromkeys(force))
    unknown = sorted(set(force) - executor.computed)
    if unknown:
        raise InputError(f"cannot force {', '.join(unknown[:5])}: not computed by the program")
    forced = {}
    for name in force:
        dtype = executor._dtypes.get(name)
        if dtype is None or held(dtype) not in ONNX_TYPE:
            raise Untranslatable(f"forcing {name!r}, a value of dtype {dtype}")
        forced[name] = f"force:{name}"
        g.dtype[forced[name]] = held(dtype)
        inputs.append(helper.make_tensor_value_info(forced[name], ONNX_TYPE[held(dtype)], None))
    shapes = []
    fused = _fusable_quantizes(executor, [*keep, *force])
    for step in executor._steps:
        if step.op.op_type == "quantize" and step.outs[0][0] in fused:
            continue  # computed with its dequantize
        o = OpArgs(g, step, names, executor._mixed, ranks)
        try:
            q = fused.get(dict(step.vars).get("input")) if o.kind == "dequantize" else None
            outs = _fake_quantize(o, OpArgs(g, q, names, executor._mixed, ranks)) if q else TRANSLATIONS[o.kind](o)
        except Untranslatable as e:
            raise Untranslatable(f"op {step.op.name!r}: {e}") from None
        outs = outs if isinstance(outs, list) else [outs]
        for out, (name, dtype, rounding), want in zip(outs, step.outs, o.out_dtypes):
            out = g.cast(out, want)
            if dtype is not None and np.dtype(dtype) == np.float16 and rounding != EXACT:
                out = _round(g, out)
            if q:  # an integer matmul reading this value takes the codes as they are (what it reads back)
                g.codes[out] = g.codes.pop("")
            if name in forced:  # computed all the same, as the executor does: its shape is checked
                shapes.append(helper.make_tensor_value_info(g.node("Shape", [out], np.int64, out=f"shape:{name}"),
                                                            TensorProto.INT64, None))
                # an fp16 value is fed as float32 and rounded here, as the executor rounds a forced value
                out = _round(g, forced[name]) if np.dtype(dtype) == np.float16 else forced[name]
            names[name] = out
    outputs = []
    for n in dict.fromkeys([*executor.output_names, *keep]):
        src = names.get(n)
        if src is None:  # a constant: an output, or a kept value the program folded at load time
            if executor._constant(n) is not None:
                src = g.const(executor._constant(n))
            elif n in executor._mixed:
                src = g.const(executor._mixed[n])
            else:
                raise InputError(f"the program has no value {n!r}")
        g.nodes.append(helper.make_node("Identity", [src], [f"out:{n}"], name=f"out:{n}"))
        outputs.append(helper.make_tensor_value_info(f"out:{n}", ONNX_TYPE[g.dtype[src]], None))
    graph = helper.make_graph(_live(g.nodes, [o.name for o in outputs + shapes]), "mil", inputs, outputs + shapes,
                              g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _live(nodes: list, outputs: list[str]) -> list:
    """The nodes some graph output depends on, in order. ORT runs a node whose outputs nobody reads (a
    dequantized value that only integer matmuls read: they take its codes)."""
    wanted, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
    return keep[::-1]


def _fusable_quantizes(executor: Executor, visible) -> dict:
    """Quantize steps whose codes only their dequantize reads, with the same parameters, and that are
    not program outputs or in ``visible`` (kept or forced): by output name."""
    readers: dict[str, list] = {}
    for step in executor._steps:
        for _, ref in step.vars:
            for r in ([ref] if isinstance(ref, str) else ref):
                readers.setdefault(r, []).append(step)
    out = {}
    for step in executor._steps:
        if step.op.op_type != "quantize":
            continue
        name = step.outs[0][0]
        users = readers.get(name, [])
        if name in executor.output_names or name in visible or len(users) != 1 or users[0].op.op_type != "dequantize":
            continue
        q, dq = step.consts, users[0].consts
        zp = q.get("zero_point")
        same = all(_same(q.get(p), dq.get(p)) for p in ("scale", "zero_point", "axis"))
        if same and (zp is None or np.asarray(zp).size == 1) and "scale" in q and "scale" not in dict(step.vars):
            out[name] = step
    return out


def _same(a, b) -> bool:
    """Two constant parameters (or their absence) are equal."""
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def _fake_quantize(dq: OpArgs, q: OpArgs) -> str:
    """quantize → dequantize in float: clip(rint(x / s), lo - zp, hi - zp) * s, equal bit for bit to
    (clip(rint(x / s) + zp, lo, hi) - zp) * s (integer-valued floats: the additions are exact)."""
    x = q.arg("input", np.float32)
    axis = q.const("axis")
    info = np.iinfo(np.dtype(str(q.const("output_dtype"))))
    zp = float(np.asarray(q.const("zero_point", 0)).reshape(-1)[0])
    t = q.node("Round", [q.node("Div", [x, param_along(q, "scale", x, axis)], np.float32)], np.float32)
    t = q.node("Clip", [t, q.g.const(np.float32(info.min - zp)), q.g.const(np.float32(info.max - zp))], np.float32)
    q.g.codes[""] = t  # the centered codes, keyed by the dequantized value's name once it has one
    return dq.finish(dq.node("Mul", [t, param_along(dq, "scale", t, axis)], np.float32))


def _round(g: Graph, name: str) -> str:
    """float32 rounded to the nearest float16 value, kept float32 (ORT's Cast: round to nearest even)."""
    h = g.node("Cast", [name], np.float32, to=TensorProto.FLOAT16)
    g.dtype[h] = np.dtype(np.float16)
    return g.node("Cast", [h], np.float32, to=TensorProto.FLOAT)


class OrtProgram:
    """The translated program in ONNX Runtime sessions: ``run`` takes and gives what
    :meth:`Executor.run` does (feeds by Core ML name; outputs and kept values in their declared
    dtypes; forced values as it forces them). A (keep, forced names) pair other than the plain run is
    translated on first use and its session kept (the last ``CACHED`` such: each holds a copy of the
    weights); a teacher-forced comparison uses one pair for all its feeds."""

    kind = "onnxruntime"
    CACHED = 1

    def __init__(self, executor: Executor):
        self.executor = executor
        self.input_dtypes = dict(executor.input_dtypes)
        self.output_names = list(executor.output_names)
        self._plain = self._session((), ())
        self._sessions: dict[tuple, object] = {}  # (keep, force) frozensets -> session, oldest first

    def _session(self, keep, force):
        from edgeq.errors import EdgeqError
        from edgeq.runtime import ort_session

        model = translate(self.executor, keep, force)
        try:
            return ort_session(model.SerializeToString(), spin=False,
                               config={"optimization.enable_cast_chain_elimination": "0"})
        except EdgeqError as e:  # a translation ORT rejects: a gap here, not a broken package
            raise Untranslatable(f"ONNX Runtime rejects the translation: {e}") from e

    def session_for(self, keep=(), force=()):
        """The session computing the outputs and ``keep`` with the values named in ``force`` as inputs
        (translated and kept on first use); raises :class:`Untranslatable` as :func:`translate`."""
        key = (frozenset(keep), frozenset(force))
        if key == (frozenset(), frozenset()):
            return self._plain
        session = self._sessions.pop(key, None)
        if session is None:
            session = self._session(sorted(key[0]), sorted(key[1]))
        self._sessions[key] = session  # most recently used last
        while len(self._sessions) > self.CACHED:
            self._sessions.pop(next(iter(self._sessions)))
        return session

    def run(self, feeds: dict[str, np.ndarray], *, keep: set[str] | None = None,
            force: dict[str, np.ndarray] | None = None, fp16_as_float32: bool = False) -> dict[str, np.ndarray]:
        """As :meth:`Executor.run` (without states); ``fp16_as_float32``: fp16 values as the float32
        arrays the graph holds them in (the same numbers, without a float16 round trip)."""
        from edgeq.errors import InputError

        keep, force = list(dict.fromkeys(keep or ())), dict(force or {})
        session = self.session_for(keep, force)
        ort_feeds = {}
        for name, dtype in self.input_dtypes.items():
            if name not in feeds:
                raise InputError(f"missing input {name!r}", hint=f"the model takes {', '.join(self.input_dtypes)}")
            ort_feeds[name] = _held_value(feeds[name], dtype)
        dtypes = self.executor._dtypes
        for name, value in force.items():  # cast to the program's dtype, held as the executor holds it
            value = np.asarray(value)
            if dtypes[name] == np.float16 and value.dtype in (np.float16, np.float32):
                ort_feeds[f"force:{name}"] = value.astype(np.float32, copy=False)  # the graph rounds it: same bits
            else:
                ort_feeds[f"force:{name}"] = _held_value(value, dtypes[name])
        names = list(dict.fromkeys([*self.output_names, *keep]))
        try:
            outs = session.run([f"out:{n}" for n in names] + [f"shape:{n}" for n in force], ort_feeds)
        except Exception:
            if force:  # e.g. a forced value of the wrong shape failed a later kernel: the executor says which
                self.executor.run(feeds, keep=set(keep), force=force)
            raise
        for (name, value), shape in zip(force.items(), outs[len(names):]):
            if tuple(shape) != np.shape(value):
                raise InputError(f"forced value {name!r} has shape {np.shape(value)}, "
                                 f"the program computes {tuple(int(d) for d in shape)}")
        result = {}
        for n, v in zip(names, outs):
            d = dtypes.get(n)
            keep_held = fp16_as_float32 and d == np.float16
            result[n] = v.astype(d) if d is not None and v.dtype != d and not keep_held else v
        return result


def _held_value(value, dtype) -> np.ndarray:
    """``value`` cast to the program's ``dtype`` and held as the graph holds it (fp16 as float32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(value).astype(dtype, copy=False).astype(held(dtype), copy=False)
