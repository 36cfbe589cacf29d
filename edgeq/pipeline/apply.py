"""Apply a finished plan: one declared pass pipeline, the only place the user's graph is edited.

    ProtectOutliersPass → ScaleInputsPass → WeightQDQPass → ActivationQDQPass → RecordPlanPass

Each pass carries out one kind of decision of the :class:`~edgeq.quant.plan.QuantPlan`
(protections, scalings, weight codes and corrected biases, activation Q/DQ and int32 biases, the
model metadata) and decides nothing itself; the pipeline's decide step (:mod:`edgeq.pipeline.quantize`)
runs the same first two passes on its working copy, so the graph it calibrated is the graph
written here.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from edgeq import meta
from edgeq.passes.activation_qdq import ActivationQDQPass
from edgeq.passes.protect import ProtectOutliersPass
from edgeq.passes.scale_inputs import ScaleInputsPass
from edgeq.passes.weight_qdq import WeightQDQPass
from edgeq.quant.calibrate import CalibrationTable
from edgeq.quant.gguf_blocks import GGUF_FILE_KEY
from edgeq.quant.plan import QuantPlan
from edgeq.quant.recipes import Recipe


class RecordPlanPass(ir.passes.InPlacePass):
    """Write what was done into the model's metadata (``edgeq.recipe``, ``.profile``, ``.summary``,
    ``.calibration``, ``.calibration_sha256``); targets copy them into their manifests."""

    def __init__(self, plan: QuantPlan, recipe: Recipe, calibration: CalibrationTable | None):
        super().__init__()
        self.plan, self.recipe, self.calibration = plan, recipe, calibration

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        props = model.metadata_props
        props[meta.RECIPE] = self.recipe.name
        props[meta.PROFILE] = self.plan.profile
        props[meta.SUMMARY] = json.dumps(self.plan.summary(), sort_keys=True)
        props.pop(GGUF_FILE_KEY, None)  # a local absolute path, read only to decide (recipe gguf): not shipped
        if self.calibration is not None:
            t = self.calibration
            props[meta.CALIBRATION_SHA256] = t.data_sha256
            props[meta.CALIBRATION] = json.dumps({"method": self.recipe.calibration.method.value, "batches": t.batches,
                                                  "samples": t.samples}, sort_keys=True)
        return ir.passes.PassResult(model, modified=True)


def rewrite_passes(plan: QuantPlan) -> list[ir.passes.InPlacePass]:
    """The passes that rewrite the float graph before quantization (protection, then scaling)."""
    return [ProtectOutliersPass(plan.protections), ScaleInputsPass(plan.scalings)]


def apply_plan(model: ir.Model, plan: QuantPlan, recipe: Recipe, calibration: CalibrationTable | None) -> ir.Model:
    """Carry ``plan`` out on ``model`` (in place) and return it."""
    pipeline = ir.passes.Sequential(*rewrite_passes(plan), WeightQDQPass(plan), ActivationQDQPass(plan),
                                    RecordPlanPass(plan, recipe, calibration))
    return pipeline(model).model


def with_qdq(model: ir.Model, plan: QuantPlan) -> ir.Model:
    """A copy of ``model`` (a handler's working graph: the plan's rewrites already in it) with the plan's weight and
    activation Q/DQ written: the quantized graph a handler can run (``Context.write_qdq``)."""
    return ir.passes.Sequential(WeightQDQPass(plan), ActivationQDQPass(plan))(model.clone()).model
