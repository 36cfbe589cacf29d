"""When a W8A8 Core ML package counts as computing what its QDQ ONNX computes.

End to end, an fp16 W8A8 package is ~30 dB from the exact QDQ math (MiniLM 30.0 dB, EfficientNet-Lite0
30.6 dB), and no fp16 run can do better: an activation within rounding distance of a code boundary
gets the neighbouring code, and every later quantized layer carries the difference on. Weight-only
recipes have no such boundaries and keep the end-to-end gate (≥ 35 dB). For W8A8 the lowering is
judged where it can be judged exactly, segment by segment, and the user's result by its fidelity:

1. **Segments**: each stretch of the program between two quantization points is fed the QDQ ONNX's
   own values at its entry (every activation ``dequantize`` output forced to the exact ORT run's,
   teacher forcing) and must reproduce the value the QDQ ONNX quantizes at its exit at ≥ 50 dB
   (measured 57.8–59.9 dB in fp16, ≥ 124 dB in fp32), or, where fp16 itself cannot reach that, at
   no more than ``FP16_FLOOR_MARGIN_DB`` below the segment's fp16 floor: the QDQ ONNX's own segment
   run with its entry values and dequantized weights rounded to fp16 (a 1×1 convolution of a
   squeeze-excite block whose terms cancel: PP-OCRv4 det, floor 48.1 dB, package 48.1 dB). The
   share of codes one step apart is reported.
2. **Fidelity**: the package's outputs against the float model lose at most 1 dB SQNR and 0.002 mean
   cosine relative to the QDQ ONNX's own fidelity (a recurrent state output: the other outputs of the
   next call from the state each model returned, as :mod:`edgeq.validate.compare` judges it) — or, for SQNR, no more than the fp16 noise above:
   the package may add an error of ``FP16_NOISE_DB`` below the output to the QDQ ONNX's (errors
   add as powers). A 1 dB drop alone failed faithful packages whose QDQ ONNX was already near or
   past that noise (MTCNN's face probability: QDQ 57.8 dB, package 56.8; O-Net 52.2 / 47.9; the
   PP-OCR direction classifier on 4 feeds 25.5 / 23.9, on 96 feeds 25.6 / 27.9), that is, it
   failed the better quantizations.

"The QDQ ONNX run" is ONNX Runtime with graph optimizations off (DequantizeLinear + float op +
QuantizeLinear, the graph's own semantics: any fusion level changes the numbers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import InputError
from edgeq.validate.metrics import TensorStats

MIN_SEGMENT_SQNR_DB = 50.0
# how far below its fp16 floor (entry values and weights rounded to fp16, exact arithmetic) a segment
# may be: what fp16 arithmetic inside the segment adds (the tiny CNN's segments: 57.8-59.9 dB against
# floors of 60-64 dB); a convolution 1 % off (40 dB) still fails a segment whose floor is 48 dB
FP16_FLOOR_MARGIN_DB = 6.0
MAX_SQNR_DROP_DB = 1.0
MAX_COSINE_DROP = 0.002
# what fp16 adds end to end, below the output (measured 30.0-30.6 dB on MiniLM / EfficientNet-Lite0,
# 28.8 dB on the PP-OCR direction classifier; tests/targets/coreml/test_coreml_e2e.py's bound is 27)
FP16_NOISE_DB = 27.0


def min_package_sqnr(qdq_sqnr_db: float, max_drop_db: float = MAX_SQNR_DROP_DB,
                     fp16_noise_db: float = FP16_NOISE_DB) -> float:
    """The lowest SQNR vs float a package may have: its QDQ ONNX's less ``max_drop_db``, or that
    error plus fp16 noise at ``fp16_noise_db`` below the output (error powers add), if lower."""
    with_noise = -10 * np.log10(10 ** (-qdq_sqnr_db / 10) + 10 ** (-fp16_noise_db / 10))
    return float(min(qdq_sqnr_db - max_drop_db, with_noise))


@dataclass
class Segment:
    """The stretch ending at one quantization point: the value quantized there, compared over all feeds."""

    name: str  # the ONNX value the QuantizeLinear reads
    stats: TensorStats = field(default_factory=lambda: TensorStats(keep_cosines=False))
    fp16_floor: TensorStats = field(default_factory=lambda: TensorStats(keep_cosines=False))
    codes: int = 0
    codes_apart: int = 0

    @property
    def sqnr_db(self) -> float:
        return self.stats.sqnr_db

    @property
    def floor_db(self) -> float:
        """The segment's SQNR with only its entry values and weights rounded to fp16."""
        return self.fp16_floor.sqnr_db

    def min_sqnr_db(self, gate_db: float) -> float:
        return min(gate_db, self.floor_db - FP16_FLOOR_MARGIN_DB)

    @property
    def code_flips(self) -> float:
        return self.codes_apart / self.codes if self.codes else 0.0


