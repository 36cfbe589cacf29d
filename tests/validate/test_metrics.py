import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeq.validate.metrics import (
    ClassifierStats,
    EmbeddingStats,
    TensorStats,
    nearest_neighbour_agreement,
    per_sample_cosine,
    sqnr_db,
    topk,
)


def test_sqnr_known_values():
    ref = np.ones(100)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise = 1% of signal power
    assert sqnr_db(ref, ref + 1.0) == pytest.approx(0.0)
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_streaming_stats_equal_one_shot(parts, seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((parts * 3, 7))
    cand = ref + 0.01 * rng.standard_normal(ref.shape)
    s = TensorStats()
    for r, c in zip(np.split(ref, parts), np.split(cand, parts)):
        s.update(r, c)
    assert s.sqnr_db == pytest.approx(sqnr_db(ref, cand))
    assert s.max_abs_err == pytest.approx(np.abs(ref - cand).max())
    assert np.allclose(s.cosines, per_sample_cosine(ref, cand))


def test_nonfinite_mismatch_is_caught():
    s = TensorStats()
    s.update(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert s.nonfinite == 1 and s.sqnr_db == -math.inf
    same = TensorStats()
    same.update(np.array([np.inf, 2.0]), np.array([np.inf, 2.0]))
    assert same.nonfinite == 0 and same.sqnr_db == math.inf


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        TensorStats().update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_topk_and_classifier_agreement():
    scores = np.array([[0.1, 0.9, 0.3, 0.0, 0.5, 0.2], [3, 2, 1, 0, -1, -2]], dtype=np.float32)
    assert topk(scores, 2).tolist() == [[1, 4], [0, 1]]
    swapped = scores.copy()
    swapped[0, [1, 4]] = swapped[0, [4, 1]]  # top-1 changes, top-5 set stays
    c = ClassifierStats()
    c.update(scores, swapped)
    out = c.summary()
    assert out["top1_agreement"] == 0.5 and out["top5_overlap"] == 1.0 and out["samples"] == 2


def test_embedding_neighbours():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((20, 8))
    assert nearest_neighbour_agreement(e, e) == 1.0
    assert nearest_neighbour_agreement(e, rng.standard_normal((20, 8))) < 0.5
    s = EmbeddingStats()
    s.update(e[:10], e[:10])
    s.update(e[10:], e[10:] * 2.0)  # scaled: cosine 1
    out = s.summary()
    assert out["cosine_min"] == pytest.approx(1.0) and out["nn_agreement"] == 1.0 and out["samples"] == 20
