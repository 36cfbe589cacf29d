"""A reference executor for saved Core ML ML programs: MIL semantics, op by op, in numpy.

It reads the ``.mlpackage`` a user ships (its ``model.mlmodel`` program and ``weights/``
file, through coremltools' milproto loader) and runs every operation in order. Precision
follows the program: each op computes in float32 from its (possibly fp16) inputs and its result
is rounded to the dtype the program declares for that output — fp16 storage with fp32
arithmetic inside an op, which is how Core ML's GPU and Neural Engine kernels behave. Constexpr
weights are expanded exactly (int8/int4 codes times float32 scales).

An op this executor does not know fails by name; nothing is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeq._quiet import quiet
from edgeq.errors import InputError, UnsupportedError
from targets.coreml.executor import ops_math, ops_nn, ops_tensor

OPS = {**ops_math.OPS, **ops_tensor.OPS, **ops_nn.OPS}

_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int16": np.int16,
           "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_, "int64": np.int64}


def weights_dir(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights"


def load_program(package: str | os.PathLike):
    """The MIL program and the Core ML spec of a saved ``.mlpackage``."""
    p = Path(package)
    if not (p / "Manifest.json").exists():
        raise InputError(f"{p} is not an .mlpackage (no Manifest.json)", hint="give the .mlpackage folder")
    with quiet():
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

        spec = ct.utils.load_spec(str(p))
        if spec.WhichOneof("Type") != "mlProgram":
            raise InputError(f"{p} holds a {spec.WhichOneof('Type')} model, not an ML program")
        prog = milproto_load(spec, spec.specificationVersion, file_weights_dir=str(weights_dir(p)))
    return prog, spec


class Executor:
    """Runs the ``main`` function of a MIL program on numpy feeds (by Core ML feature name)."""

    def __init__(self, program):
        from coremltools.converters.mil.mil import types

        self._types = types
        self.func = program.functions["main"]
        self.ops = list(self.func.operations)
        missing = sorted({op.op_type for op in self.ops if op.op_type not in OPS and op.op_type != "const"})
        if missing:
            raise UnsupportedError(f"the reference executor has no implementation of MIL {', '.join(missing)}",
                                   hint="add them to targets/coreml/executor")
        self.input_dtypes = {n: self._np(v.dtype) for n, v in self.func.inputs.items()}
        self.output_names = [v.name for v in self.func.outputs]
        self._consts = {}
        self._steps = []
        for op in self.ops:  # ops that read only constants (constexpr weights and their casts) run once
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = op.outputs[0].val
            elif op.inputs and all(v.name in self._consts for v in self._vars(op)):
                self._execute(op, self._consts)
            else:
                self._steps.append(op)

    @staticmethod
    def _vars(op):
        for v in op.inputs.values():
            yield from (v if isinstance(v, (list, tuple)) else [v])

    def _execute(self, op, env: dict) -> None:
        args = {}
        for param, v in op.inputs.items():
            args[param] = [env[x.name] for x in v] if isinstance(v, (list, tuple)) else env[v.name]
        try:
            out = OPS[op.op_type](**args)
        except Exception as e:
            raise UnsupportedError(f"reference executor: MIL op {op.name!r} ({op.op_type}) failed: "
                                   f"{type(e).__name__}: {str(e)[:200]}") from e
        outs = out if isinstance(out, (list, tuple)) else [out]
        for var, val in zip(op.outputs, outs):
            dtype = self._np(var.dtype)
            val = np.asarray(val)
            if dtype is not None and val.dtype != dtype:
                with np.errstate(over="ignore", invalid="ignore"):
                    val = val.astype(dtype)
            env[var.name] = val

    @classmethod
    def from_package(cls, package: str | os.PathLike) -> "Executor":
        prog, _ = load_program(package)
        return cls(prog)

    def _np(self, builtin):
        name = self._types.builtin_to_string(builtin)
        return _DTYPES.get(name, np.int8 if name in ("int4", "uint4") else None)

    def run(self, feeds: dict[str, np.ndarray], *, keep: set[str] | None = None,
            force: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Outputs (and the values named in ``keep``) for one set of inputs.

        ``force`` replaces the values it names as soon as they are computed (cast to the
        program's dtype for them): a teacher-forced run, e.g. every activation ``dequantize``
        output set to the reference run's, so that each segment between two quantization points
        is compared on its own.
        """
        env = dict(self._consts)
        for name, dtype in self.input_dtypes.items():
            if name not in feeds:
                raise InputError(f"missing input {name!r}", hint=f"the model takes {', '.join(self.input_dtypes)}")
            env[name] = np.asarray(feeds[name]).astype(dtype, copy=False)
        force = force or {}
        unknown = sorted(set(force) - {v.name for op in self._steps for v in op.outputs})
        if unknown:
            raise InputError(f"cannot force {', '.join(unknown[:5])}: not computed by the program")
        for op in self._steps:
            self._execute(op, env)
            for var in op.outputs:
                if var.name in force:
                    want = np.asarray(force[var.name])
                    if want.shape != env[var.name].shape:
                        raise InputError(f"forced value {var.name!r} has shape {want.shape}, "
                                         f"the program computes {env[var.name].shape}")
                    env[var.name] = want.astype(env[var.name].dtype)
        result = {n: env[n] for n in self.output_names}
        for n in keep or ():
            result[n] = env[n]
        return result