@dataclass
class SegmentReport:
    segments: list[Segment]
    not_compared: list[str]  # quantization points the package has no value for (folded or renamed)
    min_sqnr_db: float

    @property
    def worst(self) -> Segment | None:
        """The segment closest to (or furthest below) its own threshold."""
        return min(self.segments, key=lambda s: s.sqnr_db - s.min_sqnr_db(self.min_sqnr_db), default=None)

    @property
    def mean_code_flips(self) -> float:
        return float(np.mean([s.code_flips for s in self.segments])) if self.segments else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.segments) and all(s.sqnr_db >= s.min_sqnr_db(self.min_sqnr_db) for s in self.segments)

    def as_dict(self) -> dict:
        w = self.worst
        return {"segments": len(self.segments), "min_sqnr_db": self.min_sqnr_db,
                "worst_sqnr_db": w.sqnr_db if w else None, "worst_segment": w.name if w else None,
                "worst_floor_db": w.floor_db if w else None,
                "worst_threshold_db": w.min_sqnr_db(self.min_sqnr_db) if w else None,
                "mean_code_flips": self.mean_code_flips,
                "max_code_flips": max((s.code_flips for s in self.segments), default=0.0),
                "not_compared": self.not_compared, "passed": self.passed}


def _exact_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ graph's own semantics
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (typed by shape inference)."""
    m = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        if n not in typed:
            raise InputError(f"cannot type the QDQ ONNX value {n!r} for an intermediate output",
                             hint="run onnx shape inference on the model (the value has no type)")
        m.graph.output.append(typed[n])
    return m


def _fp16_floor_model(model: onnx.ModelProto, forced: set[str]) -> onnx.ModelProto:
    """``model`` with the ``forced`` dequantize outputs made graph inputs (fed the exact run's values
    rounded to fp16) and every other dequantize output rounded to fp16 (Cast there and back): the
    QDQ math on the values an fp16 program starts from, with exact arithmetic after them."""
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dtypes = {i.name: i.data_type for i in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            nodes.append(n)
            continue
        out, dtype = n.output[0], dtypes.get(n.input[1], TensorProto.FLOAT)
        if out in forced:
            m.graph.input.append(helper.make_tensor_value_info(out, dtype, None))
            continue
        n.output[0] = out + "__exact"
        nodes += [n, helper.make_node("Cast", [out + "__exact"], [out + "__fp16"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", [out + "__fp16"], [out], to=dtype)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(x.dtype) if x.dtype in (np.float32, np.float64) else x


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model))


def _runner(package):
    from targets.coreml.runner import MLPackageRunner

    return package if isinstance(package, MLPackageRunner) else MLPackageRunner(package)


def compare_segments(qdq, package, feeds: Iterable[Mapping[str, np.ndarray]], *,
                     min_sqnr_db: float = MIN_SEGMENT_SQNR_DB) -> SegmentReport:
    """Compare every segment of ``package`` between two quantization points with the QDQ ONNX ``qdq``.

    ``qdq``: the QDQ ONNX the package was built from (path or ModelProto); ``package``: the
    ``.mlpackage`` (path or an open ``MLPackageRunner``); ``feeds``: inputs by ONNX name. Each feed
    runs the QDQ ONNX in ONNX Runtime (optimizations off) for its activation dequantize outputs and
    quantize inputs/outputs, then the package's program with those dequantize outputs forced (the
    runner's ONNX Runtime translation when the program translates, else the numpy executor).
    """
    from targets.coreml.lower.context import mil_name

    model = _load(qdq)
    runner = _runner(package)
    inits = {i.name for i in model.graph.initializer}
    dq = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    q = [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"
         and n.input[0] not in inits]
    if not q:
        raise InputError("the QDQ ONNX quantizes no activation: there are no segments to compare",
                         hint="segments apply to W8A8 (activation-quantized) models; compare weight-only "
                              "recipes end to end")
    computed = runner.executor.computed
    force_names = [n for n in dq if mil_name(n) in computed]
    points = [(x, y) for x, y in q if mil_name(x) in computed and mil_name(y) in computed]
    not_compared = sorted({x for x, _ in q} - {x for x, _ in points})
    wanted = sorted(set(force_names) | {v for pair in points for v in pair})
    with_outputs = _with_outputs(model, wanted)
    session = _exact_session(with_outputs)
    floor = _exact_session(_fp16_floor_model(with_outputs, set(force_names)))
    out_names = [o.name for o in session.get_outputs()]
    segments = {x: Segment(x) for x, _ in points}
    for feed in feeds:
        want = dict(zip(out_names, session.run(None, dict(feed))))
        rounded = {i.name: _fp16(np.asarray(feed[i.name])) for i in floor.get_inputs() if i.name in feed}
        rounded.update({n: _fp16(want[n]) for n in force_names})
        at_floor = dict(zip([o.name for o in floor.get_outputs()], floor.run(None, rounded)))
        got = runner.run_program(runner.coreml_feeds(feed), keep={mil_name(v) for pair in points for v in pair},
                                 force={mil_name(n): want[n] for n in force_names}, fp16_as_float32=True)
        for x, y in points:
            s = segments[x]
            s.stats.update(want[x], got[mil_name(x)].astype(np.float32, copy=False))
            s.fp16_floor.update(want[x], _fp16(at_floor[x]).astype(np.float32, copy=False))
            s.codes += want[y].size
            s.codes_apart += int(np.count_nonzero(want[y] != got[mil_name(y)]))  # numpy compares int8/uint8 exactly
    return SegmentReport(list(segments.values()), not_compared, min_sqnr_db)


@dataclass
class Acceptance:
    """Whether a W8A8 package is accepted: its segments, and its fidelity next to the QDQ ONNX's."""

    segments: SegmentReport
    fidelity: dict  # output -> {"package": {...}, "qdq": {...}} (sqnr_db, cosine_mean against float)
    max_sqnr_drop_db: float
    max_cosine_drop: float
    fp16_noise_db: float = FP16_NOISE_DB

    @property
    def checks(self) -> list[dict]:
        w = self.segments.worst
        out = [{"check": "segments", "value": w.sqnr_db if w else None,
                "threshold": w.min_sqnr_db(self.segments.min_sqnr_db) if w else self.segments.min_sqnr_db,
                "passed": self.segments.passed, "segment": w.name if w else None,
                "fp16_floor_db": w.floor_db if w else None}]
        for name, f in self.fidelity.items():
            p, q = f["package"], f["qdq"]
            floor = min_package_sqnr(q["sqnr_db"], self.max_sqnr_drop_db, self.fp16_noise_db)
            out.append({"check": f"{name}: SQNR vs float", "value": p["sqnr_db"], "threshold": floor,
                        "passed": p["sqnr_db"] >= floor})
            out.append({"check": f"{name}: cosine vs float", "value": p["cosine_mean"],
                        "threshold": q["cosine_mean"] - self.max_cosine_drop,
                        "passed": p["cosine_mean"] >= q["cosine_mean"] - self.max_cosine_drop})
        return out

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def as_dict(self) -> dict:
        return {"segments": self.segments.as_dict(), "fidelity": self.fidelity, "checks": self.checks,
                "passed": self.passed}


