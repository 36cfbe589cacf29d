"""From a QDQ ONNX to a saved ``.mlpackage``: lower, convert (no precision pass), describe, save.

The program is built in the precision edgeq chose (see :mod:`targets.coreml.lower.context`), so
``ct.convert`` runs with ``compute_precision=FLOAT32`` (no automatic fp16 casts that would
round the weight scales) and the cleanup pass pipeline only (dead code, constant folding of
non-weight constants, name dedup): what is saved is what the reference executor runs.

The saved ``.mlpackage`` is byte-reproducible: the same QDQ ONNX gives the same files in any
process (see :func:`make_reproducible`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from edgeq import __version__
from edgeq._quiet import quiet
from targets.coreml.lower import Lowered, lower_model

META_PREFIX = "edgeq."
# ONNX metadata a stateful causal LM package carries (as edgeq.source_meta.<key>): its generation facts
SOURCE_META_KEYS = ("edgeq.causal_lm", "edgeq.source")
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
# namespace of the item identifiers in an .mlpackage's Manifest.json (uuid5 of the item's content)
PACKAGE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://edgeq/coreml/mlpackage-item")


def quantization_summary(model: onnx.ModelProto) -> dict:
    """What the QDQ graph quantized: weight formats by count, activation pairs, recipe and profile."""
    inits = {i.name: i for i in model.graph.initializer}
    weights: Counter = Counter()
    acts = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type).lower()
            if t != "int32":
                weights[t] += 1
        elif n.op_type == "QuantizeLinear":
            acts += 1
    props = {p.key: p.value for p in model.metadata_props}
    return {
        "recipe": props.get("edgeq.recipe", "unknown"),
        "profile": props.get("edgeq.profile", "unknown"),
        "weights": dict(sorted(weights.items())),
        "activation_qdq": acts,
    }


def _input_types(ct, low: Lowered) -> list:
    out = []
    for spec in low.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                lo, hi = low.flexible[d]
                dims.append(ct.RangeDim(lower_bound=lo, upper_bound=hi, default=lo))
        dtype = np.float32 if spec.coreml_dtype == "float32" else np.int32
        out.append(ct.TensorType(name=spec.mil_name, shape=ct.Shape(dims or [1]), dtype=dtype))  # a scalar as [1]
    return out


def build_mlpackage(
    model: onnx.ModelProto,
    dest: Path,
    *,
    deployment: int,
    compute: str = "fp16",
    shapes: Mapping | None = None,
    source_name: str = "",
    kv_cache=None,
) -> tuple[Lowered, dict]:
    """Lower ``model`` and save it as ``dest`` (a ``.mlpackage`` folder). Returns the lowering and facts.

    ``kv_cache`` (a :class:`~targets.coreml.lower.stateful.KVCacheSpec`): a causal LM's cache as
    states; the package's metadata then lists them (``edgeq.kv_cache``)."""
    with quiet():
        import coremltools as ct

    low = lower_model(model, compute=compute, deployment=deployment, shapes=shapes, kv_cache=kv_cache)
    target = {17: ct.target.iOS17, 18: ct.target.iOS18}[deployment]
    with quiet():
        ml = ct.convert(
            low.program, convert_to="mlprogram", minimum_deployment_target=target,
            compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.CLEANUP,
            inputs=_input_types(ct, low), skip_model_load=True,
        )
    summary = quantization_summary(model)
    ml.short_description = (f"{source_name or 'model'} lowered by edgeq {__version__} from its QDQ ONNX "
                            f"({summary['recipe']}), {compute} compute, iOS {deployment}+")
    ml.version = __version__
    for spec in low.inputs:
        ml.input_description[spec.mil_name] = _describe(spec, low.flexible, "input")
    for spec in low.outputs:
        ml.output_description[spec.mil_name] = _describe(spec, low.flexible, "output")
    meta = {
        "version": __version__,
        "source_model": source_name,
        "compute_precision": compute,
        "deployment_target": f"iOS{deployment}",
        "inputs": json.dumps([_io(s) for s in low.inputs]),
        "outputs": json.dumps([_io(s) for s in low.outputs]),
        "flexible_axes": json.dumps({k: list(v) for k, v in low.flexible.items()}),
        "quantization": json.dumps(summary, sort_keys=True),
    }
    if kv_cache is not None:
        meta["kv_cache"] = json.dumps({**kv_cache.as_dict(), "states": kv_cache.states()})
        # the generation facts (special tokens, limits) the explicit-cache graph carries; the
        # tokenizer is too large for metadata: it is written beside the package
        for p in model.metadata_props:
            if p.key in SOURCE_META_KEYS:
                meta[f"source_meta.{p.key}"] = p.value
    for k, v in meta.items():
        ml.user_defined_metadata[META_PREFIX + k] = str(v)
    _set_conversion_date(ml.user_defined_metadata)
    with quiet():
        ml.save(str(dest))
    make_reproducible(dest)
    facts = {
        "coremltools_version": ct.__version__,
        "deployment_target": f"iOS{deployment}",
        "compute_precision": compute,
        "inputs": [_io(s) for s in low.inputs],
        "outputs": [_io(s) for s in low.outputs],
        "flexible_axes": {k: list(v) for k, v in low.flexible.items()},
        "qdq_summary": summary,
        "mil_ops": dict(sorted(low.mil_ops.items())),
        "folded_onnx_nodes": low.folded,
    }
    if kv_cache is not None:
        facts["kv_cache"] = {**kv_cache.as_dict(), "states": kv_cache.states()}  # no timings: manifest.json is reproducible apart from its "created" key
    return low, facts


