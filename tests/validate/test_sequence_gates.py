"""Class scores per position ([batch, positions, classes], a CTC recognizer's frames) and the
default gates: the task is detected from the graph, top-1 is judged per position, the cosine floor
is the SQNR floor's per-sample equivalent, and a damaged model still fails.

The model: x [batch, 12, 16] -> MatMul [16, 10] -> Softmax(axis=-1) -> y [batch, 12, 10], 64
sequences. Candidates are the same graph with the weight perturbed by Gaussian noise at a stated
level: weights at 34 dB give the output 31.8 dB, cosine 0.9997, top-1 0.987 per position (passes
w8a16's gates); at 8 dB, 6.2 dB, 0.878, 0.72 (fails all three).
"""

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.pipeline.build import cosine_floor, default_thresholds
from edgeq.validate.metrics import ClassifierStats
from edgeq.validate.tasks import detect_task

T, D, C = 12, 16, 10

SEQ = """
<ir_version: 10, opset_import: ["" : {opset}]>
g (float[batch, {t}, {d}] x) => (float[batch, {t}, {c}] y) <float[{d}, {c}] w = {{{vals}}}>
{{
    s = MatMul(x, w)
    y = {op}
}}
"""


def _seq_model(w: np.ndarray, *, op: str = "Softmax<axis = -1>(s)", opset: int = 21) -> onnx.ModelProto:
    vals = ", ".join(f"{v:.6f}" for v in w.ravel())
    return onnx.parser.parse_model(SEQ.format(opset=opset, t=T, d=D, c=C, vals=vals, op=op))


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((D, C)).astype(np.float32)


def _noisy(w: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(w.shape)
    return (w + noise * np.sqrt(np.mean(w ** 2) / 10 ** (snr_db / 10))).astype(np.float32)


@pytest.fixture
def seq_models(tmp_path):
    w = _weights()
    paths = {}
    for name, ww in (("float", w), ("light", _noisy(w, 34.0)), ("damaged", _noisy(w, 8.0))):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(_seq_model(ww), str(paths[name]))
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((8, T, D)).astype(np.float32)} for _ in range(8)]
    return paths, feeds


def test_per_position_class_scores_are_detected():
    task, why = detect_task(_seq_model(_weights()))
    assert task == "classification" and "per position" in why and "[batch, positions, 10]" in why
    # a rank-3 MatMul output may be hidden states: not taken for class scores
    assert detect_task(_seq_model(_weights(), op="Identity(s)"))[0] == "generic"
    # before opset 13 Softmax's default axis 1 normalises positions and classes together
    assert detect_task(_seq_model(_weights(), op="Softmax(s)", opset=12))[0] == "generic"
    assert detect_task(_seq_model(_weights(), op="Softmax<axis = 2>(s)", opset=12))[0] == "classification"
    assert detect_task(_seq_model(_weights(), op="LogSoftmax<axis = -1>(s)"))[0] == "classification"


def test_classifier_stats_count_every_position():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., 1] = 1.0
    cand = ref.copy()
    cand[1, 2] = [0, 0, 0, 1]  # one position of six changes its top-1
    s = ClassifierStats()
    s.update(ref, cand)
    out = s.summary()
    assert out["per_position"] is True and out["samples"] == 6
    assert out["top1_agreement"] == pytest.approx(5 / 6)


def test_cosine_floor_is_the_sqnr_floors_equivalent():
    assert cosine_floor(25.0) == 0.9984 and cosine_floor(15.0) == 0.9845 and cosine_floor(10.0) == 0.9534
    # an orthogonal error at exactly the floor: the cosine it gives is not below the cosine floor
    rng = np.random.default_rng(0)
    for floor in (10.0, 15.0, 25.0):
        ref = rng.standard_normal(4096)
        err = rng.standard_normal(4096)
        err -= ref * (err @ ref) / (ref @ ref)
        err *= np.sqrt((ref @ ref) / (err @ err) / 10 ** (floor / 10))
        cand = ref + err
        cos = ref @ cand / np.linalg.norm(ref) / np.linalg.norm(cand)
        assert cosine_floor(floor) <= cos < cosine_floor(floor) + 2e-4


def test_sequence_gates_pass_light_error_and_fail_damage(seq_models):
    paths, feeds = seq_models
    th = default_thresholds("w8a16", "classification", per_position=True)
    assert th.min_top1_per_position == 0.98 and th.min_cosine == 0.9984 and th.min_sqnr_db == 25.0
    rep = edgeq.validate([str(paths["light"]), str(paths["damaged"])], str(paths["float"]), feeds,
                         task="classification", thresholds=th, progress=False)
    light, damaged = rep.candidates
    assert light.task["per_position"] and light.task["samples"] == 64 * T
    assert light.outputs["y"]["sqnr_db"] > 30 and light.task["top1_agreement"] >= 0.98
    assert light.passed, light.checks
    checks = {c["check"]: c for c in damaged.checks}
    assert damaged.outputs["y"]["sqnr_db"] < 15 and damaged.task["top1_agreement"] < 0.9
    assert {n for n, c in checks.items() if not c["passed"]} == {
        "y: sqnr_db", "y: cosine_mean", "top1_agreement (per position)"}
    assert "top1_agreement" not in checks  # judged per position, not as one decision per sample


def test_a_given_top1_gate_judges_positions_too(seq_models):
    paths, feeds = seq_models
    from edgeq.validate import Thresholds

    rep = edgeq.validate(str(paths["damaged"]), str(paths["float"]), feeds, task="classification",
                         thresholds=Thresholds(min_top1_agreement=0.5), progress=False)
    (c,) = rep.candidates
    assert [k["check"] for k in c.checks] == ["top1_agreement (per position)"] and c.passed


def test_cosine_still_sees_a_quiet_sample_the_sqnr_floor_averages_away():
    """The derived cosine floor is not redundant: SQNR weighs samples by energy, cosine judges each one
    (measured: 46.0 dB over all elements, mean cosine 0.964, the quiet sample 0.712)."""
    from edgeq.validate.compare import CandidateResult, _checks
    from edgeq.validate.metrics import TensorStats

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 64))
    ref[7] *= 0.01  # one quiet sample ...
    cand = ref + 0.003 * rng.standard_normal(ref.shape) * np.linalg.norm(ref, axis=1, keepdims=True) / 8
    cand[7] = ref[7] + rng.standard_normal(64) * 0.01  # ... whose error is as large as itself (0 dB)
    st = TensorStats()
    st.update(ref.astype(np.float32), cand.astype(np.float32))
    res = CandidateResult({}, {"y": st.summary()}, {}, [])
    checks = {c["check"]: c for c in _checks(res, default_thresholds("w8a16", "generic"))}
    assert checks["y: sqnr_db"]["value"] > 30 and checks["y: sqnr_db"]["passed"]
    assert checks["y: cosine_mean"]["value"] < 0.99 and not checks["y: cosine_mean"]["passed"]
