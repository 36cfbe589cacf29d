"""Quantization decisions: numerics, recipes, statistics and the algorithms, as data (no graph edits).

- :mod:`~edgeq.quant.formats` — int8 / int4 / mxfp4 numerics (pure numpy), one ``QuantizedTensor`` per DequantizeLinear.
- :mod:`~edgeq.quant.weights` — the plan's round-to-nearest integers and the one size model.
- :mod:`~edgeq.quant.recipes` — recipes and every algorithm's frozen config; the strict TOML loader.
- :mod:`~edgeq.quant.profile` — what a runtime runs, per op and format (targets add their own).
- :mod:`~edgeq.quant.plan` — the plan: weight formats, then every algorithm's decisions and results.
- :mod:`~edgeq.quant.observers`, :mod:`~edgeq.quant.stats` — streaming statistics (ranges, channel maxima, means, Grams).
- :mod:`~edgeq.quant.calibrate` — one pass of the float model over the data, feeding the statistics.
- :mod:`~edgeq.quant.algorithms` — the handler interface (requests, decide) and its stages.
- :mod:`~edgeq.quant.handlers` — the handlers in deciding order, one per config type.
- The algorithms: :mod:`~edgeq.quant.protect` (outlier protection), :mod:`~edgeq.quant.smooth` (smoothing),
  :mod:`~edgeq.quant.awq`, :mod:`~edgeq.quant.activations` (W8A8 placement and ranges),
  :mod:`~edgeq.quant.rounding` (Conv rounding), :mod:`~edgeq.quant.gptq`, :mod:`~edgeq.quant.bias`
  (bias correction, int32 biases).
"""
