"""Export a causal language model with its KV cache: one ONNX graph for prefill and decode.

The graph takes the cache as explicit inputs and returns the grown cache, in the naming Hugging
Face optimum and onnxruntime-genai use, so their runtimes and ours read the same file:

    input_ids        int64 [batch, sequence]
    attention_mask   int64 [batch, total_sequence]        (total_sequence = past_sequence + sequence)
    position_ids     int64 [batch, sequence]
    past_key_values.{i}.key|value  float [batch, kv_heads, past_sequence, head_dim]
    -> logits        float [batch, sequence, vocab]
       present.{i}.key|value       float [batch, kv_heads, total_sequence, head_dim]

An empty past (``past_sequence`` = 0) is prefill, one token with the cache is a decode step.
Models come from a transformers causal LM (module), a GGUF file (dequantized by transformers: the
float reference) or a Hugging Face folder (config + safetensors). The export is checked in ONNX
Runtime against torch at empty past and with a real cache, the embedding table tied to the output
layer is kept as one initializer, and the model's generation facts (and its tokenizer) are written
into the ONNX metadata so later stages need no transformers to read them (see :data:`FACTS_KEY`).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq import onnx_io
from edgeq._quiet import quiet
from edgeq.errors import ExportError, InputError, UnsupportedError
from edgeq.export.torch_export import (
    DEFAULT_OPSET,
    ExportCheck,
    ExportResult,
    _clean,
    _import_torch,
    summarize_exception,
)
from edgeq.quant.gguf_blocks import GGUF_FILE_KEY
from edgeq.specs import TensorSpec
from edgeq.validate.metrics import sqnr_db

# ONNX metadata written by the export (read back with :func:`read_facts` / :func:`read_tokenizer_files`)
FACTS_KEY = "edgeq.causal_lm"  # JSON: the generation facts (CausalLMFacts)
TOKENIZER_KEY = "edgeq.tokenizer"  # base64(zlib(JSON {file name: text})) of the saved HF tokenizer folder
SOURCE_KEY = "edgeq.source"  # where the weights came from (sample, GGUF file, folder, module class)
# GGUF_FILE_KEY ("edgeq.gguf_file", from edgeq.quant.gguf_blocks): the absolute path of the GGUF they came from

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
DIMS = ("batch", "sequence", "past_sequence", "total_sequence")
# Text the export check runs when the model has a tokenizer (written for edgeq, CC0).
CHECK_TEXT = ("The harbour was quiet at dawn. A few boats rocked on the grey water while the baker at the "
              "corner opened his shutters, and the smell of warm bread drifted down the lane towards the pier.")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def is_causal_lm_io(input_names: Sequence[str], output_names: Sequence[str]) -> bool:
    """Whether a graph's I/O names are the explicit-cache causal LM layout above."""
    ins, outs = set(input_names), set(output_names)
    layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
    return (layers > 0 and {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} <= ins and LOGITS in outs
            and set(past_names(layers)) <= ins and set(present_names(layers)) <= outs)


