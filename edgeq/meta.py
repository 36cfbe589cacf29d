"""What edgeq writes into the models it makes: node metadata and model metadata keys.

Every node a pass creates carries two metadata entries, so later stages (analyze, budget, the
report, the targets) recognise edgeq's edits by what they are, never by a name suffix:

- ``edgeq.role``: what the node is for (a :class:`Role` value);
- ``edgeq.source``: what it belongs to — the float-model tensor an activation Q/DQ pair, a
  scaling or a protection acts on, or the node whose weight or bias a DequantizeLinear feeds.

Model-level keys (``edgeq.recipe``, ``edgeq.summary``, ...) describe the quantization as a whole;
targets copy them into their manifests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

ROLE = "edgeq.role"
SOURCE = "edgeq.source"

# model metadata_props
RECIPE = "edgeq.recipe"
PROFILE = "edgeq.profile"
SUMMARY = "edgeq.summary"
CALIBRATION = "edgeq.calibration"
CALIBRATION_SHA256 = "edgeq.calibration_sha256"


class Role(str, enum.Enum):
    """The job of a node an edgeq pass inserted (or rewrote)."""

    WEIGHT = "weight"  # DequantizeLinear of a quantized weight
    GATHER_QUANTIZED = "gather_quantized"  # an embedding Gather reading quantized rows
    BIAS = "bias"  # DequantizeLinear of an int32 bias
    ACT_QUANTIZE = "activation_quantize"  # QuantizeLinear of an activation
    ACT_DEQUANTIZE = "activation_dequantize"  # its DequantizeLinear
    SCALING = "scaling"  # Mul(x, 1/s) of SmoothQuant / outlier smoothing / AWQ: weights scaled by s
    PROTECT_MASK = "protection"  # Mul(x, m): protected channels zeroed for the quantized MatMuls
    PROTECT_GATHER = "protection_gather"  # the protected channels, gathered
    PROTECT_MATMUL = "protection_matmul"  # their exact float product
    PROTECT_ADD = "protection_add"  # added back to the quantized product


def mark(node, role: Role, source: str) -> None:
    """Record on an ``onnx_ir`` node what it is for and what it belongs to."""
    node.metadata_props[ROLE] = role.value
    node.metadata_props[SOURCE] = source


def role_of(props: Mapping[str, str]) -> Role | None:
    """The role in a node's metadata (``onnx_ir`` ``metadata_props`` or a dict of a NodeProto's)."""
    value = props.get(ROLE)
    try:
        return Role(value) if value is not None else None
    except ValueError:
        return None


def proto_props(node) -> dict[str, str]:
    """A NodeProto's metadata as a dict."""
    return {p.key: p.value for p in node.metadata_props}
