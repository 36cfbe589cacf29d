"""Graph passes (``onnx_ir`` passes with ``requires``/``ensures``), one per module.

The import stage (every ONNX that enters, :mod:`edgeq.pipeline.import_onnx`):

- :mod:`~edgeq.passes.convert_opset` — onnx's version converter, naming the node it cannot convert.
- :mod:`~edgeq.passes.remove_identity` — Identity and inference Dropout.
- :mod:`~edgeq.passes.fold_constants` — weights held in or computed from constants become initializers.
- :mod:`~edgeq.passes.fold_batchnorm` — BatchNormalization folded into Conv / ConvTranspose / Gemm.
- :mod:`~edgeq.passes.name_dims` — dynamic dims as valid, stable names.
- :mod:`~edgeq.passes.name_nodes` — unique node names (plans refer to nodes by name).

The apply pipeline (the plan carried out, :mod:`edgeq.pipeline.apply`), in order:

- :mod:`~edgeq.passes.protect` — outlier channels routed around the quantized MatMuls.
- :mod:`~edgeq.passes.scale_inputs` — input scalings (smoothing, AWQ) folded into the weights.
- :mod:`~edgeq.passes.weight_qdq` — each weight's integers behind a DequantizeLinear (or GatherBlockQuantized).
- :mod:`~edgeq.passes.activation_qdq` — W8A8 activation Q/DQ pairs and int32 biases.

:mod:`~edgeq.graph` holds the graph plumbing they share.
"""
