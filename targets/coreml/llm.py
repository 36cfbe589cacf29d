"""A causal language model's extra files in the iOS package, and the README part that drives it.

The stateful ``.mlpackage`` (:mod:`targets.coreml.lower.stateful`) takes ``input_ids``,
``attention_mask`` and ``position_ids`` and returns ``logits``; its KV cache is Core ML state. Beside
it the package holds ``generation_config.json`` (special tokens, the context length, the state
names, greedy search as validated) and the tokenizer files the export stored in the model's
metadata (``tokenizer.json``, ``tokenizer_config.json``, ...), which swift-transformers'
``AutoTokenizer.from(modelFolder:)`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from edgeq.export.causal_lm import read_facts, read_tokenizer_files

GENERATION_CONFIG = "generation_config.json"


def _facts(model: onnx.ModelProto):
    return read_facts({p.key: p.value for p in model.metadata_props})


def max_positions(model: onnx.ModelProto) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``), when the export recorded it."""
    facts = _facts(model)
    return facts.max_positions if facts is not None else None


def generation_config(model: onnx.ModelProto, model_file: str, kv_cache) -> dict:
    """What an app needs to run the stateful package: I/O and state names, tokens, limits, search."""
    facts = _facts(model)
    cfg = {
        "model_file": model_file,
        "max_context": kv_cache.max_context,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"},
        "outputs": {"logits": "logits"},
        "states": [s["name"] for s in kv_cache.states()],
        "search": {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": kv_cache.max_context},
    }
    if facts is not None:
        cfg.update({"model_type": facts.model_type, "vocab_size": facts.vocab_size,
                    "bos_token_id": facts.bos_token_id, "eos_token_id": list(facts.eos_token_ids),
                    "pad_token_id": facts.pad_token_id, "max_position_embeddings": facts.max_positions})
    return cfg


def write_llm_files(model: onnx.ModelProto, folder: Path, model_file: str, kv_cache) -> dict:
    """Write generation_config.json and the tokenizer files into ``folder``; facts for the manifest."""
    cfg = generation_config(model, model_file, kv_cache)
    (folder / GENERATION_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer = read_tokenizer_files({p.key: p.value for p in model.metadata_props}) or {}
    for name, text in sorted(tokenizer.items()):
        (folder / name).write_text(text, encoding="utf-8")
    facts = _facts(model)
    return {"causal_lm": {"generation_config": GENERATION_CONFIG, "tokenizer_files": sorted(tokenizer),
                          "num_layers": kv_cache.num_layers, "max_context": kv_cache.max_context,
                          "vocab_size": facts.vocab_size if facts else None,
                          "eos_token_ids": list(facts.eos_token_ids) if facts else [],
                          "chat_template": "chat_template.jinja" in tokenizer or bool(facts and facts.has_chat_template)}}


def readme_section(manifest: dict) -> str:
    """The README part for a stateful causal LM: a Swift generation loop with ``MLState``."""
    lm = manifest["causal_lm"]
    cache = manifest["kv_cache"]
    cls = manifest["model_file"].removesuffix(".mlpackage")
    eos = ", ".join(str(t) for t in lm["eos_token_ids"]) or "none recorded"
    files = ", ".join(f"`{f}`" for f in lm["tokenizer_files"]) or "none stored"
    return f"""
## Generate text (Core ML state, iOS 18+)

This model is a causal language model whose key/value cache is **Core ML state**:
{2 * cache['num_layers']} fp16 buffers (`key_cache_{{i}}`, `value_cache_{{i}}`, each
[1, {cache['kv_heads']}, {cache['max_context']}, {cache['head_dim']}]) that `model.makeState()` allocates
(zeros) and every `prediction(from:using:)` reads and updates in place. One function does both
steps: the prompt (prefill: n tokens at once, nothing cached yet) and each new token (decode: one
token). Per call, feed

- `input_ids` [1, n]: the new tokens (Int32);
- `position_ids` [1, n]: their positions, `past ..< past + n`;
- `attention_mask` [1, past + n]: ones over every token so far (its length tells the model how
  many tokens the state already holds: `past = mask length − n`);

and read `logits` [1, n, vocab]; the last row scores the next token. At most {cache['max_context']}
tokens in all (`--max-context`): start a new state (or stop) before. End-of-sequence ids: {eos}.
`{GENERATION_CONFIG}` lists these names and limits; the tokenizer files ({files}) are what
[swift-transformers](https://github.com/huggingface/swift-transformers) `AutoTokenizer.from(modelFolder:)`
reads{', including the chat template to format the prompt with' if lm['chat_template'] else ''}.

```swift
import CoreML

func generate(model: MLModel, prompt: [Int32], maxNewTokens: Int, eos: Set<Int32>) throws -> [Int32] {{
    let state = model.makeState()               // the KV cache, zeros
    var tokens: [Int32] = []
    var past = 0
    var next = prompt                           // prefill with the whole prompt, then one token per step
    while tokens.count < maxNewTokens && past + next.count <= {cache['max_context']} {{
        let n = next.count
        let ids = try MLMultiArray(shape: [1, NSNumber(value: n)], dataType: .int32)
        let positions = try MLMultiArray(shape: [1, NSNumber(value: n)], dataType: .int32)
        for i in 0..<n {{
            ids[[0, i] as [NSNumber]] = NSNumber(value: next[i])
            positions[[0, i] as [NSNumber]] = NSNumber(value: past + i)
        }}
        let mask = try MLMultiArray(shape: [1, NSNumber(value: past + n)], dataType: .int32)
        for i in 0..<(past + n) {{ mask[[0, i] as [NSNumber]] = 1 }}
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: ids),
            "position_ids": MLFeatureValue(multiArray: positions),
            "attention_mask": MLFeatureValue(multiArray: mask)])
        let out = try model.prediction(from: inputs, using: state)   // reads and updates the cache
        let logits = out.featureValue(for: "logits")!.multiArrayValue!   // [1, n, vocab], Float32
        let vocab = logits.shape[2].intValue
        var best: Int32 = 0
        var bestScore = -Float.infinity
        for v in 0..<vocab {{                         // greedy: the most likely next token (as validated)
            let score = logits[[0, n - 1, v] as [NSNumber]].floatValue
            if score > bestScore {{ bestScore = score; best = Int32(v) }}
        }}
        past += n
        if eos.contains(best) {{ break }}
        tokens.append(best)
        next = [best]
    }}
    return tokens
}}

// let config = MLModelConfiguration(); config.computeUnits = .cpuAndGPU
// let model = try MLModel(contentsOf: Bundle.main.url(forResource: "{cls}", withExtension: "mlmodelc")!,
//                         configuration: config)
// let tokenizer = try await AutoTokenizer.from(modelFolder: packageFolder)   // swift-transformers
// let prompt = try tokenizer.applyChatTemplate(messages: [["role": "user", "content": text]])
// let answer = tokenizer.decode(tokens: try generate(model: model, prompt: prompt.map(Int32.init),
//                                                    maxNewTokens: 128, eos: [{eos if lm['eos_token_ids'] else ''}]).map(Int.init))
```

Check it on a laptop (Linux or macOS; edgeq's reference executor runs the saved program with the
state carried from call to call): `edgeq generate <this folder> --prompt "..."` and
`edgeq validate <this folder> -r <QDQ or float ONNX> --data <texts>` (perplexity, KL divergence,
top-1 and greedy agreement).
"""
