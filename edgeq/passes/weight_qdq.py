"""The weight half of the QDQ pass: store each planned weight quantized, behind a DequantizeLinear.

Rules it applies, per :class:`~edgeq.quant.plan.WeightDecision`:

- int8: symmetric per-channel ``DequantizeLinear(int8, scale[C], axis)``.
- int4: symmetric blocks ``DequantizeLinear(int4, scale, axis, block_size)`` (opset 21); for a
  MatMul the block axis is K, the form ONNX Runtime fuses into MatMulNBits.
- mxfp4: ``DequantizeLinear(float4e2m1, scale, axis, block_size=32)`` (opset 23). Where the plan
  says so (the profile's ``gather_block_quantized``), an embedding Gather becomes
  ``com.microsoft.GatherBlockQuantized`` instead, which ONNX Runtime runs.
- Gemm with ``transB=1`` and blocked weights: the weight is stored transposed and ``transB``
  cleared, so the blocks run along K as the fused kernels expect.
- Bias correction (when calibration means are given): a Conv or Gemm with a constant bias gets
  ``b - (Ŵ - W) · E[x]`` so that quantizing the weight does not shift the output's mean
  (Nagel et al., 2019, "Data-Free Quantization", empirical form: ``E[x]`` per input channel from
  the calibration data; zero padding is ignored).
- GPTQ (when the pass is given a Hessian factor for a node, see :mod:`edgeq.quant.gptq`): the
  integers and scales come from error-compensated rounding instead of round-to-nearest.
- Integers chosen elsewhere (``quantized``: node -> QuantizedTensor, e.g. data-aware rounding,
  :mod:`edgeq.quant.rounding`) replace the plan's nearest rounding for that node; bias
  correction then uses them.
- Every consumer gets its own initializers (ORT does not fuse DQ nodes that share them); the
  float weight is removed once nothing reads it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from edgeq.quant import formats, gptq
from edgeq.quant.plan import QuantPlan, WeightDecision
from edgeq.quant.recipes import WeightFormat

MXFP4_DQ_OPSET = 23  # DequantizeLinear gained float4e2m1 and output_dtype in opset 23
FP16_SCALE_LIMIT = 6.0e4  # float16 scales must stay finite


def quantize_weight(w: np.ndarray, d: WeightDecision) -> formats.QuantizedTensor:
    """The plan's integers for one weight (shared with targets: one source of truth)."""
    if d.transpose:
        w = w.T
    if d.format == WeightFormat.INT8:
        return formats.quantize_int8_per_channel(w, d.axis)
    if d.format == WeightFormat.INT4:
        if not d.symmetric:
            return formats.quantize_int4_blockwise_asymmetric(w, d.axis, d.block, clip_search=d.clip_search)
        fp16 = d.scale_dtype == "float16" and np.abs(w).max(initial=0.0) / 7.0 < FP16_SCALE_LIMIT
        return formats.quantize_int4_blockwise(w, d.axis, d.block, clip_search=d.clip_search,
                                               scale_dtype=np.float16 if fp16 else np.float32)
    if d.format == WeightFormat.MXFP4:
        return formats.quantize_mxfp4(w, d.axis, d.block)
    raise ValueError(f"not a weight format: {d.format}")


def _as_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(ml_dtypes.int4) if dtype == "int4" else values


def _storage(q: formats.QuantizedTensor) -> np.ndarray:
    return _as_storage(q.data, q.dtype)


