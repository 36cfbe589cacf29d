"""A reference executor for saved Core ML ML programs: MIL semantics, op by op, in numpy.

It reads the ``.mlpackage`` a user ships (its ``model.mlmodel`` program and ``weights/``
file, see :mod:`.program`) and runs every operation in order. Precision follows the program:
each op computes in float32 from its (possibly fp16) inputs and its result is rounded to the
dtype the program declares for that output — fp16 storage with fp32 arithmetic inside an op,
which is how Core ML's GPU and Neural Engine kernels behave. Constexpr weights are expanded
exactly (int8/int4 codes times float32 scales), once, when the program is loaded — except int8
weights that only W8A8 matmuls and table lookups read: those matmuls run on the codes, as Core ML's
int8-int8 path does, and lookups gather rows of codes (:mod:`.integer`).

Two ways to hold an fp16 program's tensors, with the same op implementations:

- ``fast=True`` (the default): as float32 arrays whose values are float16 numbers (each op's
  result is rounded with :func:`.fp16.round_fp16`, bit-identical to a float16 cast); ops that
  only move or select values (reshape, gather, max, ...) are not rounded again; constant matmul
  weights are laid out once for BLAS; large products and roundings are split over threads
  (:mod:`.parallel`). No float16 array is converted on the way into an op.
- ``fast=False``: as float16 arrays, every op's inputs cast up and its output cast down by
  numpy: the plain reading of the semantics, kept to check the fast path against.

A stateful program (iOS 18 states, e.g. an LLM's KV cache) runs with an
:class:`ExecutorState` the caller makes with :meth:`Executor.make_state` and passes to every
:meth:`Executor.run`, as an app passes Core ML's ``MLState`` to ``prediction(from:using:)``: its
buffers start at zero and carry what the program wrote from one call to the next.

An op this executor does not know fails by name; nothing is skipped.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq._quiet import quiet
from edgeq.errors import InputError, UnsupportedError
from targets.coreml.executor import integer, ops_math, ops_nn, ops_rnn, ops_state, ops_tensor, parallel
from targets.coreml.executor.fp16 import round_fp16
from targets.coreml.executor.program import Const, Program, load_spec, read_program, weights_dir

OPS = {**ops_math.OPS, **ops_tensor.OPS, **ops_nn.OPS, **ops_rnn.OPS, **ops_state.OPS}

# how an op's fp16 result is rounded on the fast path: not at all (its values already are fp16
# values), Veltkamp's passes only (nonzero results are known to be normal fp16 numbers), in full
EXACT, NORMAL, FULL = "exact", "normal", "full"

# ops whose float outputs are elements of their float inputs (or of constants of the same dtype):
# on fp16-valued inputs they need no rounding
VALUE_PRESERVING = frozenset({
    "reshape", "transpose", "concat", "slice_by_index", "slice_by_size", "gather", "gather_along_axis",
    "gather_nd", "squeeze", "expand_dims", "split", "tile", "pad", "identity", "relu", "maximum", "minimum",
    "select", "clip", "reduce_max", "reduce_min", "max_pool", "upsample_nearest_neighbor", "fill", "reverse",
    "pixel_shuffle", "pixel_unshuffle", "stack", "read_state", "slice_update",
})

# a deferred weight's value in a step's constants, until it is expanded (Executor._constant)
DEFERRED = object()
# the (op, parameter) pairs that read a deferred weight without expanding it: a cast of it (deferred
# too), a matmul's y (expanded unless the matmul runs in integers) and a gather's table (rows of codes)
_LAZY_PARAMS = {("cast", "x"), ("matmul", "y"), ("gather", "x")}

__all__ = ["OPS", "Executor", "ExecutorState", "load_program", "read_program", "weights_dir"]


def load_program(package: str | os.PathLike):
    """The package's program as coremltools' PyMIL ``Program`` (for inspection), and its spec."""
    p = Path(package)
    spec = load_spec(p)
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

        prog = milproto_load(spec, spec.specificationVersion, file_weights_dir=str(weights_dir(p)))
    return prog, spec


class ExecutorState:
    """The state buffers of one stateful program (Core ML's ``MLState``), zeros when made.

    Pass it to every :meth:`Executor.run` of one sequence (e.g. one generated text); make a new
    one to start again. :meth:`read` gives a buffer's current value in its declared dtype.
    """

    def __init__(self, specs: dict, fast: bool):
        self._fast = fast
        self._dtypes = {name: dtype for name, (dtype, _) in specs.items()}
        self.buffers = {name: ops_state.StateBuffer(name, np.zeros(shape, np.float32 if fast and dtype == np.float16
                                                                   else dtype))
                        for name, (dtype, shape) in specs.items()}

    @property
    def names(self) -> list[str]:
        return list(self.buffers)

    def read(self, name: str) -> np.ndarray:
        """A copy of the buffer ``name`` in its declared dtype."""
        if name not in self.buffers:
            raise InputError(f"no state {name!r}", hint=f"the program's states: {', '.join(self.buffers)}")
        return self.buffers[name].value.astype(self._dtypes[name])

    def write(self, name: str, value: np.ndarray) -> None:
        """Set the buffer ``name`` (Core ML: ``MLState.withMultiArray(for:)``), same shape."""
        buf = self.buffers.get(name)
        if buf is None:
            raise InputError(f"no state {name!r}", hint=f"the program's states: {', '.join(self.buffers)}")
        value = np.asarray(value)
        if value.shape != buf.value.shape:
            raise InputError(f"state {name!r} has shape {buf.value.shape}, got {value.shape}")
        held = value.astype(self._dtypes[name])
        buf.value = held.astype(np.float32) if self._fast and self._dtypes[name] == np.float16 else held


@dataclass
class _Step:
    """One op, ready to run: its constant arguments bound, the others named."""

    op: object  # the program.Operation (for error messages)
    fn: object
    consts: dict  # parameter -> value
    vars: list  # (parameter, value name | tuple of value names)
    outs: list  # (value name, numpy dtype | None, fp16 rounding: EXACT (none needed) | NORMAL | FULL)
    split: tuple | None = None  # ("elementwise", operand params) | ("rows", axis param): may run in blocks


class Executor:
    """Runs one function of an ML program (:class:`.program.Program`) on numpy feeds by Core ML name."""

    def __init__(self, program: Program, *, fast: bool = True):
        self.fast = fast
        if fast:
            parallel.keep_freed_memory()
        self.ops = program.operations
        missing = sorted({op.op_type for op in self.ops if op.op_type not in OPS and op.op_type != "const"})
        if missing:
            raise UnsupportedError(f"the reference executor has no implementation of MIL {', '.join(missing)}",
                                   hint="package for Android instead (--targets android)")
        self.input_dtypes = {n: v.dtype for n, v in program.inputs.items() if not v.state}
        self.state_specs = {n: (v.dtype, v.shape) for n, v in program.inputs.items() if v.state}
        self.output_names = list(program.outputs)
        self._dtypes = {v.name: v.dtype for op in self.ops for v in op.outputs}
        self._dtypes.update(self.input_dtypes)
        self._dtypes.update({n: dtype for n, (dtype, _) in self.state_specs.items()})
        self._consts: dict[str, np.ndarray] = {}
        self._mixed: dict[str, np.ndarray] = {}  # constants read by name: in a list mixing them with variables
        self._steps: list[_Step] = []
        self._codes: dict[str, integer.WeightCodes] = {}  # int8 constexpr weights (and their casts), by name
        self._deferred: dict[str, list] = {}  # those not expanded yet: the steps that make the float value
        with parallel.single_threaded_blas():
            for op in self.ops:  # ops that read only constants (constexpr weights and their casts) run once
                if op.op_type == "const":
                    self._consts[op.outputs[0].name] = self._hold(op.val, op.outputs[0].dtype)
                    continue
                step = self._compile(op)
                if step.vars:
                    self._steps.append(step)
                elif not self._defer(op, step):
                    self._run_step(self._expanded(step), self._consts)
        self._integer_ops()
        if fast:
            for step in self._steps:
                if step.op.op_type == "matmul" and not isinstance(step.fn, integer.IntegerMatmul):
                    _prepare_matmul(step)
                kind = step.op.op_type
                if kind == "dequantize" and _normal_products(step, self._dtypes):
                    step.outs[0] = (*step.outs[0][:2], NORMAL)
                if len(step.outs) == 1 and step.outs[0][1] is not None:
                    if kind in ops_math.ELEMENTWISE:
                        step.split = ("elementwise", ops_math.ELEMENTWISE[kind])
                    elif kind in ops_math.ROWWISE:
                        step.split = ("rows", ops_math.ROWWISE[kind])
        self._computed = {name for s in self._steps for name, _, _ in s.outs}

    @property
    def computed(self) -> frozenset[str]:
        """Names of the values the program computes per run (those ``run`` can force)."""
        return frozenset(self._computed)

    @property
    def stateful(self) -> bool:
        return bool(self.state_specs)

    def make_state(self) -> ExecutorState:
        """Fresh state buffers (zeros) for :meth:`run`, like Core ML's ``MLModel.makeState()``."""
        if not self.state_specs:
            raise InputError("the program has no state", hint="run it without one")
        return ExecutorState(self.state_specs, self.fast)

    @classmethod
    def from_package(cls, package: str | os.PathLike, *, fast: bool = True) -> Executor:
        prog, _ = read_program(package)
        return cls(prog, fast=fast)

    # --- building ----------------------------------------------------------------------------

    def _const_of(self, ref, lazy: bool = False):
        """The value of a constant argument, or None when ``ref`` names a computed value; ``lazy``: a
        deferred weight stays deferred (its value is :data:`DEFERRED` until :meth:`_constant`)."""
        if isinstance(ref, Const):
            return (self._hold(ref.val, None),)
        if ref in self._deferred and lazy:
            return (DEFERRED,)
        if ref in self._consts or ref in self._deferred:
            return (self._constant(ref),)
        return None

    def _compile(self, op) -> _Step:
        consts, names = {}, []
        float_in = set()
        for param, ref in op.inputs.items():
            group = list(ref) if isinstance(ref, list) else None
            members = group if group is not None else [ref]
            float_in |= {self._dtypes.get(m) if isinstance(m, str) else _dtype_of(m.val) for m in members}
            lazy = (op.op_type, param) in _LAZY_PARAMS
            known = [self._const_of(m, lazy) for m in members]
            if all(k is not None for k in known):
                vals = [k[0] for k in known]
                consts[param] = vals if group is not None else vals[0]
                continue
            if group is None:
                names.append((param, ref))
                continue
            refs = []
            for i, (m, k) in enumerate(zip(members, known)):
                if k is None:
                    refs.append(m)
                else:  # a constant among variables: read by a name of its own
                    key = m if isinstance(m, str) else f"{op.name}/{param}/{i}"
                    self._mixed[key] = k[0]
                    refs.append(key)
            names.append((param, tuple(refs)))
        float_in = {d for d in float_in if d is not None and np.dtype(d).kind == "f"}
        outs = []
        for var in op.outputs:
            exact = op.op_type in VALUE_PRESERVING and float_in <= {var.dtype}
            outs.append((var.name, var.dtype, EXACT if exact else FULL))
        return _Step(op, OPS[op.op_type], consts, names, outs)

    def _defer(self, op, step: _Step) -> bool:
        """An int8 constexpr weight (or a cast of one) is not expanded to float now: its codes and scales
        are kept, and the float value is made when something other than an integer matmul reads it
        (:meth:`_constant`). Expanding and rounding every W8A8 weight was a third of a package's load."""
        src = op.inputs.get("x") if op.op_type == "cast" else None
        if op.op_type in integer.CONSTEXPR:
            codes, chain = integer.weight_codes(op.op_type, step.consts), [step]
        elif isinstance(src, str) and src in self._deferred:
            codes, chain = self._codes[src], [*self._deferred[src], step]
        else:
            return False
        if codes is None:
            return False
        self._codes[op.outputs[0].name] = codes
        self._deferred[op.outputs[0].name] = chain
        return True

    def _expanded(self, step: _Step) -> _Step:
        """``step`` with the deferred weights it reads expanded."""
        for param, v in step.consts.items():
            if v is DEFERRED:
                step.consts[param] = self._constant(step.op.inputs[param])
        return step

    def _constant(self, name: str):
        """A folded constant's value, expanding a deferred weight first; None when ``name`` is none."""
        chain = self._deferred.pop(name, None)
        if chain is not None:
            with parallel.single_threaded_blas():
                for step in chain:
                    if step.outs[0][0] not in self._consts:
                        self._run_step(self._expanded(step), self._consts)
        return self._consts.get(name)

    def _integer_ops(self) -> None:
        """W8A8 matmuls (an activation dequantize times an int8 constexpr weight) computed in integers
        (:mod:`.integer`): their step runs :class:`.integer.IntegerMatmul`; gathers of table rows run
        :class:`.integer.IntegerGather`; every other reader of a deferred weight gets it expanded."""
        producer = {name: s for s in self._steps for name, _, _ in s.outs}
        for step in self._steps:
            if step.op.op_type != "matmul" or bool(step.consts.get("transpose_x", False)):
                continue
            x, y = dict(step.vars).get("x"), step.op.inputs.get("y")
            weight = self._codes.get(y) if isinstance(y, str) and "y" in step.consts else None
            dq = producer.get(x) if isinstance(x, str) else None
            if weight is None or dq is None or dq.op.op_type != "dequantize":
                continue
            codes = dict(dq.vars).get("input")
            scale, zp = dq.consts.get("scale"), dq.consts.get("zero_point", 0)
            if (self._dtypes.get(codes) not in (np.int8, np.uint8) or scale is None or np.size(scale) != 1
                    or "zero_point" in dict(dq.vars) or np.size(zp) != 1):
                continue
            fn = integer.integer_matmul(weight, bool(step.consts.get("transpose_y", False)),
                                        np.asarray(scale).reshape(()), int(np.asarray(zp).reshape(())),
                                        np.dtype(self._dtypes[codes]))
            if fn is not None:
                step.fn = fn
        for step in self._steps:
            if step.op.op_type == "gather" and step.consts.get("x") is DEFERRED:
                self._integer_gather(step)
        for step in self._steps:  # the others read their weight in float
            if not isinstance(step.fn, (integer.IntegerMatmul, integer.IntegerGather)):
                self._expanded(step)

    def _integer_gather(self, step: _Step) -> None:
        """A gather of rows from a deferred 2-d int8 table runs as :class:`.integer.IntegerGather` when
        that gives the same numbers: rows (axis 0), and an fp16 rounding in the table's making only if
        the table is fp16 (the gathered products are rounded where the table's values were)."""
        name = step.op.inputs["x"]
        chain = self._deferred.get(name)  # None: another reader had the table expanded (a float gather then)
        if chain is None or int(step.consts.get("batch_dims", 0)) or int(step.consts.get("axis", 0)) % 2 != 0:
            return
        codes = self._codes[name]
        made = [self._dtypes.get(s.outs[0][0]) for s in chain]
        if np.float16 in made and self._dtypes.get(name) != np.float16:
            return
        scale = codes.scale.reshape((-1, 1) if codes.axis == 0 else (1, -1))
        step.fn = integer.IntegerGather(codes.codes, scale)
        out, dtype, _ = step.outs[0]
        step.outs[0] = (out, dtype, FULL)  # products of codes and scales: rounded like the table's values

    # --- values ------------------------------------------------------------------------------

    def _hold(self, val, dtype):
        """A constant as this executor holds values of ``dtype`` (strings and lists as they are)."""
        if not isinstance(val, (np.ndarray, np.generic, int, float, bool)):
            return val
        val = np.asarray(val)
        if self.fast and (dtype == np.float16 or (dtype is None and val.dtype == np.float16)):
            return np.ascontiguousarray(val, dtype=np.float32) if val.dtype == np.float16 else round_fp16(val)
        return val.astype(dtype) if dtype is not None and val.dtype != dtype else val

    def _convert(self, val, dtype, rounding: str, *, threads: bool = True) -> np.ndarray:
        """An op's result as held for a value of the program's ``dtype``."""
        val = np.asarray(val)
        if self.fast and dtype == np.float16:
            if val.dtype == np.float32 and rounding == EXACT:
                return val
            if val.dtype == np.float16:
                return val.astype(np.float32)
            out = val if _fresh(val) else np.empty(val.shape, np.float32)
            fn = functools.partial(round_fp16, normal=rounding == NORMAL)
            if threads:
                return parallel.map_flat(fn, val, out)
            return fn(val, out=out)
        if dtype is not None and val.dtype != dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                return val.astype(dtype)
        return val

    def _held_dtype(self, dtype):
        return np.float32 if self.fast and dtype == np.float16 else dtype

    def _run_step(self, step: _Step, env: dict) -> None:
        args = dict(step.consts)
        for param, name in step.vars:
            args[param] = env[name] if isinstance(name, str) else [env[n] for n in name]
        if step.split is not None:
            out = self._run_split(step, args)
            if out is not None:
                env[step.outs[0][0]] = out
                return
        out = self._call(step, args)
        if not step.outs:  # write_state: its effect is on the state
            return
        if len(step.outs) == 1:
            name, dtype, rounding = step.outs[0]
            env[name] = self._convert(out[0] if isinstance(out, (list, tuple)) else out, dtype, rounding)
            return
        for (name, dtype, rounding), val in zip(step.outs, out):
            env[name] = self._convert(val, dtype, rounding)

    def _run_split(self, step: _Step, args: dict) -> np.ndarray | None:
        """Run a large elementwise or row-wise op in blocks along its first non-unit axis, on threads;
        None when the op is small or its arguments do not split that way."""
        kind, which = step.split
        operands = ("x",) if kind == "rows" else which
        arrays = {p: args[p] for p in operands if isinstance(args.get(p), np.ndarray)}
        if len(arrays) != len(operands):
            return None
        shape = np.broadcast_shapes(*(v.shape for v in arrays.values()))
        size = int(np.prod(shape))
        if size < parallel.MIN_ELEMENTS:
            return None
        axis = next((i for i, d in enumerate(shape) if d > 1), None)
        if axis is None:
            return None
        if kind == "rows":
            reduced = args.get(which)
            reduced = range(len(shape)) if reduced is None else [int(a) % len(shape) for a in np.atleast_1d(reduced)]
            if axis in reduced:
                return None
        elif any(isinstance(v, np.ndarray) and v.ndim > 0 for p, v in args.items() if p not in arrays):
            return None  # e.g. a per-channel quantize scale: the op lays it out itself
        _, dtype, rounding = step.outs[0]
        out = np.empty(shape, self._held_dtype(dtype))

        def block(lo, hi):
            part = dict(args)
            for p, v in arrays.items():
                i = axis - (len(shape) - v.ndim)
                if i >= 0 and v.shape[i] == shape[axis]:
                    part[p] = v[(slice(None),) * i + (slice(lo, hi),)]
            dst = out[(slice(None),) * axis + (slice(lo, hi),)]
            val = self._call(step, part)
            if self.fast and dtype == np.float16 and rounding != EXACT and np.asarray(val).dtype == np.float32:
                round_fp16(val, out=dst, normal=rounding == NORMAL)
            else:
                dst[...] = self._convert(val, dtype, rounding, threads=False)

        parallel.rows(block, shape[axis], size, parallel.MIN_ELEMENTS)
        return out

    def _call(self, step: _Step, args: dict):
        try:
            return step.fn(**args)
        except Exception as e:
            op = step.op
            raise UnsupportedError(f"reference executor: MIL op {op.name!r} ({op.op_type}) failed: "
                                   f"{type(e).__name__}: {str(e)[:200]}") from e

    # --- running -----------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray], *, keep: set[str] | None = None,
            force: dict[str, np.ndarray] | None = None, state: ExecutorState | None = None) -> dict[str, np.ndarray]:
        """Outputs (and the values named in ``keep``) for one set of inputs, in their declared dtypes.

        ``state`` (from :meth:`make_state`; required when the program has states) is read and
        updated by the run, and carries what it wrote to the next run given the same state.

        ``force`` replaces the values it names as soon as they are computed (cast to the
        program's dtype for them): a teacher-forced run, e.g. every activation ``dequantize``
        output set to the reference run's, so that each segment between two quantization points
        is compared on its own.
        """
        force = force or {}
        unknown = sorted(set(force) - self._computed)
        if unknown:
            raise InputError(f"cannot force {', '.join(unknown[:5])}: not computed by the program")
        if self.state_specs and not isinstance(state, ExecutorState):
            raise InputError(f"the program keeps state ({', '.join(self.state_specs)}): pass state=",
                             hint="make one with Executor.make_state() and pass it to every run of a sequence")
        if state is not None and set(state.buffers) != set(self.state_specs):
            raise InputError("the state was made for another program",
                             hint="make it with this executor's make_state()")
        with parallel.single_threaded_blas():
            env = self._run(feeds, force, state)
        result = {}
        for n in [*self.output_names, *(keep or ())]:
            val = env[n] if n in env else self._constant(n)
            if val is None:
                raise InputError(f"the program has no value {n!r}")
            # fast-path fp16 values are held as float32: give them back in the declared dtype
            result[n] = val.astype(np.float16) if self.fast and self._dtypes.get(n) == np.float16 else val
        return result

    def _run(self, feeds, force, state=None) -> dict[str, np.ndarray]:
        env = dict(self._mixed)
        if state is not None:
            env.update(state.buffers)
        for name, dtype in self.input_dtypes.items():
            if name not in feeds:
                raise InputError(f"missing input {name!r}", hint=f"the model takes {', '.join(self.input_dtypes)}")
            env[name] = self._convert(np.asarray(feeds[name]).astype(dtype, copy=False), dtype, False)
        for step in self._steps:
            self._run_step(step, env)
            if force:
                for name, dtype, _ in step.outs:
                    if name in force:
                        want = np.asarray(force[name])
                        if want.shape != env[name].shape:
                            raise InputError(f"forced value {name!r} has shape {want.shape}, "
                                             f"the program computes {env[name].shape}")
                        env[name] = self._convert(want.astype(dtype), dtype, False)
        return env


