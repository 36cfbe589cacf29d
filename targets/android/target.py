"""The Android target: a QDQ ONNX model → an ONNX Runtime Mobile package.

``build`` writes, into the folder :func:`targets.base.package` gives it:

- ``model.onnx``: the QDQ model, byte for byte as given (the source of truth);
- ``model.ort``: the ORT format model, converted by ONNX Runtime itself with the settings of
  ``convert_onnx_models_to_ort --optimization_style Fixed --target_platform arm`` (why Fixed: see
  ``targets/android/README.md``), then made byte-reproducible (:mod:`targets.android.ortformat`);
- ``required_operators.config``: the operators of ``model.ort``, as ORT's converter writes it,
  for a reduced-size ONNX Runtime build (``--include_ops_by_config``).

After writing, the ``.ort`` is checked: no tensor of a type the format cannot hold, it loads in
ONNX Runtime with the inputs and outputs of the QDQ model, and it runs once (a smoke run on a
made-up feed), all in the temporary folder before the package moves into place.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeq import onnx_io
from edgeq.errors import UnsupportedError
from edgeq.quant.profile import TargetProfile
from targets.android import ortformat
from targets.android.convert import check_converted, convert, disabled_optimizers, load_ort, smoke_run, write_config
from targets.android.llm import is_causal_lm, readme_section, write_llm_files
from targets.android.preflight import nnapi_partitions, preflight
from targets.android.profile import ANDROID, KEEP_FLOAT16_DISABLED, OPTIMIZATION_LEVEL, SESSION_CONFIG
from targets.base import Problem, Target

MODEL_ORT = "model.ort"
MODEL_ONNX = "model.onnx"
CONFIG = "required_operators.config"
ANDROID_PACKAGE = "com.microsoft.onnxruntime:onnxruntime-android"


class AndroidTarget(Target):
    """ONNX Runtime Mobile (``onnxruntime-android``), CPU execution provider."""

    name = "android"
    description = "ONNX Runtime Mobile on Android: .ort + required_operators.config"

    @property
    def profile(self) -> TargetProfile:
        return ANDROID

    def preflight(self, model: onnx.ModelProto) -> list[Problem]:
        return preflight(model, self.profile)

    def build(self, model_path: Path, model: onnx.ModelProto, folder: Path) -> tuple[Path, dict]:
        import onnxruntime as ort

        onnx_file = onnx_io.copy_onnx(Path(model_path), folder / MODEL_ONNX)
        ort_file = folder / MODEL_ORT
        convert(onnx_file, ort_file, model)  # the graph it already read: not parsed again
        data = ort_file.read_bytes()
        check_converted(data, model)
        session = load_ort(ort_file)
        check_io(session, model)
        first_run = smoke_run(session, f"{MODEL_ORT} (from {Path(model_path).name})", onnx_file)
        del session
        write_config(ort_file, folder / CONFIG)
        facts = {
            "runtime": {
                "package": ANDROID_PACKAGE,
                "execution_provider": "CPU",
                "converted_with_onnxruntime": ort.__version__,
                "minimum_onnxruntime_version": minimum_ort_version(ort.__version__),
                "minimum_version_reason": "ONNX Runtime loads .ort files written by the same or an older release, "
                                          "not newer ones, and this file holds operators this release fused",
                "ort_format_version": ortformat.format_version(data),
                "session_options": {
                    "intra_op_num_threads": "the speed edgeq reports was measured with 2; set the phone's big cores",
                    "mlas.qnbit.force_fp32": "do not set: it moves MatMulNBits to a slower fp32 kernel",
                    "matmulnbits_accuracy_level": "4 (int8 compute), an attribute of the nodes, set at conversion",
                },
            },
            "conversion": {
                "tool": "onnxruntime.tools.convert_onnx_models_to_ort (its session options)",
                "optimization_style": "Fixed",
                "optimization_level": OPTIMIZATION_LEVEL,
                "target_platform": "arm",
                "disabled_optimizers": disabled_optimizers(model),
                "session_config": dict(SESSION_CONFIG),
            },
            "tools": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
            "inputs": [_spec(s) for s in onnx_io.io_specs(model)],
            "outputs": [_spec(s) for s in onnx_io.io_specs(model, outputs=True)],
            "operators": operators(data),
            "first_run": first_run,
            "nnapi_partitions": nnapi_partitions(model),
        }
        if set(KEEP_FLOAT16_DISABLED) <= set(facts["conversion"]["disabled_optimizers"]):
            facts["conversion"]["float16_constants"] = ("kept float16 (not widened to float32 at conversion): "
                                                        "the file stays small; their casts run on every call")
        if is_causal_lm(model):
            facts.update(write_llm_files(model, folder, MODEL_ORT))
        return ort_file, facts

    def readme(self, manifest: dict) -> str:
        from targets.android.readme import render

        text = render(manifest)
        if "causal_lm" in manifest:
            text += readme_section(manifest)
        return text


def _spec(s) -> dict:
    return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}


def minimum_ort_version(version: str) -> str:
    major, minor = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return f"{major}.{minor}.0"


def check_io(session, model: onnx.ModelProto) -> None:
    want = ([s.name for s in onnx_io.io_specs(model)], [s.name for s in onnx_io.io_specs(model, outputs=True)])
    got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if want != got:
        raise UnsupportedError(f"the converted model's inputs/outputs {got} differ from the QDQ model's {want}")


def operators(data: bytes) -> dict[str, list[str]]:
    """Operators of the .ort by domain (``required_operators.config`` adds their versions)."""
    out: dict[str, set[str]] = {}
    for domain, _, op in ortformat.node_ops(data):
        out.setdefault(domain, set()).add(op)
    return {d: sorted(ops) for d, ops in sorted(out.items())}
