"""ONNX Runtime sessions, made one way: quiet, CPU, ``.ort`` recognised, failures as errors for people;
and numpy's BLAS kept on one thread where it alternates with them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path

from edgeq.errors import EdgeqError, InputError, first_line


def ort_session(model, *, config: Mapping[str, str] | None = None, what: str = "",
                hint: str = "check the file was written by a complete export", threads: int | None = None,
                optimize: bool = True, spin: bool = True, options=None, error: type[EdgeqError] = InputError):
    """A quiet ONNX Runtime CPU session for ``model`` (a path, ``.ort`` included, or serialized bytes).

    ``config``: session config entries; ``threads``: intra-op threads (None: ORT's default);
    ``optimize=False`` turns graph optimizations off; ``spin=False`` stops idle intra-op threads
    spinning (ORT's default spins, as an app's session does; edgeq's validation and calibration run
    several sessions in turn, and a spinning idle session takes CPU from the running one);
    ``options``: a SessionOptions to start from.
    Raises ``error`` (an InputError by default) naming the model when ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    # fatal only: a failing kernel's error log would repeat, as raw text, what the exception raised here says
    so.log_severity_level = 4
    if threads is not None:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    config = dict(config or {})
    if not spin:
        config.setdefault("session.intra_op.allow_spinning", "0")
    if isinstance(model, (str, Path)) and Path(model).suffix == ".ort":
        config.setdefault("session.load_model_format", "ORT")
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    source = model if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        name = "the model" if isinstance(model, (bytes, bytearray)) else str(model)
        raise error(f"ONNX Runtime cannot load {name}{what}: {first_line(e)}", hint=hint) from e


# ORT's message for a failing kernel: "... while running <Op> node. Name:'<node>' Status Message: <why>",
# where <why> may start with the C++ location and the failed condition ("<file>:<line> <fn> <cond> was false.")
_KERNEL_FAILURE = re.compile(r"running (?P<op>\S+) node\. Name:'(?P<node>[^']*)' Status Message: (?P<why>.*)",
                             re.DOTALL)
_CXX_CONDITION = re.compile(r"^\S+:\d+ .*? was false\.\s*", re.DOTALL)


def ort_run_failure(e: BaseException) -> str:
    """``node 'name' (Op): why`` from an ONNX Runtime run error, or its first line."""
    m = _KERNEL_FAILURE.search(str(e))
    if m is None:
        return first_line(e)
    why = _CXX_CONDITION.sub("", m["why"].strip()) or m["why"].strip()
    return f"node {m['node']!r} ({m['op']}): {why.splitlines()[0][:300]}"


def single_threaded_blas():
    """A context in which numpy's BLAS runs on the calling thread only (a no-op without threadpoolctl).

    Why: OpenBLAS's idle threads spin, and so do ONNX Runtime's; alternating the two on a loaded
    2-core machine, multi-threaded BLAS made MiniLM's W4A16 quantization 2.2x slower in wall time
    (134 s vs 61 s, identical output) and a 384x384 Cholesky take 1.3 s instead of 2 ms.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


_blas_controller = None