def _normal_products(step: _Step, dtypes: dict) -> bool:
    """Whether a dequantize's nonzero results are normal fp16 numbers: |q - zp| is 1..255 (8-bit
    codes), so a scale of at least 2**-14 and at most 65504 / 256 keeps them in range."""
    codes = dict(step.vars).get("input")
    if codes is None or dtypes.get(codes) not in (np.int8, np.uint8):
        return False
    scale = step.consts.get("scale")
    if scale is None or np.asarray(scale).dtype.kind != "f":
        return False
    a = np.abs(np.asarray(scale, np.float32))
    return bool(a.size and a.min() >= 2.0**-14 and a.max() * 256 <= 65504)


def _fresh(val: np.ndarray) -> bool:
    """Whether an op's result is a new array of its own (safe to overwrite)."""
    return val.flags.owndata and val.flags.writeable and val.flags.c_contiguous and val.dtype == np.float32


def _dtype_of(val):
    return val.dtype.type if isinstance(val, (np.ndarray, np.generic)) else None


def _prepare_matmul(step: _Step) -> None:
    """A constant ``y`` that the op transposes is stored transposed once (BLAS wants it contiguous)."""
    y, ty = step.consts.get("y"), step.consts.get("transpose_y")
    if y is not None and ty is not None and bool(ty) and y.ndim >= 2:
        step.consts["y"] = np.ascontiguousarray(np.swapaxes(y, -1, -2))
        step.consts["transpose_y"] = np.bool_(False)
