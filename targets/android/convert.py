"""ONNX → ORT format, the way ONNX Runtime's own converter does it, with reproducible bytes.

The settings are those of ``python -m onnxruntime.tools.convert_onnx_models_to_ort
--optimization_style Fixed --target_platform arm`` (``_convert`` in that module): every graph
optimization applied when converting, the x86-only NCHWc transformer disabled, int8 QDQ allowed
(arm kernels run it). The same settings can save an ONNX file instead (:func:`optimize_to_onnx`):
pre-flight uses it to see which 4-bit weights ORT packs into MatMulNBits, and tests use it to
check ``required_operators.config`` independently of the ``.ort`` reader.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from edgeq._quiet import quiet
from edgeq.errors import InputError, UnsupportedError, first_line
from edgeq.runtime import ort_run_failure, ort_session
from targets.android import ortformat
from targets.android.ortformat import type_name
from targets.android.profile import DISABLED_OPTIMIZERS, KEEP_FLOAT16_DISABLED, SESSION_CONFIG


def session_options(output: Path, *, ort_format: bool = True):
    """The SessionOptions ORT's converter uses for a Fixed-style, arm .ort (or the same graph as ONNX)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(output)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if ort_format:
        so.add_session_config_entry("session.save_model_format", "ORT")
    return so


def disabled_optimizers(model: onnx.ModelProto) -> list[str]:
    """The converter's disabled optimizers, plus the two that would widen the model's float16 constants
    (initializers read through a Cast, as recipe gguf writes a GGUF's scales) to float32."""
    half = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    keeps_half = any(n.op_type == "Cast" and n.input and n.input[0] in half for n in model.graph.node)
    return [*DISABLED_OPTIMIZERS, *(KEEP_FLOAT16_DISABLED if keeps_half else ())]


