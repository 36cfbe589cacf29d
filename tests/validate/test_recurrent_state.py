"""Recurrent state outputs (silero-vad's hn/cn) are judged by the next call that carries them."""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgeq.pipeline.variants import Evaluator
from edgeq.validate.compare import Thresholds
from edgeq.validate.run import validate_models
from edgeq.validate.state import recurrent_state_pairs

HIDDEN, FEATURES = 8, 4
GATES = Thresholds(min_sqnr_db=30.0, min_cosine=0.999)


def _lstm(path, *, state_offset=0.0, outputs=("y", "hn", "cn"), forgetful=False):
    """x[seq, 1, 4], h/c[1, 1, 8] -> y[seq, 1, 8] (every step's hidden state), hn, cn; ``state_offset``
    is added to the returned hn (a state that is wrong while this call's y is right). ``forgetful``:
    no recurrent weights and a closed forget gate, so the next call does not depend on the state."""
    rng = np.random.default_rng(0)
    r = np.zeros((1, 4 * HIDDEN, HIDDEN)) if forgetful else rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.5
    b = np.zeros((1, 8 * HIDDEN))
    if forgetful:
        b[0, 2 * HIDDEN:3 * HIDDEN] = -40.0  # ONNX gate order i, o, f, c: forget nothing carried
    inits = [nh.from_array((rng.standard_normal((1, 4 * HIDDEN, FEATURES)) * 0.5).astype(np.float32), "W"),
             nh.from_array(r.astype(np.float32), "R"), nh.from_array(b.astype(np.float32), "B"),
             nh.from_array(np.array([1], np.int64), "axis1"), nh.from_array(np.array(state_offset, np.float32), "offset")]
    nodes = [oh.make_node("LSTM", ["x", "W", "R", "B", "", "h", "c"], ["Y", "Y_h", "cn"], hidden_size=HIDDEN),
             oh.make_node("Squeeze", ["Y", "axis1"], ["y"]), oh.make_node("Add", ["Y_h", "offset"], ["hn"])]
    vi = oh.make_tensor_value_info
    graph = oh.make_graph(nodes, "lstm", [vi("x", 1, ["seq", 1, FEATURES]), vi("h", 1, [1, 1, HIDDEN]),
                                          vi("c", 1, [1, 1, HIDDEN])],
                          [vi(o, 1, None) for o in outputs], inits)
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), path)
    return str(path)


def _feeds(n=4):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((6, 1, FEATURES)).astype(np.float32),
             "h": (rng.standard_normal((1, 1, HIDDEN)) * 0.3).astype(np.float32),
             "c": (rng.standard_normal((1, 1, HIDDEN)) * 0.3).astype(np.float32)} for _ in range(n)]


def test_state_pairs_are_found_from_the_graph_not_from_shapes(tmp_path):
    assert recurrent_state_pairs(onnx.load(_lstm(tmp_path / "m.onnx"))) == [("h", "hn"), ("c", "cn")]
    # an autoencoder's output has its input's shape and is no state
    vi = oh.make_tensor_value_info
    ae = oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["x_hat"])], "ae", [vi("x", 1, [1, 8])],
                                     [vi("x_hat", 1, [1, 8])]), opset_imports=[oh.make_opsetid("", 21)])
    assert recurrent_state_pairs(ae) == []


def test_a_wrong_state_fails_through_the_call_that_carries_it(tmp_path):
    ref = _lstm(tmp_path / "ref.onnx")
    bad = _lstm(tmp_path / "bad.onnx", state_offset=0.5)  # y of this call is exact, hn is not
    rep = validate_models([bad], ref, _feeds(), thresholds=GATES, intermediates=False, progress=False)
    cand = rep.candidates[0]
    checks = {c["check"]: c for c in cand.checks}
    assert checks["y: sqnr_db"]["passed"] and not checks["y (state carried): sqnr_db"]["passed"]
    assert "judged by the next call" in checks["hn: sqnr_db"]["note"] and checks["hn: sqnr_db"]["value"] is None
    assert cand.outputs["hn"]["recurrent_state"] == "h" and not rep.passed


def test_a_faithful_state_passes_and_is_reported(tmp_path):
    ref = _lstm(tmp_path / "ref.onnx")
    rep = validate_models([ref], ref, _feeds(), thresholds=GATES, intermediates=False, progress=False)
    cand = rep.candidates[0]
    assert rep.passed and "y (state carried)" in cand.outputs and cand.outputs["hn"]["gated"] is False
    assert np.isinf(cand.outputs["hn"]["sqnr_db"])  # still measured and reported


def test_a_model_whose_outputs_are_all_states_keeps_their_own_gates(tmp_path):
    ref = _lstm(tmp_path / "ref.onnx", outputs=("hn", "cn"))
    bad = _lstm(tmp_path / "bad.onnx", state_offset=0.5, outputs=("hn", "cn"))
    rep = validate_models([bad], ref, _feeds(), thresholds=GATES, intermediates=False, progress=False)
    checks = {c["check"]: c for c in rep.candidates[0].checks}
    assert not checks["hn: sqnr_db"]["passed"] and checks["cn: sqnr_db"]["passed"]


def test_variant_scores_judge_a_state_by_the_call_that_carries_it(tmp_path):
    # analyze / --budget score variants the way validate gates them: a state the next call forgets is
    # no damage, a state the next call reads wrong is
    ref = onnx.load(_lstm(tmp_path / "ref.onnx", forgetful=True))
    ev = Evaluator(ref, _feeds())
    assert len(ev.reference[0]) == 2  # y, and y of the call from the returned state
    harmless = _lstm(tmp_path / "harmless.onnx", state_offset=0.5, forgetful=True)
    assert ev.score(Path(harmless).read_bytes()).sqnr_db == float("inf")
    strict = Evaluator(onnx.load(_lstm(tmp_path / "ref2.onnx")), _feeds())
    harmful = _lstm(tmp_path / "harmful.onnx", state_offset=0.5)
    assert strict.score(Path(harmful).read_bytes()).sqnr_db < 30
