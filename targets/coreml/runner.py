"""``.mlpackage`` files in ``edgeq validate``: the reference executor behind the Runner interface.

The runner speaks the source model's language: its inputs are the ONNX inputs (names, dtypes,
named dynamic axes, as recorded in the package's metadata), so the same feeds go to the QDQ
ONNX and to the package. int64 feeds are narrowed to Core ML's int32 (an error when a value does
not fit); float feeds are float32.

Engines: the numpy reference executor (:mod:`.executor`) defines what the package computes and
always loads (states use it); ``run`` and ``run_program`` (kept intermediates, teacher-forced runs:
the W8A8 segment acceptance) use its translation into ONNX Runtime graphs
(:mod:`.executor.to_onnx`; ~2x faster on MiniLM, ~2.6x on EfficientNet-Lite0) when the program
translates, and otherwise the numpy executor, saying why in ``describe()`` (``note``).

A stateful package (a causal LM whose KV cache is Core ML state, ``kv_cache`` set) runs with a
state from :meth:`MLPackageRunner.make_state`, passed to every :meth:`MLPackageRunner.run` of a
sequence (:class:`edgeq.generate.CausalLM` does this); states run in the numpy executor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from edgeq.errors import InputError, UnsupportedError
from edgeq.specs import TensorSpec
from edgeq.validate.runners import Runner

_INT32 = np.iinfo(np.int32)


class MLPackageRunner(Runner):
    """Runs a saved ``.mlpackage`` with the reference executor (any OS).

    ``engine``: "auto" (the ONNX Runtime translation when the program translates, else numpy),
    "numpy", or "onnxruntime" (an UnsupportedError when the program does not translate).
    """

    kind = "coreml-reference"

    def __init__(self, path: str | os.PathLike, *, engine: str = "auto"):
        from targets.coreml.executor import Executor, read_program

        if engine not in ("auto", "numpy", "onnxruntime"):
            raise InputError(f"unknown engine {engine!r}", hint="auto, numpy or onnxruntime")
        self.path = Path(path)
        super().__init__(self.path.name)
        prog, spec = read_program(self.path)
        self.executor = Executor(prog)
        self.fast = None  # the translated program, when it runs this package
        self.note = ""  # why the numpy executor runs it, when it could have been translated
        self._untranslated: set = set()  # (keep, force) names run_program runs in numpy
        if engine != "numpy":
            self._translate(engine)
        meta = dict(spec.description.metadata.userDefined)
        self.precision = meta.get("edgeq.compute_precision", "unknown")
        self._inputs = json.loads(meta["edgeq.inputs"]) if "edgeq.inputs" in meta else _from_spec(spec, "input")
        self._outputs = json.loads(meta["edgeq.outputs"]) if "edgeq.outputs" in meta else _from_spec(spec, "output")
        self._ranges = {k: tuple(v) for k, v in json.loads(meta.get("edgeq.flexible_axes", "{}")).items()}
        # the KV cache as states (num_layers, kv_heads, head_dim, max_context, states), or None
        self.kv_cache = json.loads(meta["edgeq.kv_cache"]) if "edgeq.kv_cache" in meta else None
        # the source model's metadata edgeq carried into the package (a causal LM's facts)
        self.metadata = {k.removeprefix("edgeq.source_meta."): v for k, v in meta.items()
                         if k.startswith("edgeq.source_meta.")}

    def _translate(self, engine: str) -> None:
        from targets.coreml.executor.to_onnx import OrtProgram, Untranslatable

        try:
            self.fast = OrtProgram(self.executor)
        except Untranslatable as e:
            if engine == "onnxruntime":
                raise UnsupportedError(f"{self.label}: the program does not translate to ONNX: {e}",
                                       hint="run it with engine='numpy'") from None
            self.note = f"numpy reference executor (not translated to ONNX Runtime: {e})"

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.fast is not None else "numpy"

    @property
    def input_specs(self):
        return [TensorSpec(i["name"], tuple(i["shape"]), i["onnx_dtype"]) for i in self._inputs]

    @property
    def output_names(self):
        return [o["name"] for o in self._outputs]

    def make_state(self):
        """Fresh state buffers (zeros) for :meth:`run`, like Core ML's ``MLModel.makeState()``."""
        return self.executor.make_state()

    def run(self, feed, state=None):
        feeds = self.coreml_feeds(feed)
        out = self.fast.run(feeds) if self.fast is not None and state is None else self.executor.run(feeds, state=state)
        return {o["name"]: out[o["coreml_name"]].astype(np.float32 if o["coreml_dtype"] == "float32" else np.int64)
                for o in self._outputs}

    def run_program(self, feeds: dict[str, np.ndarray], *, keep=None, force=None,
                    fp16_as_float32: bool = False) -> dict[str, np.ndarray]:
        """:meth:`.executor.Executor.run` on Core ML feeds (e.g. from :meth:`coreml_feeds`), with its
        ``keep`` and ``force``: translated for the (keep, forced names) pair on first use when the
        program translates (the acceptance's teacher-forced segment runs), else in numpy. Values by
        Core ML name, in their declared dtypes (fp16 ones as float32 if ``fp16_as_float32``)."""
        from targets.coreml.executor.to_onnx import Untranslatable

        if self.fast is not None:
            key = (frozenset(keep or ()), frozenset(force or ()))
            if key not in self._untranslated:
                try:
                    return self.fast.run(feeds, keep=keep, force=force, fp16_as_float32=fp16_as_float32)
                except Untranslatable:  # e.g. a forced value of a type ONNX cannot feed: numpy runs it
                    self._untranslated.add(key)
        out = self.executor.run(feeds, keep=keep, force=force)
        if fp16_as_float32:
            out = {n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in out.items()}
        return out

    def coreml_feeds(self, feed) -> dict[str, np.ndarray]:
        """The package's feeds (Core ML names and dtypes) for feeds by ONNX input name, checked."""
        feeds = {}
        for i in self._inputs:
            x = np.asarray(feed[i["name"]])
            for axis, want in enumerate(i["shape"]):
                if isinstance(want, str) and want in self._ranges:
                    lo, hi = self._ranges[want]
                    if not lo <= x.shape[axis] <= hi:
                        raise InputError(f"{self.label}: input {i['name']!r} axis {want!r} is {x.shape[axis]}, "
                                         f"outside the package's range {lo}..{hi}",
                                         hint="package with shapes={...} covering it")
            if i["coreml_dtype"] == "int32":
                if x.size and (x.max() > _INT32.max or x.min() < _INT32.min):
                    raise InputError(f"{self.label}: input {i['name']!r} has values outside int32, "
                                     "which Core ML inputs cannot carry")
                x = x.astype(np.int32)
            else:
                x = x.astype(np.float32)
            feeds[i["coreml_name"]] = x.reshape(1) if x.ndim == 0 else x  # Core ML takes a scalar as [1]
        return feeds

    def describe(self):
        d = {"kind": self.kind, "engine": self.engine, "label": self.label, "path": str(self.path),
             "compute_precision": self.precision}
        return {**d, "note": self.note} if self.note else d