@dataclass(frozen=True)
class CausalLMFacts:
    """What a runtime needs to generate with the exported graph, without transformers."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    tied_embeddings: bool
    has_chat_template: bool
    has_tokenizer: bool

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> CausalLMFacts:
        names = set(cls.__dataclass_fields__)
        missing = names - set(d)
        if missing:
            raise InputError(f"the model's {FACTS_KEY} metadata lacks {', '.join(sorted(missing))}",
                             hint="export the model again with this edgeq version")
        return cls(**{k: (tuple(d[k]) if k == "eos_token_ids" else d[k]) for k in names})


def read_facts(metadata: Mapping[str, str]) -> CausalLMFacts | None:
    """The facts from a model's metadata (ONNX ``metadata_props`` or ORT's custom metadata map)."""
    text = metadata.get(FACTS_KEY)
    if text is None:
        return None
    try:
        return CausalLMFacts.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise InputError(f"cannot read the {FACTS_KEY} metadata: {e}", hint="export the model again") from e


def encode_tokenizer_files(files: Mapping[str, str]) -> str:
    return base64.b64encode(zlib.compress(json.dumps(dict(files)).encode("utf-8"), 9)).decode("ascii")


def read_tokenizer_files(metadata: Mapping[str, str]) -> dict[str, str] | None:
    """The tokenizer folder's files (name → text) stored in a model's metadata, if any."""
    text = metadata.get(TOKENIZER_KEY)
    if text is None:
        return None
    try:
        return json.loads(zlib.decompress(base64.b64decode(text)).decode("utf-8"))
    except (ValueError, zlib.error) as e:
        raise InputError(f"cannot read the {TOKENIZER_KEY} metadata: {e}", hint="export the model again") from e


def tokenizer_files(tokenizer) -> dict[str, str]:
    """A transformers tokenizer saved by its own ``save_pretrained``, as file name → text."""
    with tempfile.TemporaryDirectory(prefix="edgeq-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Loading models: a transformers module, a GGUF file, a Hugging Face folder


@dataclass
class LoadedCausalLM:
    model: object  # a transformers causal LM (fp32, eval mode)
    tokenizer: object | None
    source: str
    gguf_file: str | None = None  # the GGUF its weights are dequantized from (recipe gguf keeps its integers)


def is_causal_lm_module(module) -> bool:
    """A transformers decoder-only model that generates text (``*ForCausalLM``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(module, PreTrainedModel):
        return False
    cfg = module.config
    return bool(module.can_generate()) and not getattr(cfg, "is_encoder_decoder", False) \
        and module.get_output_embeddings() is not None


def _import_transformers(what: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local: never reach for a hub
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"{what} needs transformers", hint="pip install 'edgeq[llm]'") from e
    return transformers


def _plain_copy(model):
    """A plain fp32 model with the loaded weights: a GGUF-loaded model keeps a quantizer and cannot be saved."""
    transformers = _import_transformers("rebuilding the model")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with quiet():
        plain = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied: one tensor under two names
    if missing or unexpected:
        raise ExportError(f"rebuilding the model from its weights left {missing[:3] or unexpected[:3]} unmatched")
    plain.tie_weights()
    return plain.float().eval()


def load_gguf(path: str | os.PathLike) -> LoadedCausalLM:
    """A GGUF file's model, dequantized to fp32 by transformers (the float reference), and its tokenizer."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"GGUF file not found: {p}", hint="check the path")
    transformers = _import_transformers("reading a GGUF file")
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError as e:
            raise InputError(f"reading {p.name} needs the {pkg} package", hint="pip install 'edgeq[llm]'") from e
    try:
        with quiet():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise UnsupportedError(f"transformers cannot load {p} as a causal LM: {summarize_exception(e, 200)}",
                               hint="edgeq reads the GGUF architectures transformers supports") from e
    return LoadedCausalLM(_plain_copy(model), tokenizer, f"gguf {p.name}", gguf_file=str(p.resolve()))


def load_hf_folder(path: str | os.PathLike) -> LoadedCausalLM:
    """A Hugging Face model folder (config.json + weights) as a causal LM, with its tokenizer if present."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(f"{p} has no config.json", hint="give a Hugging Face model folder (config + safetensors)")
    transformers = _import_transformers("reading a Hugging Face folder")
    try:
        with quiet():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedError(f"transformers cannot load {p} as a causal LM: {summarize_exception(e, 200)}",
                               hint="the folder needs config.json and the weights of a *ForCausalLM model") from e
    tokenizer = None
    if any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        with quiet():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return LoadedCausalLM(model.float().eval(), tokenizer, f"folder {p.name}")  # fp32: bf16/fp16 weights widened


def load_causal_lm(path: str | os.PathLike) -> LoadedCausalLM:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return load_gguf(p)
    if p.is_dir():
        return load_hf_folder(p)
    raise InputError(f"{p} is neither a .gguf file nor a model folder")


def is_causal_lm_source(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p.suffix.lower() == ".gguf" and p.is_file()) or (p.is_dir() and (p / "config.json").is_file())


# ---------------------------------------------------------------------------------------------
# The step module: the model with its cache as explicit, named tensors


def step_module(model):
    """``model`` wrapped as ``forward(input_ids, attention_mask, position_ids, past_key_values_0_key, ...)``.

    It returns ``(logits, present_0_key, present_0_value, ...)``. The parameters are named (a
    class is generated per layer count): torch.export's ``dynamic_shapes`` cannot describe a
    ``*past`` varargs forward.
    """
    torch = _import_torch()
    n = model.config.num_hidden_layers
    params = [f"past_key_values_{i}_{kv}" for i in range(n) for kv in ("key", "value")]
    src = (f"def forward(self, input_ids, attention_mask, position_ids, {', '.join(params)}):\n"
           f"    return self._step(input_ids, attention_mask, position_ids, ({', '.join(params)},))\n")
    namespace: dict = {}
    exec(src, namespace)  # noqa: S102 - generated from integers only

    class _Step(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def _step(self, input_ids, attention_mask, position_ids, past):
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.lm.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{_cache_kwarg(self.lm): cache})
            present = []
            for layer in _out_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    cls = type(f"{type(model).__name__}Step", (_Step,), {"forward": namespace["forward"]})
    return cls(model).eval()


def _cache_kwarg(model) -> str:
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _cache_shape(model) -> tuple[int, int]:
    """(kv heads, head dim) read from a real forward pass; every layer must agree."""
    torch = _import_torch()
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.int64), use_cache=True)
    layers = _out_cache(out).layers
    shapes = {tuple(layer.keys.shape[1::2]) for layer in layers} | {tuple(layer.values.shape[1::2]) for layer in layers}
    if len(shapes) != 1:
        raise UnsupportedError(f"{type(model).__name__}: cache shapes differ across layers ({sorted(shapes)})",
                               hint="edgeq exports caches of one [kv_heads, head_dim] shape for every layer")
    return shapes.pop()