def w8a8_acceptance(qdq, package, float_model: str | os.PathLike, feeds: Iterable[Mapping[str, np.ndarray]], *,
                    min_segment_sqnr_db: float = MIN_SEGMENT_SQNR_DB, max_sqnr_drop_db: float = MAX_SQNR_DROP_DB,
                    max_cosine_drop: float = MAX_COSINE_DROP) -> Acceptance:
    """The iOS W8A8 gates: :func:`compare_segments` at ``min_segment_sqnr_db``, and, per output, the
    package's SQNR and mean per-sample cosine against ``float_model`` (ONNX Runtime) no more than
    ``max_sqnr_drop_db`` / ``max_cosine_drop`` below the QDQ ONNX's (ONNX Runtime, optimizations off)."""
    from edgeq.validate.runners import ort_session

    feeds = list(feeds)
    model = _load(qdq)
    runner = _runner(package)
    segments = compare_segments(model, runner, feeds, min_sqnr_db=min_segment_sqnr_db)
    from edgeq.validate.compare import carried_name, carry_state
    from edgeq.validate.state import recurrent_state_pairs

    flt = ort_session(Path(float_model))
    exact = _exact_session(model)
    names = [o.name for o in exact.get_outputs()]
    # a recurrent state (silero-vad's hn/cn) is judged by the next call from the state each model
    # returned, as edgeq.validate.compare judges it, when the model has another output to judge
    states = {o: i for i, o in recurrent_state_pairs(onnx.load(str(float_model), load_external_data=False))}
    if not set(names) - set(states):
        states = {}
    judged = [n for n in names if n not in states] + [carried_name(n) for n in names if states and n not in states]
    stats = {n: {"package": TensorStats(), "qdq": TensorStats()} for n in judged}
    flt_names = [o.name for o in flt.get_outputs()]
    for feed in feeds:
        ref = dict(zip(flt_names, flt.run(None, dict(feed))))
        want = dict(zip(names, exact.run(None, dict(feed))))
        got = runner.run(feed)
        if states:
            ref.update({carried_name(k): v for k, v in zip(flt_names, flt.run(None, carry_state(feed, ref, states)))})
            want.update({carried_name(k): v for k, v in zip(names, exact.run(None, carry_state(feed, want, states)))})
            got.update({carried_name(k): v for k, v in runner.run(carry_state(feed, got, states)).items()})
        for n in judged:
            stats[n]["qdq"].update(ref[n], want[n])
            stats[n]["package"].update(ref[n], got[n])
    fidelity = {n: {k: {"sqnr_db": s.sqnr_db, "cosine_mean": float(np.mean(s.cosines))} for k, s in pair.items()}
                for n, pair in stats.items()}
    return Acceptance(segments, fidelity, max_sqnr_drop_db, max_cosine_drop)
