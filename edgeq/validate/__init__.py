"""Host validation: run models on real inputs and compare them."""

from edgeq.validate.compare import CandidateResult, Thresholds, ValidationReport, compare
from edgeq.validate.runners import IntermediateRunner, OnnxRunner, Runner, TorchRunner, open_runner, register_runner

__all__ = [
    "CandidateResult",
    "IntermediateRunner",
    "OnnxRunner",
    "Runner",
    "Thresholds",
    "TorchRunner",
    "ValidationReport",
    "compare",
    "open_runner",
    "register_runner",
]
