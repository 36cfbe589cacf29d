"""Bundled samples: real pretrained models with offline data, and tiny models for fast tests.

Each entry maps a name to the ``module:class`` of an :class:`edgeq.sources.Sample`.
"""

REGISTRY = {
    "minilm": "samples.minilm:MiniLMSample",
    "efficientnet_lite0": "samples.efficientnet_lite0:EfficientNetLite0Sample",
    "tiny_cnn": "samples.tiny:TinyCNNSample",
    "tiny_transformer": "samples.tiny:TinyTransformerSample",
    "smollm2": "samples.smollm2:SmolLM2Sample",
}
