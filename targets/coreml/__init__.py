"""iOS: Core ML packages (``.mlpackage``) lowered from the QDQ ONNX by edgeq itself.

- :mod:`.lower` — ONNX (QDQ) → MIL program, one module per op family, with partial evaluation
  of Shape-driven subgraphs; weights keep the QDQ graph's integers and scales exactly.
- :mod:`.build` — ``ct.convert`` of that program, metadata, save.
- :mod:`.executor` — the reference semantics of a saved ``.mlpackage``: runs it op by op in
  numpy, and :mod:`.executor.to_onnx` translates that program into ONNX Runtime graphs computing
  the same (its fast path); :mod:`.runner` (the ``.mlpackage`` runner of ``edgeq validate``) runs
  the translation when the program translates, else numpy.
- :mod:`.acceptance` — when a W8A8 package counts as computing what its QDQ ONNX computes
  (segments between quantization points, fidelity next to the QDQ ONNX's).
- :mod:`.profile` — what iOS 17 and iOS 18 run, for the quantization plan.
"""

from targets.coreml.target import CoreMLTarget, IOS17Target, IOS18Target

__all__ = ["CoreMLTarget", "IOS17Target", "IOS18Target"]
