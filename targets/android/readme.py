"""The package README: how to load this model with onnxruntime-android and feed its exact inputs."""

from __future__ import annotations

import json
import re

# dtype → (Kotlin array, java.nio buffer, OnnxJavaType when createTensor needs it, zero literal)
_KOTLIN = {
    "float32": ("FloatArray", "FloatBuffer", None, "0f"),
    "float64": ("DoubleArray", "DoubleBuffer", None, "0.0"),
    "int64": ("LongArray", "LongBuffer", None, "0L"),
    "int32": ("IntArray", "IntBuffer", None, "0"),
    "int16": ("ShortArray", "ShortBuffer", None, "0"),
    "int8": ("ByteArray", "ByteBuffer", "INT8", "0"),
    "uint8": ("ByteArray", "ByteBuffer", "UINT8", "0"),
    "bool": ("ByteArray", "ByteBuffer", "BOOL", "0"),
    "float16": ("ShortArray", "ShortBuffer", "FLOAT16", "0"),
}
_OUT_BUFFER = {"float32": "floatBuffer", "float64": "doubleBuffer", "int64": "longBuffer", "int32": "intBuffer",
               "int16": "shortBuffer", "int8": "byteBuffer", "uint8": "byteBuffer", "bool": "byteBuffer",
               "float16": "shortBuffer"}


def _ident(name: str) -> str:
    """A Kotlin identifier for a tensor or axis name (``input_ids`` → ``inputIds``)."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    if not parts:
        return "x"
    text = parts[0][:1].lower() + parts[0][1:] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return text if not text[0].isdigit() else "t" + text


def _shape(spec: dict) -> str:
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"


def kotlin(manifest: dict) -> str:
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    axes = []
    for spec in [*inputs, *outputs]:
        for d in spec["shape"]:
            if isinstance(d, str) and d not in axes:
                axes.append(d)
    buffers = sorted({_KOTLIN[s["dtype"]][1] for s in inputs if s["dtype"] in _KOTLIN})
    imports = ["ai.onnxruntime.OnnxTensor", "ai.onnxruntime.OrtEnvironment", "ai.onnxruntime.OrtSession"]
    if any(_KOTLIN.get(s["dtype"], (None, None, None))[2] for s in inputs):
        imports.insert(0, "ai.onnxruntime.OnnxJavaType")
    imports += [f"java.nio.{b}" for b in buffers]
    params = [f"{_ident(s['name'])}: {_KOTLIN[s['dtype']][0]}" for s in inputs if s["dtype"] in _KOTLIN]
    params += [f"{_ident(a)}: Long" for a in axes if any(a in s["shape"] for s in inputs)]
    lines = [*(f"import {i}" for i in imports), "", f"/** Runs {manifest['model_file']}: " +
             ", ".join(f"{s['name']} {s['dtype']}{_shape(s)}" for s in inputs) + " → " +
             ", ".join(f"{s['name']} {s['dtype']}{_shape(s)}" for s in outputs) + ". */",
             "class EdgeqModel(modelBytes: ByteArray) : AutoCloseable {",
             "    private val env = OrtEnvironment.getEnvironment()",
             "    private val session: OrtSession = env.createSession(modelBytes, OrtSession.SessionOptions().apply {",
             "        setIntraOpNumThreads(2)  // the thread count the speed was measured with; the phone's big cores",
             "    })",
             "",
             f"    fun run({', '.join(params)}): Map<String, {_result_type(outputs)}> {{"]
    names = []
    for s in inputs:
        arr, buf, jtype, _ = _KOTLIN[s["dtype"]]
        var = _ident(s["name"]) + "Tensor"
        dims = ", ".join(f"{d}L" if isinstance(d, int) else _ident(d) for d in s["shape"])
        count = " * ".join(f"{d}L" if isinstance(d, int) else _ident(d) for d in s["shape"]) or "1L"
        said = " x ".join(str(d) if isinstance(d, int) else f"${_ident(d)}" for d in s["shape"]) or "1"
        lines.append(f"        // {s['name']}: {s['dtype']}{_shape(s)}")
        lines.append(f"        require({_ident(s['name'])}.size.toLong() == {count}) "
                     f"{{ \"{s['name']} needs {said} values\" }}")
        wrap = f"{buf}.wrap({_ident(s['name'])})"
        if jtype:
            lines.append(f"        val {var} = OnnxTensor.createTensor(env, {wrap}, longArrayOf({dims}), "
                         f"OnnxJavaType.{jtype})")
        else:
            lines.append(f"        val {var} = OnnxTensor.createTensor(env, {wrap}, longArrayOf({dims}))")
        names.append((s["name"], var))
    feed = ", ".join(f'"{n}" to {v}' for n, v in names)
    lines += [
        f"        val inputs = mapOf({feed})",
        "        try {",
        "            return session.run(inputs).use { result ->",
        "                mapOf(",
    ]
    for s in outputs:
        getter = _OUT_BUFFER.get(s["dtype"], "floatBuffer")
        arr = _KOTLIN.get(s["dtype"], ("FloatArray",))[0]
        lines.append(f"                    // {s['name']}: {s['dtype']}{_shape(s)}")
        lines.append(f"                    \"{s['name']}\" to (result.get(\"{s['name']}\").get() as OnnxTensor)"
                     f".{getter}.let {{ b -> {arr}(b.remaining()).also {{ b.get(it) }} }},")
    lines += [
        "                )",
        "            }",
        "        } finally {",
        "            inputs.values.forEach { it.close() }",
        "        }",
        "    }",
        "",
        "    override fun close() = session.close()",
        "}",
    ]
    return "\n".join(lines)


def example_call(manifest: dict) -> str:
    """A call of ``EdgeqModel.run`` with zero-filled arrays of the right size (batch 1, other axes 16)."""
    sizes, args = {}, []
    for s in manifest["inputs"]:
        n = 1
        for d in s["shape"]:
            if isinstance(d, str):
                sizes.setdefault(d, 1 if "batch" in d.lower() else 16)
            n *= d if isinstance(d, int) else sizes[d]
        args.append(f"{_KOTLIN.get(s['dtype'], ('FloatArray',))[0]}({n})")
    args += [f"{_ident(a)} = {v}L" for a, v in sizes.items()]
    out = manifest["outputs"][0]["name"] if manifest["outputs"] else "output"
    return (f"val outputs = model.run({', '.join(args)})  // fill the arrays with real inputs\n"
            f"val {_ident(out)} = outputs.getValue(\"{out}\")")


def _result_type(outputs: list[dict]) -> str:
    kinds = {_KOTLIN.get(s["dtype"], ("FloatArray",))[0] for s in outputs}
    return kinds.pop() if len(kinds) == 1 else "Any"


def _table(specs: list[dict]) -> str:
    rows = ["| name | dtype | shape |", "|---|---|---|"]
    rows += [f"| `{s['name']}` | {s['dtype']} | {_shape(s)} |" for s in specs]
    return "\n".join(rows)


def render(manifest: dict) -> str:
    rt = manifest["runtime"]
    q = manifest.get("quantization") or {}
    summary = q.get("summary") if isinstance(q.get("summary"), dict) else None
    calib = manifest.get("calibration_sha256")
    ops = manifest.get("operators", {})
    nnapi = (manifest.get("nnapi_partitions") or {}).get("as_is", {})
    version = rt["minimum_onnxruntime_version"]
    quant_lines = [f"- recipe: `{q.get('recipe', 'none (float model)')}`, profile `{q.get('profile', '-')}`"]
    if summary:
        quant_lines.append(f"- summary: `{json.dumps(summary, sort_keys=True)}`")
    quant_lines.append(f"- calibration data sha256: `{calib}`" if calib else "- no calibration data (weight-only or float)")
    return f"""# {manifest['source_model']} for Android (ONNX Runtime Mobile)