def _optimize(model, output: Path, *, ort_format: bool, graph: onnx.ModelProto | None = None) -> None:
    """``graph``: ``model``'s graph when the caller already holds it (else read here, without weights)."""
    import onnxruntime as ort

    is_path = isinstance(model, (str, os.PathLike))
    if graph is None:
        graph = onnx.load(str(model), load_external_data=False) if is_path else model
    disabled = disabled_optimizers(graph)
    source = str(model) if is_path else model.SerializeToString()
    with quiet():
        ort.InferenceSession(source, session_options(output, ort_format=ort_format),
                             providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def optimize_to_onnx(model: onnx.ModelProto | Path, output: Path) -> onnx.ModelProto:
    """The graph the conversion produces, saved as ONNX (4-bit tensors allowed) and loaded back."""
    _optimize(model, Path(output), ort_format=False)
    return onnx.load(str(output))


def convert(onnx_file: Path, ort_file: Path, graph: onnx.ModelProto | None = None) -> None:
    """ONNX → ORT format with ORT's converter settings, then canonical bytes (``graph``: the file's, if held)."""
    try:
        _optimize(onnx_file, ort_file, ort_format=True, graph=graph)
    except Exception as e:
        raise UnsupportedError(f"ONNX Runtime cannot convert {onnx_file.name} to the ORT format: {first_line(e)}",
                               hint="run `edgeq validate` on the QDQ model to see whether ORT loads it") from e
    ortformat.canonicalize_file(ort_file)


def check_converted(data: bytes, model: onnx.ModelProto) -> None:
    """Fail, naming tensors and nodes, if the .ort holds tensors the format cannot store."""
    bad = ortformat.unstorable_tensors(data)
    if not bad:
        return
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(f"{node.name} ({node.op_type})")
        if node.op_type == "DequantizeLinear":  # name the op the weight is for, not only its DequantizeLinear
            users.setdefault(node.input[0], []).extend(
                f"{c.name} ({c.op_type})" for c in model.graph.node if node.output[0] in c.input)
    listed = "; ".join(
        f"{t.name!r} ({type_name(t.data_type)}) used by {', '.join(users.get(t.name, ['?']))}" for t in bad[:10]
    )
    raise UnsupportedError(
        f"the converted model keeps {len(bad)} tensor(s) of a type the ORT format cannot store: {listed}",
        hint="ONNX Runtime did not pack these 4-bit weights into MatMulNBits; "
             "quantize the float model again with `--profile android` (they fall back to int8)",
    )


def load_ort(path: Path):
    """The converted package in ONNX Runtime, or an UnsupportedError saying it does not load."""
    return ort_session(path, what=" (the converted package)", error=UnsupportedError,
                       hint="report this model; the QDQ ONNX itself may still run")


SMOKE_SIZES = (2, 16, 128, 512)  # sizes tried for the dynamic axes of the made-up feed, smallest first
SMOKE_MAX_VALUES = 2**20  # a size is skipped when an input would get more values (memory, time)


def smoke_run(session, name: str, source: Path | None = None) -> str:
    """Run the converted model once on a made-up feed (``passed``, or why it was skipped); raise if it fails.

    A file that loads can still fail on its first run: ONNX Runtime checks some attributes and
    shapes only when a kernel runs (a DequantizeLinear whose per-axis scale has the wrong length
    converts and loads, then fails), so no package is written unless its model ran. The feed has
    the model's input names and dtypes, dynamic axes of size 2 (as the export checks use) and
    values from a fixed seed (integers in [0, 10): valid token ids, masks and indices).

    Size 2 is too small for some models (a reflect Pad of 64 samples, an image downsampled 16
    times, a CTC recognizer's width, silero-vad's 256-sample STFT window). When the converted model
    fails and ``source`` (the ONNX it was converted from) fails on the same feed too, the feed is
    what is wrong, not the conversion: the next of ``SMOKE_SIZES`` that ``source`` runs is the feed
    the converted model must run (the batch axis stays 2: a longer window is what such models need,
    not more samples of it). A model that runs at no size (a broken DequantizeLinear) fails as before.
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # the failure is raised below; ORT would also print it as a log line
    try:
        feed = _causal_lm_feed(session)
        feeds = [(None, feed)] if feed is not None else _made_up_feeds(session)
    except InputError as e:  # an input type edgeq cannot make (string, uint16, ...): say so in the manifest
        return f"skipped: {e.message}"
    size, feed = feeds[0]
    try:
        session.run(None, feed, options)
        return "passed"
    except Exception as e:
        first = e
    found = _size_the_source_runs(source, feeds, options) if source is not None and size is not None else None
    if found is not None:
        size, feed = found
        try:
            session.run(None, feed, options)
            return (f"passed with dynamic axes of size {size} (size {feeds[0][0]} does not run the source model "
                    f"either: {ort_run_failure(first)})")
        except Exception as e:
            first = e
    raise UnsupportedError(f"the converted {name} fails on its first run in ONNX Runtime: {ort_run_failure(first)}",
                           hint="the model is invalid where ONNX Runtime checks only at run time; quantize "
                                "the float model again, or check the QDQ model with `edgeq validate`") from first


def _made_up_feeds(session) -> list[tuple[int, dict]]:
    """(size, feed) with every dynamic axis of that size (after the first, the batch axis stays at the
    first size when there are other dynamic axes), for each of ``SMOKE_SIZES`` within the cap."""
    import numpy as np

    from edgeq.validate.runners import session_input_spec

    specs = [session_input_spec(arg) for arg in session.get_inputs()]
    batch = next((d for s in specs for d in s.shape[:1] if isinstance(d, str)), None)  # the first input's axis 0
    out = []
    for size in SMOKE_SIZES:
        sizes = {d: size for s in specs for d in s.shape if isinstance(d, str)}
        if batch is not None and size > SMOKE_SIZES[0] and len(sizes) > 1:
            sizes[batch] = SMOKE_SIZES[0]
        if out and (not sizes or any(np.prod(s.concrete_shape(sizes)) > SMOKE_MAX_VALUES for s in specs)):
            continue
        rng = np.random.default_rng(0)
        out.append((size, {s.name: s.random(rng, sizes) for s in specs}))
    return out


def _size_the_source_runs(source: Path, feeds: list[tuple[int, dict]], options) -> tuple[int, dict] | None:
    """The first (size, feed) the source model runs, if it fails on the first one; else None."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        src = ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    except Exception:  # the source does not load here: nothing to learn from it
        return None
    for i, (size, feed) in enumerate(feeds):
        try:
            src.run(None, feed, options)
        except Exception:
            continue
        return None if i == 0 else (size, feed)
    return None


def _causal_lm_feed(session) -> dict | None:
    """A consistent decoder step for a causal LM (its axes depend on each other: the mask covers past +
    new tokens, positions count on from the past): 2 tokens after a past of 2; None for other models."""
    import numpy as np

    from edgeq.export.causal_lm import is_causal_lm_io

    inputs = {a.name: a for a in session.get_inputs()}
    if not is_causal_lm_io(list(inputs), [o.name for o in session.get_outputs()]):
        return None
    past, new = 2, 2
    feed = {"input_ids": np.arange(3, 3 + new, dtype=np.int64)[None],
            "attention_mask": np.ones((1, past + new), np.int64),
            "position_ids": np.arange(past, past + new, dtype=np.int64)[None]}
    for name, arg in inputs.items():
        if name.startswith("past_key_values."):
            heads, head_dim = arg.shape[1], arg.shape[3]
            dtype = np.float16 if "float16" in arg.type else np.float32
            feed[name] = np.zeros((1, heads, past, head_dim), dtype)
    return feed


def write_config(ort_file: Path, config: Path) -> None:
    """ORT's required_operators.config for ``ort_file``, with the file named relatively (reproducible)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its "Created config in ..." line
    tmp = config.with_name(config.name + ".tmp")
    with quiet():
        create_config_from_models([ort_file], tmp, enable_type_reduction=False)
    lines = []
    for line in tmp.read_text().splitlines():
        lines.append(f"# - {ort_file.name}" if line.startswith("# - ") else line)
    config.write_text("\n".join(lines) + "\n")
    os.remove(tmp)