def _from_spec(spec, kind: str) -> list[dict]:
    """I/O of a package edgeq did not write: names and dtypes from the Core ML description."""
    items = spec.description.input if kind == "input" else spec.description.output
    out = []
    for f in items:
        arr = f.type.multiArrayType
        dtype = "int32" if arr.dataType == arr.INT32 else "float32"
        shape = list(arr.shape) or [f"{f.name}_dim{i}" for i in range(len(arr.shape))]
        out.append({"name": f.name, "coreml_name": f.name, "onnx_dtype": dtype, "coreml_dtype": dtype,
                    "shape": shape})
    return out


def coreml_predict_available() -> tuple[bool, str]:
    """Whether Core ML's own ``predict`` can run here, and why not."""
    if sys.platform != "darwin":
        return False, f"Core ML runs only on macOS (this is {sys.platform})"
    try:
        from coremltools import libcoremlpython  # noqa: F401
    except ImportError as e:
        return False, f"coremltools has no Core ML bindings here ({e})"
    return True, ""


def coreml_predict(path: str | os.PathLike, feeds: dict[str, np.ndarray], compute_units: str = "CPU_ONLY") -> dict:
    """Core ML's own prediction (macOS only), by Core ML feature name."""
    import coremltools as ct

    model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
    return model.predict(feeds)
