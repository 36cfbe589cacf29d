import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeq.errors import InputError
from edgeq.quant.observers import (
    MASK_THRESHOLD,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)

METHODS = ["minmax", "percentile", "entropy", "mse"]
N = 1 << 20
GAUSS_Q9999 = 3.719016485455709  # standard normal quantile at 0.9999


def feed(obs, data, parts=8):
    for chunk in np.array_split(data, parts):
        obs.update(chunk)
    return obs


def quant_mse(x, lo, hi):
    """Mean squared error of uint8 affine quantization with range (lo, hi) widened to hold 0."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


@pytest.fixture(scope="module")
def gauss_outliers():
    """N standard normal samples plus one planted outlier at +50 and one at -50."""
    rng = np.random.default_rng(7)
    d = np.concatenate([rng.standard_normal(N), [50.0, -50.0]]).astype(np.float32)
    rng.shuffle(d)
    return d


@pytest.fixture(scope="module")
def heavy_tails():
    rng = np.random.default_rng(11)
    return {
        "laplace": rng.laplace(size=N).astype(np.float32),
        "student_t3": rng.standard_t(3, size=N).astype(np.float32),
    }


def test_minmax_is_exact():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 33)).astype(np.float32) * s for s in (0.1, 3.0, 0.5)]
    obs = MinMaxObserver("act")
    for b in batches:
        obs.update(b)
    allv = np.concatenate([b.ravel() for b in batches])
    assert obs.range() == (float(allv.min()), float(allv.max()))
    assert obs.seen == allv.size and obs.ignored == 0


@pytest.mark.parametrize("method", METHODS)
def test_masking_constants_and_non_finite_are_ignored_and_counted(method):
    rng = np.random.default_rng(1)
    clean = rng.standard_normal((6, 64, 32)).astype(np.float32)
    dirty = clean.copy()
    junk = [np.finfo(np.float32).min, -3.4e38, np.inf, -np.inf, np.nan, MASK_THRESHOLD, -1e35]
    dirty[:, 0, : len(junk)] = junk  # one additive attention mask per batch
    obs = feed(make_observer(method, "attn"), dirty, parts=6)
    kept = np.delete(dirty.reshape(6, -1), np.arange(len(junk)), axis=1)
    ref = make_observer(method, "ref")
    ref.update(kept)
    assert obs.ignored == 6 * len(junk)
    assert obs.seen == kept.size
    # Exactly the range of the real values alone (histograms do not depend on batching).
    assert obs.range() == ref.range()
    assert (obs.minimum, obs.maximum) == (float(kept.min()), float(kept.max()))


def test_only_masked_values_raise_naming_the_tensor():
    obs = PercentileObserver("encoder.attn.scores")
    obs.update(np.full((2, 8), np.finfo(np.float32).min, dtype=np.float32))
    obs.update(np.array([np.nan, np.inf]))
    with pytest.raises(InputError, match="encoder.attn.scores") as err:
        obs.range()
    assert "18 values" in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_no_data_raises_naming_the_tensor(method):
    with pytest.raises(InputError, match="'layer3/relu_out'"):
        make_observer(method, "layer3/relu_out").range()


def test_unknown_method_lists_the_methods():
    with pytest.raises(InputError) as err:
        make_observer("kl", "t")
    assert all(m in str(err.value) for m in METHODS)


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="'bins'"):
        make_observer("minmax", "t", bins=64)
    with pytest.raises(InputError, match="percentile"):
        make_observer("percentile", "t", percentile=40)
    with pytest.raises(InputError, match="bins"):
        make_observer("mse", "t", bins=1001)
    with pytest.raises(InputError, match="entropy needs bins"):
        make_observer("entropy", "t", bins=512)
    with pytest.raises(InputError, match="complex"):
        make_observer("minmax", "t").update(np.ones(3, dtype=np.complex64))
    obs = make_observer("percentile", "t", percentile=99.9, bins=1024)
    assert (obs.percentile, obs.bins) == (99.9, 1024)


def _growing_batches(seed):
    """Batches whose range grows (and shifts) batch after batch: every update regrids."""
    rng = np.random.default_rng(seed)
    scales = [1e-3, 0.02, 0.5, 3.0, 40.0, 700.0]
    return [(rng.standard_normal(20_000) * s + s / 3).astype(np.float32) for s in scales]


def test_histogram_streaming_equals_one_shot_despite_growth():
    batches = _growing_batches(3)
    one_shot = PercentileObserver("t")
    one_shot.update(np.concatenate(batches))
    for order in (batches, batches[::-1], batches[2:] + batches[:2]):
        streamed = PercentileObserver("t")
        for b in order:
            streamed.update(b)
        counts, edges = streamed.histogram()
        ref_counts, ref_edges = one_shot.histogram()
        # Stated threshold: within one bin width. The grid design makes it exact.
        np.testing.assert_array_equal(counts, ref_counts)
        np.testing.assert_array_equal(edges, ref_edges)
        for q in (1e-4, 0.01, 0.5, 0.99, 0.9999):
            assert abs(streamed.quantile(q) - one_shot.quantile(q)) <= streamed.bin_width
            assert streamed.quantile(q) == one_shot.quantile(q)
        assert streamed.range() == one_shot.range()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-30, 30), st.floats(-12, 12), st.integers(1, 300)),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**31),
)
def test_histogram_is_independent_of_batch_order_and_split(specs, seed):
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(n) * 2.0**e + c).astype(np.float32) for c, e, n in specs]
    rng.shuffle(batches)
    batches.append(np.zeros(3, np.float32))
    streamed = PercentileObserver("t", bins=64)
    for b in batches:
        streamed.update(b)
    one_shot = PercentileObserver("t", bins=64)
    one_shot.update(np.concatenate(batches)[::-1])
    np.testing.assert_array_equal(streamed.histogram()[0], one_shot.histogram()[0])
    np.testing.assert_array_equal(streamed.histogram()[1], one_shot.histogram()[1])
    assert streamed.histogram()[0].sum() == sum(b.size for b in batches)


@pytest.mark.parametrize("method", METHODS)
def test_state_is_bounded(method):
    obs = make_observer(method, "t")
    rng = np.random.default_rng(5)
    obs.update(rng.standard_normal(100).astype(np.float32))
    first = obs.state_nbytes()
    for i in range(300):
        obs.update((rng.standard_normal(2_000) * 1.05**i).astype(np.float32))
    assert obs.state_nbytes() == first
    assert first <= 8 * 8192 + 64  # the biggest default: entropy's 8192 int64 bins


def test_zero_first_then_growth():
    obs = PercentileObserver("t")
    obs.update(np.zeros(10, np.float32))  # a constant tensor sits at the finest level
    assert obs.range() == (0.0, 0.0)
    obs.update(np.array([-3.0, 1e6], np.float32))  # widening by ~2**1000 still merges exactly
    counts, _ = obs.histogram()
    assert counts.sum() == 12 and obs.zeros == 10
    assert obs.quantile(0.0) == -3.0 and obs.quantile(1.0) == 1e6


def test_percentile_on_gaussian_with_outliers(gauss_outliers):
    obs = feed(PercentileObserver("t"), gauss_outliers)
    lo, hi = obs.range()
    # Sampling std of the 0.9999 quantile at n = 2**20 is ~0.025; allow 0.08 (2 %).
    assert abs(hi - GAUSS_Q9999) < 0.08
    assert abs(lo + GAUSS_Q9999) < 0.08
    # And it is the sample's quantile up to the histogram's interpolation (< one bin).
    assert abs(hi - np.quantile(gauss_outliers, 0.9999)) < obs.bin_width
    assert abs(lo - np.quantile(gauss_outliers, 0.0001)) < obs.bin_width
    assert max(-lo, hi) < 50 / 10  # far inside the planted outliers at ±50


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_planted_outliers(gauss_outliers, method):
    obs = feed(make_observer(method, "t"), gauss_outliers)
    lo, hi = obs.range()
    if method == "entropy":
        assert max(-lo, hi) < 6  # clips near the bulk (±4.9σ is the largest Gaussian sample)
    else:
        # MSE counts the two outliers' squared clipping error, so it stops well short of the bulk
        # but still halves the range.
        assert max(-lo, hi) < 25
    assert quant_mse(gauss_outliers, lo, hi) < quant_mse(gauss_outliers, -50.0, 50.0)


# Stated thresholds on the uint8 quantization MSE with the chosen range over that with the
# min-max range (measured at 2**20 samples, seed 11: laplace mse 0.67, entropy 0.64;
# student-t(3) mse 0.56). Entropy is not held to this on student-t(3): KL weighs how much mass
# is clipped, not how far, and TensorRT's own algorithm clips t(3) to a worse MSE than min-max
# (ratio 1.3-1.8 in our runs), as does ours.
@pytest.mark.parametrize(
    ("dist", "method", "max_ratio"),
    [
        ("laplace", "mse", 0.8),
        ("laplace", "entropy", 0.8),
        ("student_t3", "mse", 0.7),
    ],
)
def test_entropy_and_mse_beat_minmax_on_heavy_tails(heavy_tails, dist, method, max_ratio):
    data = heavy_tails[dist]
    obs = feed(make_observer(method, dist), data)
    lo, hi = obs.range()
    ratio = quant_mse(data, lo, hi) / quant_mse(data, float(data.min()), float(data.max()))
    assert ratio < max_ratio, (lo, hi, ratio)


def test_mse_matches_brute_force_optimum(heavy_tails):
    data = heavy_tails["laplace"][: 1 << 18]
    lo, hi = feed(MSEObserver("t"), data).range()
    best = min(quant_mse(data, -c, c) for c in np.linspace(4.0, 14.0, 101))
    # The 2-D grid may even beat the best symmetric clip; never worse than it by more than 2 %.
    assert quant_mse(data, lo, hi) < 1.02 * best


def _naive_kl_range(obs, levels=256, eps=1e-4):
    """EntropyObserver's search written as a plain loop over thresholds (the reference)."""
    counts, edges = obs.histogram()
    w = obs.bin_width
    g = np.round(edges[:-1] / w).astype(np.int64)  # global bin index
    h = counts.astype(np.float64)
    h[g == 0] -= obs.zeros
    gmin, gmax = math.floor(obs.minimum / w), math.floor(obs.maximum / w)
    best_kl, best_t = np.inf, None
    for t in range(1, max(-gmin, gmax + 1) + 1):
        a, b = max(-t, gmin), min(t, gmax + 1)
        n = b - a
        if n < levels:
            continue
        window = h[(g >= a) & (g < b)]
        p = window.copy()
        p[0] += h[g < a].sum()
        p[-1] += h[g >= b].sum()
        starts = (np.arange(levels) * n) // levels
        group_sum = np.add.reduceat(window, starts)
        group_nz = np.add.reduceat((p > 0).astype(np.float64), starts)
        per_bin = np.repeat(group_sum / np.maximum(group_nz, 1), np.diff(np.append(starts, n)))
        q = np.where(p > 0, np.where(per_bin > 0, per_bin, eps), 0.0)
        m = p > 0
        kl = np.sum(p[m] / p.sum() * np.log((p[m] / p.sum()) / (q[m] / window.sum())))
        if kl < best_kl - 1e-12:
            best_kl, best_t = kl, t
    return max(obs.minimum, -best_t * w), min(obs.maximum, best_t * w)


