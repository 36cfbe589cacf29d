"""Runners: one narrow interface over everything edgeq can execute on the host.

A runner takes a feed (input name → numpy array) and returns the named outputs. ``validate``
only talks to this interface; which runner opens a given model is decided by a registry keyed
by file suffix. Targets plug their package formats in (``.ort``, ``.mlpackage``) through the
``edgeq.runners`` entry-point group, so validate never imports a target.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeq import onnx_io
from edgeq.errors import InputError, UnsupportedError
from edgeq.runtime import ort_run_failure, ort_session
from edgeq.specs import DTYPES, TensorSpec


class Runner(ABC):
    """Runs one model on the host."""

    kind: str = "runner"

    def __init__(self, label: str):
        self.label = label
        self._specs: list[TensorSpec] | None = None
        self._outputs: list[str] | None = None

    @property
    def input_specs(self) -> list[TensorSpec] | None:
        """The inputs the model takes, or None when the model does not say (a torch module)."""
        return self._specs

    @property
    def output_names(self) -> list[str] | None:
        """Output names in order, or None when unknown until the first run."""
        return self._outputs

    @abstractmethod
    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of the model on one feed, by name."""

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label}


class IntermediateRunner(Runner):
    """A runner that can also return intermediate tensors, matched across models by name."""

    @abstractmethod
    def value_names(self) -> list[str]:
        """Float intermediate tensors it can return, in graph order."""

    @abstractmethod
    def run_values(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Outputs plus the named intermediates on one feed."""


class TorchRunner(Runner):
    """Runs an ``nn.Module``; inputs are passed positionally in ``input_names`` order."""

    kind = "torch"

    def __init__(self, module, *, input_specs: Sequence[TensorSpec] | None = None,
                 output_names: Sequence[str] | None = None, label: str | None = None):
        super().__init__(label or type(module).__name__)
        self.module = module.eval()
        self._specs = list(input_specs) if input_specs else None
        self._outputs = list(output_names) if output_names else None

    def bind(self, input_specs: Sequence[TensorSpec], output_names: Sequence[str]) -> None:
        """Adopt the candidate's input order and output names when the module has none."""
        self._specs = self._specs or list(input_specs)
        self._outputs = self._outputs or list(output_names)

    def run(self, feed):
        from edgeq.export.torch_export import run_torch

        if self._specs is None:
            raise InputError(f"torch model {self.label}: input names are unknown", hint="give input specs")
        outs = run_torch(self.module, feed, [s.name for s in self._specs])
        names = self._outputs or (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
        if len(names) != len(outs):
            raise InputError(
                f"torch model {self.label} returned {len(outs)} outputs but {len(names)} names are expected "
                f"({', '.join(names)})"
            )
        return dict(zip(names, outs))


class SessionRunner(Runner):
    """A runner backed by one ONNX Runtime session: inputs, outputs and ``run`` come from it."""

    def __init__(self, label: str, session, specs: list[TensorSpec]):
        super().__init__(label)
        self._sess = session
        self._specs = specs
        self._outputs = [o.name for o in session.get_outputs()]

    def run(self, feed):
        return self._run(self._sess, self._outputs, feed)

    def _run(self, session, names, feed) -> dict:
        try:
            return dict(zip(names, session.run(names, dict(feed))))
        except Exception as e:
            raise UnsupportedError(f"{self.label} fails when ONNX Runtime runs it: {ort_run_failure(e)}",
                                   hint="the model is invalid where ONNX Runtime checks only at run time; "
                                        "export or quantize it again") from e


class OnnxRunner(SessionRunner, IntermediateRunner):
    """Runs an ONNX file in ONNX Runtime (CPU), with its default graph optimizations."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._proto = onnx_io.read_onnx(self.path)
        super().__init__(self.path.name, ort_session(self.path, spin=False), onnx_io.io_specs(self._proto))
        self._values: list[str] | None = None
        self._value_sess = None

    def _typed_values(self):
        import onnx

        if self._values is None:
            proto = self._proto
            if proto.ByteSize() < onnx_io.EXTERNAL_DATA_THRESHOLD_BYTES:
                proto = onnx.shape_inference.infer_shapes(proto)
            graph_io = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
            typed = {
                v.name: v
                for v in proto.graph.value_info
                if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            }
            order = []
            for node in proto.graph.node:
                for o in node.output:
                    if o in typed and o not in graph_io:
                        order.append(o)
            self._values = order
            self._typed = typed
            self._inferred = proto
        return self._values

    def value_names(self):
        return list(self._typed_values())

    def run_values(self, feed, names):
        if self._value_sess is None or self._value_sess[0] != tuple(names):
            model = self._inferred.__class__()
            model.CopyFrom(self._inferred)
            for n in names:
                model.graph.output.append(self._typed[n])
            sess = ort_session(model.SerializeToString(), what=f" ({self.label} with its intermediates exposed)",
                               spin=False)
            self._value_sess = (tuple(names), sess)
        return self._run(self._value_sess[1], self._outputs + list(names), feed)

    def describe(self):
        return {"kind": self.kind, "label": self.label, "path": str(self.path)}


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def session_input_spec(arg) -> TensorSpec:
    """The spec of an ONNX Runtime session input (an unnamed dynamic axis gets a name)."""
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None or dtype not in DTYPES:
        raise InputError(f"input {arg.name!r} has type {arg.type}, which edgeq cannot feed")
    dims = tuple(d if isinstance(d, int) else (d or f"{arg.name}_dim{i}") for i, d in enumerate(arg.shape))
    return TensorSpec(arg.name, dims, dtype)


RunnerFactory = Callable[[Path], Runner]
_BY_SUFFIX: dict[str, RunnerFactory] = {".onnx": OnnxRunner}


def register_runner(suffix: str, factory: RunnerFactory) -> None:
    """Make ``open_runner`` use ``factory`` for paths ending in ``suffix``."""
    _BY_SUFFIX[suffix.lower()] = factory


def _plugin_factories() -> dict[str, RunnerFactory]:
    found = {}
    for ep in metadata.entry_points(group="edgeq.runners"):
        found[ep.name.lower()] = ep
    return found


def open_runner(model, **torch_kwargs) -> Runner:
    """A runner for ``model``: a Runner, an ``nn.Module``, or a path whose suffix is registered."""
    if isinstance(model, Runner):
        return model
    if _is_torch_module(model):
        return TorchRunner(model, **torch_kwargs)
    if isinstance(model, (str, os.PathLike)):
        path = package_model_file(Path(model))
        suffix = path.suffix.lower()
        factory = _BY_SUFFIX.get(suffix)
        if factory is None:
            ep = _plugin_factories().get(suffix)
            if ep is not None:
                factory = ep.load()
                register_runner(suffix, factory)
        if factory is None:
            known = sorted(set(_BY_SUFFIX) | set(_plugin_factories()))
            raise InputError(f"no runner for {path.name!r}", hint=f"edgeq runs {', '.join(known)} files")
        if not path.exists():
            raise InputError(f"model file not found: {path}", hint="check the path")
        return factory(path)
    raise InputError(f"cannot run a {type(model).__name__}", hint="give a path to a model file or an nn.Module")


def package_model_file(path: Path) -> Path:
    """The runnable model of a package folder (its ``manifest.json`` names it); other paths unchanged.

    A folder whose suffix has a runner (``.mlpackage``) is a model itself, not a package.
    """
    suffix = path.suffix.lower()
    if not path.is_dir() or suffix in _BY_SUFFIX or suffix in _plugin_factories():
        return path
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{path} is a folder without manifest.json",
                         hint="give a model file, or a package folder written by `edgeq package`")
    import json

    try:
        model_file = json.loads(manifest.read_text())["model_file"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read the model file name from {manifest}: {e}",
                         hint="package the model again with `edgeq package`") from e
    return path / model_file


def _is_torch_module(obj) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