Built by edgeq {manifest['edgeq_version']} with ONNX Runtime {rt['converted_with_onnxruntime']}.

| file | what |
|---|---|
| `{manifest['model_file']}` | the model to ship (ORT format, optimized for the CPU execution provider) |
| `model.onnx` | the QDQ ONNX model it was converted from (the validated source of truth) |
| `required_operators.config` | the operators of `{manifest['model_file']}`, for a reduced-size ONNX Runtime build |
| `manifest.json` | versions, inputs/outputs, quantization summary, sha256 of every file |

## Add ONNX Runtime

```kotlin
// app/build.gradle.kts
dependencies {{
    implementation("com.microsoft.onnxruntime:onnxruntime-android:{version}")  // {version} or newer
}}
```

Use ONNX Runtime **{version} or newer**: a release loads `.ort` files written by itself or older
releases, and this file holds operators ONNX Runtime {rt['converted_with_onnxruntime']} fused
(ORT format version {rt['ort_format_version']}).

## Inputs and outputs

Inputs:

{_table(manifest['inputs'])}

Outputs:

{_table(manifest['outputs'])}

Named dimensions are dynamic: pass their sizes to `run` below.

## Load and run (Kotlin)

Put `{manifest['model_file']}` in `app/src/main/assets/`, then:

```kotlin
{kotlin(manifest)}
```

```kotlin
val model = EdgeqModel(context.assets.open("{manifest['model_file']}").readBytes())
{example_call(manifest)}
```

Create one `EdgeqModel` and reuse it: creating the session is the slow part.

**Session options the speed depends on** (also in `manifest.json`, `runtime.session_options`):
`intra_op_num_threads` (edgeq measures with 2; use the number of big cores). Do not set
`mlas.qnbit.force_fp32`: it moves `MatMulNBits` from its int8 kernels to a slower fp32 path. The
`MatMulNBits` accuracy level (4: int8 compute) is an attribute of the nodes in the file, set at
conversion; no runtime option changes it.

## Quantization

{chr(10).join(quant_lines)}

## How the .ort was made

ONNX Runtime converted `model.onnx` with the settings of
`python -m onnxruntime.tools.convert_onnx_models_to_ort --optimization_style Fixed --target_platform arm`:
all graph optimizations applied at conversion (the x86-only NCHWc layout excluded), int8 QDQ kept
as int8. ONNX Runtime recommends this *Fixed* style for the CPU execution provider, which is
what this package targets: the quantized weights are already fused into ONNX Runtime's quantized
kernels (e.g. `MatMulNBits`, `QLinearConv`), so nothing has to be optimized on the phone.

Operators in the file: {'; '.join(f"{d}: {', '.join(o)}" for d, o in ops.items())}.

NNAPI: ONNX Runtime's usability checker estimates that NNAPI could take
{nnapi.get('supported_nodes', '?')}/{nnapi.get('nodes', '?')} nodes of the QDQ model as it is
(suitability: {nnapi.get('suitability', '?')}; see `manifest.json`). This package is built and
validated for the CPU execution provider; the fused operators above run on the CPU only.

## Reduced-size ONNX Runtime (optional)

The `onnxruntime-android` package includes every operator. To ship a smaller runtime, build
ONNX Runtime from source with `--minimal_build --include_ops_by_config required_operators.config`
(use the ONNX Runtime version above).

## Check it on a laptop

```sh
edgeq validate <this folder> -r <float model or sample> --data <inputs>
```
"""