@pytest.mark.parametrize("one_sided", [False, True])
def test_entropy_search_matches_a_plain_loop(one_sided):
    rng = np.random.default_rng(6)
    data = np.concatenate([rng.laplace(size=30_000), np.zeros(2_000), [-40.0, 55.0]]).astype(np.float32)
    if one_sided:
        data = np.abs(data)
    obs = feed(EntropyObserver("t", bins=4096), data)
    lo, hi = obs.range()
    assert (lo, hi) == _naive_kl_range(obs)
    assert hi > 256 * obs.bin_width  # an interior optimum, not the smallest window searched


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_one_sided_relu_output(method):
    rng = np.random.default_rng(4)
    data = np.maximum(rng.standard_normal(N), 0).astype(np.float32)  # half exact zeros
    lo, hi = feed(make_observer(method, "relu"), data).range()
    assert lo == 0.0
    assert 3.5 < hi <= float(data.max())
    assert quant_mse(data, lo, hi) < quant_mse(data, 0.0, float(data.max()))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    batches = _growing_batches(9)
    a = make_observer(method, "t")
    b = make_observer(method, "t")
    for x in batches:
        a.update(x)
    for x in batches:
        b.update(x.copy())
    assert a.range() == b.range()


@pytest.mark.parametrize("method", METHODS)
def test_constant_tensor(method):
    obs = make_observer(method, "bias_like")
    obs.update(np.full((3, 5), 2.5, np.float32))
    assert obs.range() == (2.5, 2.5)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64, np.int32])
def test_dtypes(dtype):
    x = np.array([[-2, 0, 1, 3]]).astype(dtype)
    for method in METHODS:
        obs = make_observer(method, "t")
        obs.update(x)
        lo, hi = obs.range()
        assert -2 <= lo <= hi <= 3 and obs.seen == 4


def test_range_stays_within_data():
    rng = np.random.default_rng(2)
    data = (rng.standard_normal(50_000) * 0.01 + 1000.0).astype(np.float32)  # far from zero
    for method in METHODS:
        lo, hi = feed(make_observer(method, "t"), data).range()
        assert float(data.min()) <= lo <= hi <= float(data.max()), method
        assert math.isfinite(lo) and math.isfinite(hi)


def test_histogram_subclasses():
    for cls in (PercentileObserver, EntropyObserver, MSEObserver):
        assert issubclass(cls, HistogramObserver)
        assert make_observer(cls.method).method == cls.method