def generation_facts(model, tokenizer=None) -> CausalLMFacts:
    cfg = model.config
    kv_heads, head_dim = _cache_shape(model)
    gen = getattr(model, "generation_config", None)

    def ids(*values) -> tuple[int, ...]:
        out: list[int] = []
        for v in values:
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if x is not None and int(x) not in out:
                    out.append(int(x))
        return tuple(out)

    eos = ids(getattr(gen, "eos_token_id", None), getattr(cfg, "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None))
    bos = ids(getattr(tokenizer, "bos_token_id", None), getattr(cfg, "bos_token_id", None))
    pad = ids(getattr(tokenizer, "pad_token_id", None), getattr(cfg, "pad_token_id", None))
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    return CausalLMFacts(
        model_type=str(getattr(cfg, "model_type", type(model).__name__)),
        num_layers=int(cfg.num_hidden_layers),
        num_attention_heads=int(cfg.num_attention_heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(emb_out.weight.shape[0]),
        max_positions=getattr(cfg, "max_position_embeddings", None),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        pad_token_id=pad[0] if pad else None,
        tied_embeddings=emb_in.weight.data_ptr() == emb_out.weight.data_ptr(),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        has_tokenizer=tokenizer is not None,
    )


def input_specs(facts: CausalLMFacts) -> list[TensorSpec]:
    """The graph inputs, dynamic axes named (see the module docstring)."""
    specs = [
        TensorSpec(INPUT_IDS, ("batch", "sequence"), "int64", low=0, high=facts.vocab_size),
        TensorSpec(ATTENTION_MASK, ("batch", "total_sequence"), "int64", low=1, high=2),
        TensorSpec(POSITION_IDS, ("batch", "sequence"), "int64", low=0, high=facts.max_positions or 2048),
    ]
    cache = ("batch", facts.num_kv_heads, "past_sequence", facts.head_dim)
    return specs + [TensorSpec(n, cache, "float32") for n in past_names(facts.num_layers)]


def empty_cache(facts: CausalLMFacts, batch: int = 1) -> dict[str, np.ndarray]:
    shape = (batch, facts.num_kv_heads, 0, facts.head_dim)
    return {n: np.zeros(shape, np.float32) for n in past_names(facts.num_layers)}


def step_feed(ids: np.ndarray, past: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The graph's feed for token ids [batch, seq] after a cache ``past`` (positions continue the cache)."""
    ids = np.asarray(ids, np.int64)
    batch, seq = ids.shape
    past_len = next(iter(past.values())).shape[2]
    if mask is None:
        mask = np.ones((batch, past_len + seq), np.int64)
    positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    return {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions, **past}


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class CausalLMExportResult(ExportResult):
    facts: CausalLMFacts | None = None
    tied_storage: str = ""  # how the tied table is stored and read, e.g. "one initializer: Gather + Transpose→MatMul"
    metadata_keys: tuple[str, ...] = field(default=())


def _torch_outputs(step, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    torch = _import_torch()
    with torch.no_grad():
        out = step(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
    return [t.detach().numpy() for t in out]


def _check_feeds(step, facts: CausalLMFacts, ids: np.ndarray, in_names) -> list[tuple[str, dict]]:
    """Prefill from an empty cache, then a chunk and a single token after a real (torch-made) cache."""
    n = ids.shape[1]
    half = n // 2
    feeds = [(f"prefill (past 0, sequence {n})", step_feed(ids, empty_cache(facts)))]
    outs = _torch_outputs(step, step_feed(ids[:, :half], empty_cache(facts)), in_names)
    past = dict(zip(past_names(facts.num_layers), outs[1:]))
    feeds.append((f"chunk (past {half}, sequence {n - half})", step_feed(ids[:, half:], past)))
    outs = _torch_outputs(step, step_feed(ids[:, :-1], empty_cache(facts)), in_names)
    past = dict(zip(past_names(facts.num_layers), outs[1:]))
    feeds.append((f"decode (past {n - 1}, sequence 1)", step_feed(ids[:, -1:], past)))
    return feeds


def _max_abs_err(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0


def _compare(step, path: Path, feeds, in_names, out_names) -> list[ExportCheck]:
    from edgeq.runtime import ort_session

    sess = ort_session(path, what=" (the export just written)")
    checks = []
    for label, feed in feeds:
        want = _torch_outputs(step, feed, in_names)
        try:
            got = sess.run(list(out_names), feed)
        except Exception as e:
            raise ExportError(f"the exported ONNX fails in ONNX Runtime on the {label} inputs: "
                              f"{summarize_exception(e)}") from e
        for (name, w, g) in zip(out_names, want, got):
            if w.shape != g.shape:
                raise ExportError(f"output {name!r} has shape {list(g.shape)} in ONNX but {list(w.shape)} in torch "
                                  f"on the {label} inputs", hint="a dynamic axis was fixed during export")
        checks.append(ExportCheck(label, LOGITS, tuple(want[0].shape), sqnr_db(want[0], got[0]),
                                  _max_abs_err(want[0], got[0])))
        cache = [(sqnr_db(w, g), _max_abs_err(w, g)) for w, g in zip(want[1:], got[1:])]
        checks.append(ExportCheck(label, f"present.* ({len(cache)})", tuple(want[1].shape),
                                  min(s for s, _ in cache), max(e for _, e in cache)))
    return checks


def _name_output_dims(model: ir.Model) -> None:
    """Name the outputs' dynamic axes like the inputs' (the exporter writes ``past_sequence + sequence``)."""
    for v in model.graph.outputs:
        if v.shape is None:
            continue
        dims = list(v.shape)
        if v.name == LOGITS:
            dims[:2] = ["batch", "sequence"]
        elif v.name.startswith("present."):
            dims[0], dims[2] = "batch", "total_sequence"
        v.shape = ir.Shape(dims)


def _tied_storage(model: ir.Model, facts: CausalLMFacts) -> str:
    """Keep the embedding table tied to the output layer as ONE initializer, and say how it is read.

    Constant folding may turn ``Transpose(table) → MatMul`` into a transposed copy; such a copy
    is replaced by a Transpose of the table (ORT folds nothing into a second copy on disk).
    """
    g = model.graph
    gathers = [n for n in g if n.op_type == "Gather" and n.inputs[1] is not None and n.inputs[1].name == INPUT_IDS
               and n.inputs[0] is not None and n.inputs[0].name in g.initializers]
    if len(gathers) != 1:
        return "embedding lookup not found"
    table = gathers[0].inputs[0]
    logits = g.outputs[[v.name for v in g.outputs].index(LOGITS)]
    node = logits.producer()
    while node is not None and node.op_type not in ("MatMul", "Gemm"):  # e.g. a final softcap or Reshape
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None:
        return "output projection not found"
    w = node.inputs[1]
    if not facts.tied_embeddings:
        return "untied: separate embedding and output tables"
    if w is table and node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return "one initializer: Gather + Gemm(transB=1)"
    prod = w.producer()
    if prod is not None and prod.op_type == "Transpose" and prod.inputs[0] is table:
        return f"one initializer: Gather + Transpose→{node.op_type}"
    folded_copy = (w.name in g.initializers and w.const_value is not None and table.const_value is not None
                   and tuple(w.const_value.shape) == tuple(table.const_value.shape)[::-1]
                   and np.array_equal(w.const_value.numpy(), table.const_value.numpy().T))
    if folded_copy:
        t = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{table.name}_transposed")
        g.insert_before(node, t)
        node.replace_input_with(1, t.outputs[0])
        del g.initializers[w.name]
        return f"one initializer: Gather + Transpose→{node.op_type} (a folded transposed copy was removed)"
    raise ExportError("the tied embedding/output table was exported as two different tensors",
                      hint="report this model to edgeq; the export would store the table twice")


def export_causal_lm(
    model,
    output: str | os.PathLike,
    *,
    tokenizer=None,
    source: str = "",
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_ids: np.ndarray | None = None,
    min_sqnr_db: float = 60.0,
    force: bool = False,
    verbose: bool = False,
    gguf_file: str | os.PathLike | None = None,
) -> CausalLMExportResult:
    """Export a transformers causal LM with its KV cache (see the module docstring) and check it.

    The model is exported in fp32 (``model.float()``, in place).

    ``tokenizer`` (a transformers tokenizer) is stored in the metadata for ``edgeq generate``
    and ``validate``; ``check_ids`` [1, n] are the token ids the torch comparison runs (default:
    :data:`CHECK_TEXT` tokenized, else fixed random ids). Raises :class:`ExportError` if the ONNX
    differs from torch by less than ``min_sqnr_db``; nothing is written then. ``gguf_file``: the GGUF
    the weights were dequantized from, recorded (absolute path, :data:`GGUF_FILE_KEY`) for recipe ``gguf``.
    """
    t0 = time.perf_counter()
    out_path = onnx_io.check_output_path(output, force=force)
    torch = _import_torch()
    if not is_causal_lm_module(model):
        raise InputError(f"{type(model).__name__} is not a transformers causal LM",
                         hint="give a *ForCausalLM model, or describe the inputs with --input")
    model = model.float().eval()
    facts = generation_facts(model, tokenizer)
    step = step_module(model)
    specs = input_specs(facts)
    in_names = [s.name for s in specs]
    out_names = [LOGITS, *present_names(facts.num_layers)]
    if check_ids is None:
        if tokenizer is not None:
            check_ids = np.asarray([tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]], np.int64)
        else:
            check_ids = np.random.default_rng(0).integers(0, facts.vocab_size, (1, 40)).astype(np.int64)
    check_ids = np.asarray(check_ids, np.int64)
    if check_ids.ndim != 2 or check_ids.shape[0] != 1 or check_ids.shape[1] < 4:
        raise InputError(f"check_ids must have shape [1, n] with n >= 4, got {list(check_ids.shape)}")

    # Example: batch 2, a real cache of 4 tokens, 3 new tokens (not 0/1: torch.export would specialize).
    ex_ids = np.concatenate([check_ids[:, :7], check_ids[:, :7][:, ::-1]], axis=0)
    prefix = _torch_outputs(step, step_feed(ex_ids[:, :4], empty_cache(facts, 2)), in_names)
    example = step_feed(ex_ids[:, 4:], dict(zip(past_names(facts.num_layers), prefix[1:])))
    cache_axes = {0: "batch", 2: "past_sequence"}
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"}}
    dynamic.update({n.replace(".", "_"): cache_axes for n in past_names(facts.num_layers)})
    args = tuple(torch.from_numpy(example[n]) for n in in_names)
    with onnx_io.atomic_output(out_path, force=force) as tmp:
        with quiet(verbose):
            try:
                program = torch.onnx.export(step, args, input_names=in_names, output_names=out_names,
                                            opset_version=opset, dynamo=True, dynamic_shapes=dynamic,
                                            optimize=True, verbose=False)
            except Exception as e:
                raise ExportError(f"torch.export could not export {type(model).__name__} with its cache: "
                                  f"{summarize_exception(e)}",
                                  hint="check the model runs with transformers' DynamicCache") from e
            onnx_model = _clean(program.model)
        _name_output_dims(onnx_model)
        tied = _tied_storage(onnx_model, facts)
        meta = onnx_model.metadata_props
        meta["edgeq.exporter"] = "dynamo"
        meta["edgeq.inputs"] = ", ".join(str(s) for s in specs)
        meta[FACTS_KEY] = json.dumps(facts.as_dict(), sort_keys=True)
        meta[SOURCE_KEY] = source or type(model).__name__
        if gguf_file is not None:
            meta[GGUF_FILE_KEY] = str(Path(gguf_file).resolve())
        if tokenizer is not None:
            meta[TOKENIZER_KEY] = encode_tokenizer_files(tokenizer_files(tokenizer))
        files = onnx_io.write_ir(onnx_model, tmp / out_path.name)
        checks: list[ExportCheck] = []
        if check:
            feeds = [("example (batch 2, past 4, sequence 3)", example),
                     *_check_feeds(step, facts, check_ids, in_names)]
            checks = _compare(step, tmp / out_path.name, feeds, in_names, out_names)
            bad = [c for c in checks if not c.sqnr_db >= min_sqnr_db]
            if bad:
                c = bad[0]
                raise ExportError(f"the exported ONNX does not match torch: {c.output} on the {c.feed} inputs has "
                                  f"SQNR {c.sqnr_db:.1f} dB < {min_sqnr_db:g} dB (max abs error {c.max_abs_err:.3g})",
                                  hint="nothing was written")
    return CausalLMExportResult(
        path=out_path, files=tuple(out_path.parent / f.name for f in files), exporter="dynamo",
        fallback_reason=None, opset=opset, inputs=tuple(specs), output_names=tuple(out_names),
        checks=tuple(checks), seconds=time.perf_counter() - t0, facts=facts, tied_storage=tied,
        metadata_keys=tuple(k for k in (FACTS_KEY, TOKENIZER_KEY, SOURCE_KEY, GGUF_FILE_KEY) if k in meta),
    )