class WeightQDQPass(ir.passes.InPlacePass):
    """Quantize the weights a plan lists; leave every other node as it is."""

    def __init__(self, plan: QuantPlan, *, input_means: dict[str, np.ndarray] | None = None,
                 gptq_factors: dict[str, np.ndarray] | None = None,
                 quantized: dict[str, formats.QuantizedTensor] | None = None):
        super().__init__()
        self.plan = plan
        self.quantized = quantized or {}  # node name -> integers chosen elsewhere (data-aware rounding)
        self.input_means = input_means or {}  # node name -> mean of its input per channel (axis 1)
        self.gptq_factors = gptq_factors or {}  # node name -> gptq.prepare_hessian of its input's Gram
        self.bias_corrected: list[str] = []
        self.gptq_nodes: list[str] = []

    def requires(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        missing = [d.node for d in self.plan.weights if d.node not in names]
        if missing:
            raise ir.passes.PreconditionError(f"plan names nodes the model lacks: {missing[:3]}")

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if not init.uses() and not init.is_graph_output():
                raise ir.passes.PostconditionError(f"initializer {init.name} left without a reader")

    def _correct_bias(self, graph, node: ir.Node, w: np.ndarray, q: formats.QuantizedTensor, d: WeightDecision,
                      mean: np.ndarray, prefix: str) -> None:
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            return
        b = node.inputs[2]
        if b.const_value is None:
            return
        delta = q.dequantize().astype(np.float64)
        if d.transpose:
            delta = delta.T
        delta -= w
        mu = mean.astype(np.float64)
        if node.op_type == "Gemm":
            shift = delta @ mu if node.attributes.get_int("transB", 0) else mu @ delta
        else:
            groups = node.attributes.get_int("group", 1)
            out_ch, in_per_group = delta.shape[:2]
            if mu.size != in_per_group * groups:
                return
            per_in = delta.reshape(out_ch, in_per_group, -1).sum(axis=2)  # [O, I/g]
            group_of = np.arange(out_ch) // (out_ch // groups)
            mu_g = mu.reshape(groups, in_per_group)[group_of]  # [O, I/g]
            shift = (per_in * mu_g).sum(axis=1)
        bias = b.const_value.numpy().astype(np.float64)
        if shift.shape != bias.shape:
            return
        name = f"{node.name}/{b.name}_corrected"
        corrected = ir.Value(name=name, const_value=ir.tensor((bias - shift).astype(np.float32), name=name))
        graph.register_initializer(corrected)
        node.replace_input_with(2, corrected)
        if not b.uses() and b.name in graph.initializers and not b.is_graph_output():
            graph.initializers.pop(b.name)
        self.bias_corrected.append(node.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = {n.name: n for n in graph}
        needs_ms = needs_23 = False
        for d in self.plan.weights:
            node = by_name[d.node]
            value = node.inputs[d.input_index]
            w = value.const_value.numpy().astype(np.float32)
            q = self.quantized.get(d.node)
            if q is None and d.node in self.gptq_factors:
                q = gptq.gptq_quantize(w, d, self.gptq_factors[d.node])
                if q is not None:
                    self.gptq_nodes.append(d.node)
            if q is None:
                q = quantize_weight(w, d)
            prefix = f"{d.node}/{d.weight}"
            if d.node in self.input_means:
                self._correct_bias(graph, node, w, q, d, self.input_means[d.node], prefix)
            data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(_storage(q), name=f"{prefix}_quantized"))
            half = q.scale.dtype == np.float16
            scale = ir.Value(name=f"{prefix}_scale", const_value=ir.tensor(q.scale if half else q.scale.astype(np.float32),
                                                                         name=f"{prefix}_scale"))
            graph.register_initializer(data)
            graph.register_initializer(scale)
            if d.form == "gather_block_quantized":
                gbq = ir.node(
                    "GatherBlockQuantized", [data, node.inputs[1], scale], domain="com.microsoft",
                    attributes={"gather_axis": 0, "quantize_axis": d.axis, "block_size": d.block},
                    name=f"{d.node}/gather_block_quantized",
                )
                graph.insert_before(node, gbq)
                out = node.outputs[0]
                new_out = gbq.outputs[0]
                new_out.dtype = ir.DataType.FLOAT  # the output type is the scale's
                new_out.shape = out.shape
                out.replace_all_uses_with(new_out)
                if out.is_graph_output():
                    idx = [o for o in graph.outputs].index(out)
                    graph.outputs[idx] = new_out
                new_out.name = out.name
                graph.remove(node, safe=True)
                needs_ms = True
            else:
                attrs = {"axis": d.axis}
                if d.block:
                    attrs["block_size"] = d.block
                if half:  # float16 scales, float32 output: DequantizeLinear-23's output_dtype
                    attrs["output_dtype"] = ir.DataType.FLOAT.value
                    needs_23 = True
                inputs = [data, scale]
                if q.zero_point is not None or q.dtype == "int8":
                    # int8: an explicit zero point (0) — ORT fuses Gemm into QGemm only with one
                    zp = q.zero_point if q.zero_point is not None else np.zeros(q.scale.shape, np.int8)
                    zp_value = ir.Value(name=f"{prefix}_zero_point",
                                        const_value=ir.tensor(_as_storage(zp, q.dtype), name=f"{prefix}_zero_point"))
                    graph.register_initializer(zp_value)
                    inputs.append(zp_value)
                dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{prefix}_dequantize")
                dq.outputs[0].name = f"{prefix}_dequantized"
                dq.outputs[0].dtype = ir.DataType.FLOAT
                dq.outputs[0].shape = ir.Shape(list(q.data.shape))
                graph.insert_before(node, dq)
                node.replace_input_with(d.input_index, dq.outputs[0])
                if d.transpose:
                    node.attributes["transB"] = ir.AttrInt64("transB", 0)
            needs_23 |= d.format == WeightFormat.MXFP4 and d.form == "dq"
            if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
                graph.initializers.pop(value.name)
        if needs_ms:
            graph.opset_imports.setdefault("com.microsoft", 1)
            model.opset_imports.setdefault("com.microsoft", 1)
        if needs_23 and model.opset_imports.get("", 0) < MXFP4_DQ_OPSET:
            # opsets 22-23 only widened type lists of the ops edgeq emits; no semantics changed
            model.opset_imports[""] = MXFP4_DQ_OPSET
            graph.opset_imports[""] = MXFP4_DQ_OPSET
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))