def _set_conversion_date(metadata) -> None:
    """coremltools stamps today's date (``conversion_date``) into the model: drop it.

    The build date already is manifest.json's ``created`` (the one key allowed to differ
    between two builds). With ``SOURCE_DATE_EPOCH`` set (reproducible-builds.org), the key is
    kept with that date instead.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        metadata[CONVERSION_DATE_KEY] = time.strftime("%Y-%m-%d", time.gmtime(int(epoch)))
    elif CONVERSION_DATE_KEY in metadata:
        del metadata[CONVERSION_DATE_KEY]


def make_reproducible(package: Path) -> None:
    """Rewrite the parts of a saved ``.mlpackage`` that coremltools writes differently every run.

    - ``Data/com.apple.CoreML/model.mlmodel``: the protobuf, serialized again with
      ``deterministic=True`` (map fields, e.g. the metadata, in key order rather than hash order).
    - ``Manifest.json``: each item's random UUID becomes ``uuid5`` of the item's path and the
      sha256 of its content (a file, or every file of a folder by relative path), so identical
      content gives identical identifiers; ``rootModelIdentifier`` follows its item.
    """
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    items = manifest.get("itemInfoEntries", {})
    data = package / "Data"
    for info in items.values():
        if info.get("name") == "model.mlmodel" or str(info.get("path", "")).endswith(".mlmodel"):
            spec_path = data / info["path"]
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_path.read_bytes())
            spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    renamed = {old: str(uuid.uuid5(PACKAGE_UUID_NAMESPACE, f"{info['path']}\n{_content_sha256(data / info['path'])}"))
               for old, info in items.items()}
    if len(set(renamed.values())) != len(renamed):  # only if two items had the same path
        raise RuntimeError(f"{package}: Manifest.json lists the same item twice")
    manifest["itemInfoEntries"] = {renamed[old]: info for old, info in items.items()}
    if manifest.get("rootModelIdentifier") in renamed:
        manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    # the layout coremltools' own writer uses (4-space indent, sorted keys, final newline)
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _content_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _io(spec) -> dict:
    return {"name": spec.name, "coreml_name": spec.mil_name, "onnx_dtype": spec.onnx_dtype,
            "coreml_dtype": spec.coreml_dtype, "shape": list(spec.shape)}


def _describe(spec, flexible: Mapping, kind: str) -> str:
    dims = []
    for d in spec.shape:
        if isinstance(d, int):
            dims.append(str(d))
        else:
            lo, hi = flexible.get(d, (1, -1))
            dims.append(f"{d} {lo}..{'∞' if hi == -1 else hi}")
    text = f"{spec.coreml_dtype} [{', '.join(dims)}]"
    if spec.onnx_dtype != spec.coreml_dtype:
        text += f" (the ONNX {kind} is {spec.onnx_dtype})"
    return text
