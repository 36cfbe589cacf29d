"""The weight half of the QDQ pass: store each planned weight's integers behind a DequantizeLinear.

Rules it applies, per :class:`~edgeq.quant.plan.WeightDecision`, with the integers the plan holds
for the weight (``plan.codes``, by weight name: nearest rounding, GPTQ or Conv rounding, decided before any edit):

- int8: symmetric per-channel ``DequantizeLinear(int8, scale[C], zero_point 0, axis)`` (an explicit
  zero point: ORT fuses Gemm into QGemm only with one).
- int4: blocks ``DequantizeLinear(int4, scale, [zero_point], axis, block_size)`` (opset 21); for a
  MatMul the block axis is K, the form ONNX Runtime fuses into MatMulNBits. float16 scales use
  DequantizeLinear-23's ``output_dtype`` (opset raised to 23).
- mxfp4: ``DequantizeLinear(float4e2m1, scale, axis, block_size=32)`` (opset 23).
- Embedding tables (Gather on axis 0), per the plan's ``form`` (the profile's ``gather_forms``):
  ``gather_rows`` (int8: Gather the int8 rows and their scales, Cast, Mul — exactly DequantizeLinear
  → Gather, with only the looked-up rows converted) or ``gather_block_quantized``
  (``com.microsoft.GatherBlockQuantized`` on packed uint8 int4 or float4e2m1 data; a float16 scale
  gives a float16 output, cast to float); ``dq`` dequantizes the whole table.
- Gemm with ``transB=1`` and blocked weights: the weight is stored transposed and ``transB``
  cleared, so the blocks run along K as the fused kernels expect.
- int4 blocks with a float offset per block (:class:`~edgeq.quant.gguf_blocks.BlockOffsetTensor`,
  GGUF Q4_1 ``d·q + m`` kept exactly) on a MatMul: ``MatMul(x, DQ(q − 8, d)) + MatMul(BlockSum(x), M)``,
  ``M = m + 8d`` [K/32, N] and ``BlockSum(x)`` = x reshaped to [..., K/32, 32] summed over the last
  axis (one per input tensor, shared by the MatMuls reading it). See :meth:`WeightQDQPass._offset_term`.
- A corrected bias in the plan (``plan.biases``) replaces the node's bias input.
- Every consumer gets its own initializers (ORT does not fuse DQ nodes that share them); the
  float weight is removed once nothing reads it. Each DequantizeLinear (or GatherBlockQuantized)
  is marked ``edgeq.role = weight`` (``gather_quantized``) with ``edgeq.source`` = its node.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from edgeq import meta
from edgeq.graph import constant, drop_if_unused, nodes_by_name
from edgeq.quant import formats
from edgeq.quant.gguf_blocks import BlockOffsetTensor
from edgeq.quant.plan import QuantPlan
from edgeq.quant.recipes import WeightFormat

MXFP4_DQ_OPSET = 23  # DequantizeLinear gained float4e2m1 and output_dtype in opset 23


def _as_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(ml_dtypes.int4) if dtype == "int4" else values


def _storage(q: formats.QuantizedTensor) -> np.ndarray:
    return _as_storage(q.data, q.dtype)


class WeightQDQPass(ir.passes.InPlacePass):
    """Store the weights a plan lists with the plan's integers; leave every other node as it is."""

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        nodes = nodes_by_name(model.graph)
        missing = [d.node for d in self.plan.weights if d.node not in nodes]
        if missing:
            raise ir.passes.PreconditionError(f"plan names nodes the model lacks: {missing[:3]}")
        uncoded = [d.weight for d in self.plan.weights if d.weight not in self.plan.codes]
        if uncoded:
            raise ir.passes.PreconditionError(f"plan has no integers for {uncoded[:3]} (decide before applying)")

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if not init.uses() and not init.is_graph_output():
                raise ir.passes.PostconditionError(f"initializer {init.name} left without a reader")

    @staticmethod
    def _initializers(graph: ir.Graph, prefix: str, data: np.ndarray, scale: np.ndarray) -> tuple[ir.Value, ir.Value]:
        values = []
        for suffix, array in (("quantized", data), ("scale", scale)):
            v = ir.Value(name=f"{prefix}_{suffix}", const_value=ir.tensor(array, name=f"{prefix}_{suffix}"))
            graph.register_initializer(v)
            values.append(v)
        return values[0], values[1]

    @staticmethod
    def _zero_point(graph: ir.Graph, prefix: str, q) -> ir.Value:
        """``q``'s zero points as an initializer in its storage type (zeros when it has none)."""
        zp = q.zero_point if q.zero_point is not None else np.zeros(q.scale.shape, np.int8)
        return constant(graph, f"{prefix}_zero_point", _as_storage(zp, q.dtype))

    @staticmethod
    def _replace_output(graph: ir.Graph, node: ir.Node, new_out: ir.Value) -> None:
        """Readers of ``node``'s output read ``new_out`` instead (which takes its name); ``node`` goes."""
        out = node.outputs[0]
        new_out.dtype = ir.DataType.FLOAT
        new_out.shape = out.shape
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        name = out.name
        out.name = f"{name}_float_gather"  # freed: the new value takes the name readers know
        new_out.name = name
        graph.remove(node, safe=True)

    def _dequantize(self, graph, node, d, q, prefix) -> bool:
        """``DequantizeLinear`` of the whole weight before ``node``; True if it needs opset 23."""
        if isinstance(q, BlockOffsetTensor):
            self._offset_weight(graph, node, d, q, prefix)
            return False
        half = q.scale.dtype == np.float16
        data, scale = self._initializers(graph, prefix, _storage(q), q.scale if half else q.scale.astype(np.float32))
        attrs = {"axis": d.axis}
        if d.block:
            attrs["block_size"] = d.block
        if half:  # float16 scales, float32 output: DequantizeLinear-23's output_dtype
            attrs["output_dtype"] = ir.DataType.FLOAT.value
        inputs = [data, scale]
        if q.zero_point is not None or q.dtype == "int8":
            # int8: an explicit zero point (0) — ORT fuses Gemm into QGemm only with one
            inputs.append(self._zero_point(graph, prefix, q))
        dq = _weight_dequantize(prefix, inputs, attrs, d.node, q.data.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(d.input_index, dq.outputs[0])
        if d.transpose:
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        return half

    def _half_exact(self, graph, name: str, array: np.ndarray, source: str) -> ir.Value:
        """A float32 constant stored as float16 (when every value is one: GGUF scales) and widened by a Cast."""
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            return constant(graph, name, np.ascontiguousarray(array, np.float32))
        v = ir.Value(name=f"{name}_half", const_value=ir.tensor(np.ascontiguousarray(half), name=f"{name}_half"))
        graph.register_initializer(v)
        cast = ir.node("Cast", [v], attributes={"to": ir.DataType.FLOAT.value}, name=f"{name}_widen")
        cast.outputs[0].name = name
        meta.mark(cast, meta.Role.WEIGHT, source)
        graph.insert_before(next(iter(graph)), cast)
        return cast.outputs[0]

    def _matmul_nbits(self, graph, node, d, q, prefix) -> None:
        """A MatMul's int4 weight as ``com.microsoft.MatMulNBits`` at the decision's accuracy level (recipe gguf).

        B is ``codes + 8`` packed two per byte, ``[N, K/32, 16]`` (MatMulNBits' default zero point 8
        reads them back exactly). The decision's ``scale_dtype`` stores the scales (and a
        :class:`BlockOffsetTensor`'s offset ``m + 8d``, its term added by :meth:`_offset_term`): ``float16``,
        the file's bytes widened by Casts (and the offset computed from them) in the graph — an .ort keeps
        them so and runs them on every call; ``float32``, constants the kernels read directly, the same
        float32 values (the offset is :attr:`BlockOffsetTensor.offset`, the graph's float32 arithmetic).

        Why not MatMulNBits' own float zero points (``zp = −m/d``, one node, no offset term): ONNX Runtime
        1.32's CPU kernel dequantizes B on every call with them: 576 × 1536, 1 thread, 1.45 ms vs 0.027 ms
        with the default zero point at accuracy level 4 (0.070 ms at 0).
        """
        k, n = (int(x) for x in q.data.shape)
        nb = k // d.block
        codes = (q.data.T.astype(np.int16) + 8).astype(np.uint8)
        b = ir.Value(name=f"{prefix}_nbits", const_value=ir.tensor(formats.pack_4bit(codes).reshape(n, nb, d.block // 2),
                                                                   name=f"{prefix}_nbits"))
        graph.register_initializer(b)
        flat = q.scale.T.reshape(-1).astype(np.float32)
        wide = d.scale_dtype == "float32"
        scales = (constant(graph, f"{prefix}_nbits_scales", np.ascontiguousarray(flat, np.float32)) if wide
                  else self._half_exact(graph, f"{prefix}_nbits_scales", flat, d.node))
        mm = ir.node("MatMulNBits", [node.inputs[0], b, scales], domain="com.microsoft",
                     attributes={"K": k, "N": n, "bits": 4, "block_size": d.block, "accuracy_level": d.accuracy_level},
                     name=f"{d.node}/matmul_nbits")
        meta.mark(mm, meta.Role.WEIGHT, d.node)
        graph.insert_before(node, mm)
        self._replace_output(graph, node, mm.outputs[0])
        if isinstance(q, BlockOffsetTensor):
            offset = (constant(graph, f"{prefix}_offset", np.ascontiguousarray(q.offset, np.float32)) if wide
                      else self._offset(graph, d, q, prefix, scales, flat=True))
            self._offset_term(graph, mm, d, q, offset)


    def _offset(self, graph, d, q: BlockOffsetTensor, prefix, scale: ir.Value, flat: bool) -> ir.Value:
        """``m + 8d`` [K/32, N] in float32, computed in the graph (ONNX Runtime folds it at load) from the float16
        ``m`` and the stored scales ``scale`` (float32; ``flat``: MatMulNBits' [N·K/32] order)."""
        nb, n = q.scale.shape
        anchor = scale.producer()  # the Cast that widens the scales, if any: the new nodes go after it
        half_m = ir.Value(name=f"{prefix}_minimum", const_value=ir.tensor(q.minimum, name=f"{prefix}_minimum"))
        eight = ir.Value(name=f"{prefix}_eight", const_value=ir.tensor(np.array(8.0, np.float32), name=f"{prefix}_eight"))
        graph.register_initializer(half_m)
        graph.register_initializer(eight)
        new = []
        if flat:
            shape = ir.Value(name=f"{prefix}_scales_2d", const_value=ir.tensor(np.array([n, nb], np.int64),
                                                                               name=f"{prefix}_scales_2d"))
            graph.register_initializer(shape)
            new.append(ir.node("Reshape", [scale, shape], name=f"{prefix}_scales_by_row"))
            new.append(ir.node("Transpose", [new[-1].outputs[0]], attributes={"perm": [1, 0]},
                               name=f"{prefix}_scales_by_block"))
            scale = new[-1].outputs[0]
        new.append(ir.node("Mul", [scale, eight], name=f"{prefix}_eight_scales"))
        eight_d = new[-1].outputs[0]
        new.append(ir.node("Cast", [half_m], attributes={"to": ir.DataType.FLOAT.value}, name=f"{prefix}_minimum_float"))
        new.append(ir.node("Add", [new[-1].outputs[0], eight_d], name=f"{prefix}_offset"))
        for node in new:
            node.outputs[0].name = node.name
            meta.mark(node, meta.Role.WEIGHT, d.node)
        if anchor is not None:
            graph.insert_after(anchor, new)
        else:
            graph.insert_before(next(iter(graph)), new)
        return new[-1].outputs[0]

    def _offset_weight(self, graph, node, d, q: BlockOffsetTensor, prefix) -> None:
        """A MatMul weight ``DQ(q, d) + offset`` per block: ``MatMul(x, DQ(q, d)) + MatMul(BlockSum(x), m + 8d)``.

        ``d`` and ``m`` are stored as float16 — the GGUF's own bytes, so the file is the GGUF's size —
        and widened by Cast; ``m + 8d`` is computed in the graph in float32 (what
        :attr:`BlockOffsetTensor.offset` computes). ONNX Runtime folds the Casts and the offset at
        load time and still fuses DQ → MatMul into MatMulNBits (its fusion rejects float16 scales in
        a DequantizeLinear-23, not a Cast-widened one).

        Why this form: DequantizeLinear's zero point is an integer, so Q4_1's float minimum cannot sit
        inside it. Adding the offset to the dequantized weight (DQ → Reshape → Add → Reshape) is exact
        too, but no runtime fuses it: ONNX Runtime would dequantize every weight on every run. Here the
        DequantizeLinear → MatMul pair stays the standard int4 form (ONNX Runtime fuses it into
        MatMulNBits, Core ML lowers it to constexpr_blockwise_shift_scale) and the offset costs one
        small MatMul [K/32 × N] per weight. MatMulNBits' own float zero points (``zp = −m/d``) would
        be one node, but ONNX Runtime 1.32 CPU has no fast kernel for them: measured on a 576 × 1536
        weight, 2.0 ms per call vs 0.08 ms with the default zero point — slower than float.
        """
        data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(_storage(q), name=f"{prefix}_quantized"))
        graph.register_initializer(data)
        scale = self._half_exact(graph, f"{prefix}_scale", q.scale.astype(np.float32), d.node)
        dq = _weight_dequantize(prefix, [data, scale], {"axis": d.axis, "block_size": d.block}, d.node, q.data.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(d.input_index, dq.outputs[0])
        self._offset_term(graph, node, d, q, self._offset(graph, d, q, prefix, scale, flat=False))

    def _offset_term(self, graph, node, d, q: BlockOffsetTensor, offset: ir.Value) -> None:
        """Add ``BlockSum(x) @ offset`` after the MatMul ``node`` (``BlockSum`` shared by the MatMuls reading x).

        ``BlockSum(x)``: x reshaped to [..., K/32, 32] (a constant shape whose leading 0s copy x's dims
        when x's rank is known, else from Shape), summed over the last axis.
        """
        x = node.inputs[0]
        k = int(q.data.shape[0])
        nb = k // d.block
        key = (x.name, nb, d.block)
        if key not in self._block_sums:
            base = f"{x.name}_block_sums_{d.block}"
            axes = ir.Value(name=f"{base}_axes", const_value=ir.tensor(np.array([-1], np.int64), name=f"{base}_axes"))
            graph.register_initializer(axes)
            new = []
            if x.shape is not None:  # Reshape's 0 keeps a dim: [0, ..., 0, K/32, 32]
                shape = ir.Value(name=f"{base}_shape", const_value=ir.tensor(
                    np.array([0] * (len(x.shape) - 1) + [nb, d.block], np.int64), name=f"{base}_shape"))
                graph.register_initializer(shape)
            else:
                tail = ir.Value(name=f"{base}_tail", const_value=ir.tensor(np.array([nb, d.block], np.int64),
                                                                           name=f"{base}_tail"))
                graph.register_initializer(tail)
                new.append(ir.node("Shape", [x], attributes={"end": -1}, name=f"{base}/lead_shape"))
                new.append(ir.node("Concat", [new[-1].outputs[0], tail], attributes={"axis": 0}, name=f"{base}/shape"))
                shape = new[-1].outputs[0]
            blocks = ir.node("Reshape", [x, shape], name=f"{base}/blocks")
            sums = ir.node("ReduceSum", [blocks.outputs[0], axes], attributes={"keepdims": 0}, name=f"{base}/sum")
            sums.outputs[0].name = base
            new += [blocks, sums]
            for n in new:
                meta.mark(n, meta.Role.WEIGHT, d.node)
            producer = x.producer()
            if producer is not None:  # next to its input: every MatMul reading it comes later
                graph.insert_after(producer, new)
            else:
                graph.insert_before(next(iter(graph)), new)
            self._block_sums[key] = sums.outputs[0]
        prefix = f"{d.node}/{d.weight}"
        mm = ir.node("MatMul", [self._block_sums[key], offset], name=f"{prefix}_offset_matmul")
        mm.outputs[0].name = f"{prefix}_offset_term"
        out = node.outputs[0]
        add = ir.node("Add", [out, mm.outputs[0]], name=f"{prefix}_add_offset")
        for n in (mm, add):
            meta.mark(n, meta.Role.WEIGHT, d.node)
        graph.insert_after(node, [mm, add])
        new_out = add.outputs[0]
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, new_out)
        new_out.dtype, new_out.shape = out.dtype, out.shape
        if out.is_graph_output():
            outputs = graph.outputs
            outputs[[v is out for v in outputs].index(True)] = new_out
            name = out.name
            out.name = f"{name}_before_offset"
            new_out.name = name
        else:
            new_out.name = f"{out.name}_with_offset"

    def _gather_rows(self, graph, node, d, q, prefix) -> None:
        """An int8 table read row by row: ``Cast(Gather(q, ids)) * Unsqueeze(Gather(scale, ids), -1)``.

        Standard ONNX, and exactly what DequantizeLinear → Gather computes (``(float) q * scale``),
        but only the looked-up rows are converted; the table stays int8 in the file and in memory.
        """
        data, scale = self._initializers(graph, prefix, q.data, q.scale.astype(np.float32))
        ids = node.inputs[1]
        axes = ir.Value(name=f"{prefix}_last_axis", const_value=ir.tensor(np.array([-1], np.int64), name=f"{prefix}_last_axis"))
        graph.register_initializer(axes)
        rows = ir.node("Gather", [data, ids], attributes={"axis": 0}, name=f"{prefix}_gather_rows")
        rows.outputs[0].name = f"{prefix}_rows"
        scales = ir.node("Gather", [scale, ids], attributes={"axis": 0}, name=f"{prefix}_gather_scales")
        scales.outputs[0].name = f"{prefix}_row_scales"
        cast = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT.value}, name=f"{prefix}_cast")
        cast.outputs[0].name = f"{prefix}_rows_float"
        unsq = ir.node("Unsqueeze", [scales.outputs[0], axes], name=f"{prefix}_unsqueeze")
        unsq.outputs[0].name = f"{prefix}_row_scales_2d"
        mul = ir.node("Mul", [cast.outputs[0], unsq.outputs[0]], name=f"{prefix}_scale_rows")
        new = [rows, scales, cast, unsq, mul]
        for n in new:
            meta.mark(n, meta.Role.GATHER_QUANTIZED, d.node)
        graph.insert_before(node, new)
        self._replace_output(graph, node, mul.outputs[0])

    def _gather_block_quantized(self, graph, node, d, q, prefix) -> None:
        """``com.microsoft.GatherBlockQuantized``: int4 as packed uint8 (``q + 8``, even element in the low
        nibble; no zero point = 8, so the symmetric codes map exactly), mxfp4 as float4e2m1; a float16
        scale gives a float16 output, cast to float."""
        attrs = {"gather_axis": 0, "quantize_axis": d.axis, "block_size": d.block}
        if d.format == WeightFormat.INT4:
            codes = (q.data.astype(np.int16) + 8).astype(np.uint8)
            data_array = formats.pack_4bit(codes).reshape(codes.shape[0], codes.shape[1] // 2)
            attrs["bits"] = 4
        else:
            data_array = _storage(q)
        data, scale = self._initializers(graph, prefix, data_array, q.scale)
        gbq = ir.node("GatherBlockQuantized", [data, node.inputs[1], scale], domain="com.microsoft", attributes=attrs,
                      name=f"{d.node}/gather_block_quantized")
        meta.mark(gbq, meta.Role.GATHER_QUANTIZED, d.node)
        new = [gbq]
        out = gbq.outputs[0]
        if q.scale.dtype == np.float16:
            out.name = f"{prefix}_rows_half"
            out.dtype = ir.DataType.FLOAT16
            cast = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT.value}, name=f"{prefix}_cast")
            meta.mark(cast, meta.Role.GATHER_QUANTIZED, d.node)
            new.append(cast)
            out = cast.outputs[0]
        graph.insert_before(node, new)
        self._replace_output(graph, node, out)

    def _tied(self, graph, node, d, q, tied: dict) -> bool:
        """A table tied between an embedding Gather and output MatMuls (read through Transpose); True if
        it used com.microsoft ops.

        ``tied_dq``: one DequantizeLinear replaces the table for every reader. ``tied_gbq`` (the Gather)
        and ``tied_matmulnbits`` (each MatMul): the integers stored once as MatMulNBits' packed B
        ``uint8 [V, D/bs, bs·bits/8]`` (codes + 2^(bits-1): symmetric codes need no zero point, it is the
        kernels' default), read by ``MatMulNBits(x, B, scales[, zero_points])`` for the logits and by
        ``GatherBlockQuantized(B, ids, Reshape(scales, [V, D/bs, 1])[, zero_points])`` with
        ``quantize_axis=2`` — then reshaped to ``[..., D]`` — for the embedding (the scales stored once too:
        their 3-D view is made at run time). An int4 table with zero points (asymmetric)
        stores them twice, in each kernel's layout (ONNX Runtime 1.32 checks both at load): MatMulNBits'
        ``uint8 [V, ceil(D/bs / 2)]`` two per byte (low nibble first), GatherBlockQuantized's
        ``uint8 [V, D/bs, 1]`` one per byte (its quantize axis holds one block) — 1.5 bytes per block.
        """
        table = graph.initializers.get(d.weight)
        if d.form == "tied_dq":
            if d.op_type != "Gather":
                return False  # the Gather's DequantizeLinear already feeds the Transpose
            half = q.scale.dtype == np.float16
            data, scale = self._initializers(graph, d.weight, _storage(q), q.scale if half else q.scale.astype(np.float32))
            attrs = {"axis": d.axis, **({"block_size": d.block} if d.block else {})}
            inputs = [data, scale]
            if q.zero_point is not None or (q.dtype == "int8" and not d.block):
                inputs.append(self._zero_point(graph, d.weight, q))
            dq = _weight_dequantize(d.weight, inputs, attrs, d.node, q.data.shape)
            graph.insert_before(next(iter(graph)), dq)
            table.replace_all_uses_with(dq.outputs[0])
            drop_if_unused(graph, table)
            return False
        bits = 4 if q.dtype == "int4" else 8
        v, k = q.data.shape
        nb = k // d.block
        if d.weight not in tied:
            codes = (q.data.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)  # the kernels' default zero point
            packed = (formats.pack_4bit(codes).reshape(v, nb, d.block // 2) if bits == 4
                      else codes.reshape(v, nb, d.block))
            b, scales = self._initializers(graph, d.weight, packed, q.scale.astype(np.float32))
            tied[d.weight] = (b, scales, self._tied_zero_points(graph, d.weight, q, bits))
        b, scales, zero_points = tied[d.weight]
        gbq_zp, mnb_zp = zero_points or ([], [])
        if d.form == "tied_gbq":
            shape3 = ir.Value(name=f"{d.weight}_scales_shape", const_value=ir.tensor(np.array([v, nb, 1], np.int64),
                                                                                     name=f"{d.weight}_scales_shape"))
            dim = ir.Value(name=f"{d.weight}_row_length", const_value=ir.tensor(np.array([k], np.int64),
                                                                                 name=f"{d.weight}_row_length"))
            graph.register_initializer(shape3)
            graph.register_initializer(dim)
            ids = node.inputs[1]
            # The scales' 3-D view is made at run time (ORT's Reshape aliases its input: no copy). A Reshape
            # of the constant scales alone is folded by the .ort conversion into a second copy of them (3.5
            # MB on SmolLM2 at block 32); joined to an empty slice of the ids' shape, its shape is not a
            # constant. ONNX Runtime has no switch to keep one node out of constant folding.
            none = ir.node("Shape", [ids], attributes={"start": 0, "end": 0}, name=f"{d.node}/no_dims")
            view = ir.node("Concat", [none.outputs[0], shape3], attributes={"axis": 0}, name=f"{d.weight}_scales_view")
            s3 = ir.node("Reshape", [scales, view.outputs[0]], name=f"{d.weight}_scales_3d")
            # its shape, stated: GatherBlockQuantized's shape inference compares the scales with the zero points
            s3.outputs[0].dtype, s3.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([v, nb, 1])
            gbq = ir.node("GatherBlockQuantized", [b, ids, s3.outputs[0], *gbq_zp], domain="com.microsoft",
                          attributes={"gather_axis": 0, "quantize_axis": 2, "block_size": d.block, "bits": bits},
                          name=f"{d.node}/gather_block_quantized")
            ids_shape = ir.node("Shape", [ids], name=f"{d.node}/ids_shape")
            out_shape = ir.node("Concat", [ids_shape.outputs[0], dim], attributes={"axis": 0}, name=f"{d.node}/row_shape")
            rows = ir.node("Reshape", [gbq.outputs[0], out_shape.outputs[0]], name=f"{d.node}/rows")
            new = [none, view, s3, gbq, ids_shape, out_shape, rows]
            for n in new:
                meta.mark(n, meta.Role.GATHER_QUANTIZED, d.node)
            graph.insert_before(node, new)
            self._replace_output(graph, node, rows.outputs[0])
        else:  # tied_matmulnbits: the output MatMul, reading the table through a Transpose
            transpose = node.inputs[1].producer()
            mm = ir.node("MatMulNBits", [node.inputs[0], b, scales, *mnb_zp], domain="com.microsoft",
                         attributes={"K": k, "N": v, "bits": bits, "block_size": d.block,
                                     "accuracy_level": d.accuracy_level},
                         name=f"{d.node}/matmul_nbits")
            meta.mark(mm, meta.Role.WEIGHT, d.node)
            graph.insert_before(node, mm)
            self._replace_output(graph, node, mm.outputs[0])
            if transpose is not None and not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)
        if table is not None:
            drop_if_unused(graph, table)
        return True

    @staticmethod
    def _tied_zero_points(graph, name: str, q, bits: int) -> tuple[list[ir.Value], list[ir.Value]] | None:
        """A tied table's zero points (None: symmetric) as ([GatherBlockQuantized's], [MatMulNBits']), as
        unsigned codes (``zp + 2^(bits-1)``, the codes' own shift). See :meth:`_tied` for the layouts."""
        if q.zero_point is None:
            return None
        if bits != 4:
            raise ValueError(f"tied table {name}: zero points are written for int4 only")
        v, nb = q.zero_point.shape
        zp = (q.zero_point.astype(np.int16) + 8).astype(np.uint8)
        padded = np.concatenate([zp, np.zeros((v, nb % 2), np.uint8)], axis=1)  # odd block count: a zero nibble
        out = []
        for suffix, array in (("gather_zero_points", zp.reshape(v, nb, 1)),
                              ("nbits_zero_points", formats.pack_4bit(padded).reshape(v, -1))):
            value = ir.Value(name=f"{name}_{suffix}", const_value=ir.tensor(array, name=f"{name}_{suffix}"))
            graph.register_initializer(value)
            out.append([value])
        return out[0], out[1]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        self._block_sums: dict[tuple, ir.Value] = {}  # (input, blocks, block size) -> BlockSum(input), shared
        needs_ms = needs_23 = False
        tied: dict[str, tuple] = {}  # table -> (its stored integers, scales, zero points or None), written once
        for d in self.plan.weights:
            node = by_name[d.node]
            value = node.inputs[d.input_index]
            q = self.plan.codes[d.weight]
            prefix = f"{d.node}/{d.weight}"
            if d.node in self.plan.biases:
                b = node.inputs[2]
                name = f"{node.name}/{b.name}_corrected"
                corrected = ir.Value(name=name, const_value=ir.tensor(self.plan.biases[d.node], name=name))
                graph.register_initializer(corrected)
                node.replace_input_with(2, corrected)
                drop_if_unused(graph, b)
            if d.form.startswith("tied_"):
                needs_ms |= self._tied(graph, node, d, q, tied)
                continue
            if d.form == "gather_rows":
                self._gather_rows(graph, node, d, q, prefix)
            elif d.form == "gather_block_quantized":
                self._gather_block_quantized(graph, node, d, q, prefix)
                needs_ms = True
            elif d.form == "matmulnbits":
                self._matmul_nbits(graph, node, d, q, prefix)
                needs_ms = True
            else:
                needs_23 |= self._dequantize(graph, node, d, q, prefix)
            needs_23 |= d.format == WeightFormat.MXFP4 and d.form == "dq"
            drop_if_unused(graph, value)
        if needs_ms:
            graph.opset_imports.setdefault("com.microsoft", 1)
            model.opset_imports.setdefault("com.microsoft", 1)
        if needs_23 and model.opset_imports.get("", 0) < MXFP4_DQ_OPSET:
            # opsets 22-23 only widened type lists of the ops edgeq emits; no semantics changed
            model.opset_imports[""] = MXFP4_DQ_OPSET
            graph.opset_imports[""] = MXFP4_DQ_OPSET
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))


def _weight_dequantize(prefix: str, inputs: list, attrs: dict, source: str, shape) -> ir.Node:
    """The DequantizeLinear of one weight (``{prefix}_dequantize`` → float ``{prefix}_dequantized``), marked
    as the weight of node ``source``."""
    dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{prefix}_dequantize")
    meta.mark(dq, meta.Role.WEIGHT, source)
    dq.outputs[0].name = f"{prefix}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(list(shape))
    return dq
