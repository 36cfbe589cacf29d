"""The fast float32 round trip used by searches agrees with the stored integers' dequantized values."""

import numpy as np
import pytest

from edgeq.quant.plan import WeightDecision
from edgeq.quant.recipes import WeightFormat
from edgeq.quant.weights import quantize_weight, roundtrip_for_search


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,axis", [((96, 40), 0), ((40, 100), 1)])  # 100: a partial last block
def test_int4_roundtrip_for_search_matches_the_stored_codes(symmetric, shape, axis):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:32] *= 20  # blocks of very different ranges
    w[5:, :3] = 0.0  # an all-zero block or two
    d = WeightDecision("n", "MatMul", 1, "w", shape, WeightFormat.INT4, axis=axis, block=32, symmetric=symmetric)
    want = quantize_weight(w, d).dequantize()
    got = roundtrip_for_search(w, d)
    assert got.dtype == np.float32 and got.shape == w.shape
    step = np.abs(w).max() / 7
    # equal up to a scale one float32 ulp apart, but where float32 rounds a code at a tie the other way
    # (one step, rarely)
    assert np.mean(np.isclose(got, want, rtol=1e-6, atol=0)) > 0.995 and np.abs(got - want).max() <= step * 1.001
