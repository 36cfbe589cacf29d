"""A causal language model's extra files in the Android package: what onnxruntime-genai loads.

The exported graph already uses the naming onnxruntime-genai reads (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` → ``logits``,
``present.{i}.key|value``); the package adds its ``genai_config.json`` (the model's shape, its
special tokens, the cache names, greedy search up to the model's context) and the tokenizer files
the export stored in the model's metadata (``tokenizer.json``, ``tokenizer_config.json``, ...).
The cache is explicit input/output. Where every layer's attention is ORT's ``GroupQueryAttention``
writing its ``present.*`` (the Android plan's fusion), the config sets ``past_present_share_buffer``:
onnxruntime-genai then gives each layer one buffer of ``max_length`` positions as both its past and
its present, and the operator appends the new keys/values in place instead of copying the whole past
into a grown output at every token (as onnxruntime-genai's own builder configures its models; SmolLM2
w4a16, 1 thread: 3–5 % less decode CPU time, the same greedy tokens). Any other graph (unfused attention
concatenates past and new keys into a new tensor) keeps the plain explicit cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from edgeq.export.causal_lm import read_facts, read_tokenizer_files

GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_LENGTH = 2048  # a phone's context when the model declares none


def is_causal_lm(model: onnx.ModelProto) -> bool:
    return read_facts({p.key: p.value for p in model.metadata_props}) is not None


def shares_cache_buffers(model: onnx.ModelProto) -> bool:
    """Every ``present.*`` output is written by a GroupQueryAttention that reads the matching past input
    (the operator supports one buffer for both: onnxruntime-genai's ``past_present_share_buffer``)."""
    from edgeq.export.causal_lm import past_names, present_names

    facts = read_facts({p.key: p.value for p in model.metadata_props})
    writers = {o: n for n in model.graph.node for o in n.output
               if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"}
    for i, (past, present) in enumerate(zip(past_names(facts.num_layers), present_names(facts.num_layers))):
        node, k = writers.get(present), 1 + i % 2  # key: output 1, read at input 3; value: output 2, input 4
        if node is None or len(node.output) <= k or node.output[k] != present or len(node.input) <= k + 2 \
                or node.input[k + 2] != past:
            return False
    return True


def genai_config(model: onnx.ModelProto, model_file: str) -> dict:
    """onnxruntime-genai's configuration for the exported decoder graph."""
    facts = read_facts({p.key: p.value for p in model.metadata_props})
    max_length = min(facts.max_positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    eos = list(facts.eos_token_ids)
    return {
        "model": {
            "type": facts.model_type,
            "bos_token_id": facts.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": facts.pad_token_id if facts.pad_token_id is not None else (eos[0] if eos else 0),
            "vocab_size": facts.vocab_size,
            "context_length": facts.max_positions or DEFAULT_MAX_LENGTH,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": 2, "provider_options": []},
                "filename": model_file,
                "head_size": facts.head_dim,
                "hidden_size": facts.hidden_size,
                "num_attention_heads": facts.num_attention_heads,
                "num_key_value_heads": facts.num_kv_heads,
                "num_hidden_layers": facts.num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": max_length, "min_length": 0,
                   "past_present_share_buffer": shares_cache_buffers(model), "repetition_penalty": 1.0, "temperature": 1.0},
    }


def write_llm_files(model: onnx.ModelProto, folder: Path, model_file: str) -> dict:
    """Write genai_config.json and the tokenizer files into ``folder``; facts for the manifest."""
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(model, model_file), indent=2) + "\n")
    tokenizer = read_tokenizer_files({p.key: p.value for p in model.metadata_props}) or {}
    for name, text in sorted(tokenizer.items()):
        (folder / name).write_text(text, encoding="utf-8")
    facts = read_facts({p.key: p.value for p in model.metadata_props})
    search = genai_config(model, model_file)["search"]
    return {"causal_lm": {"genai_config": GENAI_CONFIG, "tokenizer_files": sorted(tokenizer),
                          "num_layers": facts.num_layers, "vocab_size": facts.vocab_size,
                          "max_length": search["max_length"],
                          "past_present_share_buffer": search["past_present_share_buffer"],
                          "chat_template": "chat_template.jinja" in tokenizer or facts.has_chat_template}}


def readme_section(manifest: dict) -> str:
    """The README part for a causal LM: a generation loop with onnxruntime-genai (and plain ONNX Runtime)."""
    lm = manifest["causal_lm"]
    layers = lm["num_layers"]
    shared = (" Every layer's attention is `GroupQueryAttention`, so the config lets onnxruntime-genai give each "
              "layer one buffer of `max_length` positions as both its past and its present "
              "(`past_present_share_buffer`): new keys and values are written in place, the past is not copied."
              if lm.get("past_present_share_buffer") else "")
    return f"""
## Generate text (onnxruntime-genai)

This model is a causal language model: one graph for prompt processing and each generated
token, its key/value cache as {2 * layers} explicit inputs and outputs (`past_key_values.{{i}}.key|value`
→ `present.{{i}}.key|value`).{shared} `{GENAI_CONFIG}` and the tokenizer files
({", ".join(f"`{f}`" for f in lm["tokenizer_files"]) or "none stored"}) let
[onnxruntime-genai](https://github.com/microsoft/onnxruntime-genai) run it. Copy the whole folder to
the device (e.g. `context.filesDir/model/`), add `com.microsoft.onnxruntime:onnxruntime-genai-android`,
then:

```kotlin
import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer

val model = Model(modelDir.absolutePath)          // reads {GENAI_CONFIG} and {manifest['model_file']}
val tokenizer = Tokenizer(model)
val stream = tokenizer.createStream()
val params = GeneratorParams(model).apply {{ setSearchOption("max_length", {lm["max_length"]}.0) }}
Generator(model, params).use {{ generator ->
    generator.appendTokenSequences(tokenizer.encode(prompt))   // prompt: the chat-formatted text, below
    while (!generator.isDone()) {{
        generator.generateNextToken()                          // greedy: top_k 1, as validated
        print(stream.decode(generator.getLastTokenInSequence(0)))
    }}
}}
```

The prompt must be formatted with the model's chat template
({"`chat_template.jinja` / `tokenizer_config.json`" if lm["chat_template"] else "none stored: plain text"}),
as `edgeq generate` does on a laptop. Without onnxruntime-genai, the plain ONNX Runtime loop is: run
the prompt with empty `past_key_values.*` (past length 0), then feed one token at a time with the
`present.*` outputs as the next step's `past_key_values.*`, `attention_mask` of ones over past +
new tokens and `position_ids` counting on; stop at an end-of-sequence id.

Check it on a laptop: `edgeq generate <this folder> --prompt "..."` and
`edgeq validate <this folder> -r <float model>` (perplexity, KL divergence, top-1 and greedy agreement).
"""
