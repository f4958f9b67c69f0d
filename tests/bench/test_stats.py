"""Bootstrap intervals: closed forms (binomial resampling distribution), a plain loop, published properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from taskmerge.bench.stats import bootstrap_average_ci, paired_bootstrap_diff_ci


def _bernoulli(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n examples of which exactly k are correct, in a shuffled order."""
    x = np.zeros(n, dtype=bool)
    x[:k] = True
    np.random.default_rng(seed).shuffle(x)
    return x


def test_all_correct_gives_zero_width() -> None:
    est, lo, hi = bootstrap_average_ci({"a": np.ones(50, bool), "b": np.ones(30, bool)})
    assert est == lo == hi == 1.0


def test_normalizer_divides_the_estimate() -> None:
    a, b = _bernoulli(200, 150), _bernoulli(100, 40)
    est, _, _ = bootstrap_average_ci({"a": a, "b": b}, normalizer={"a": 0.9, "b": 0.5})
    assert est == pytest.approx((0.75 / 0.9 + 0.4 / 0.5) / 2)


def test_single_task_matches_binomial_quantiles() -> None:
    # Resampling n Bernoulli outcomes with k successes: the resampled accuracy is Binomial(n, k/n) / n.
    n, k = 400, 300
    _, lo, hi = bootstrap_average_ci({"t": _bernoulli(n, k)}, n_boot=20000, seed=1)
    assert lo == pytest.approx(sps.binom.ppf(0.025, n, k / n) / n, abs=1.5 / n)
    assert hi == pytest.approx(sps.binom.ppf(0.975, n, k / n) / n, abs=1.5 / n)


def test_width_shrinks_like_one_over_sqrt_n() -> None:
    _, lo1, hi1 = bootstrap_average_ci({"t": _bernoulli(250, 175)}, n_boot=4000)
    _, lo4, hi4 = bootstrap_average_ci({"t": _bernoulli(1000, 700)}, n_boot=4000)
    assert (hi1 - lo1) / (hi4 - lo4) == pytest.approx(2.0, rel=0.12)


def test_multi_task_width_matches_normal_approximation() -> None:
    # Var of the task average = Σ_t p_t(1-p_t)/n_t / T²; its 95 % interval is ≈ ±1.96 sd.
    tasks = {"a": (300, 240), "b": (500, 250), "c": (200, 180)}
    correct = {t: _bernoulli(n, k, seed=i) for i, (t, (n, k)) in enumerate(tasks.items())}
    sd = np.sqrt(sum((k / n) * (1 - k / n) / n for n, k in tasks.values())) / len(tasks)
    _, lo, hi = bootstrap_average_ci(correct, n_boot=10000, seed=3)
    assert hi - lo == pytest.approx(2 * 1.959964 * sd, rel=0.06)


def test_matches_a_plain_loop() -> None:
    correct = {"b_task": _bernoulli(37, 20, 1), "a_task": _bernoulli(23, 5, 2)}
    z = {"a_task": 0.5, "b_task": 0.8}
    n_boot, seed = 300, 7
    # the documented protocol, one replicate and one example at a time
    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, correct[t].size, size=(n_boot, correct[t].size)) for t in sorted(correct)}
    reps = []
    for b in range(n_boot):
        total = 0.0
        for t in correct:
            hits = 0
            for i in draws[t][b]:
                hits += int(correct[t][i])
            total += hits / correct[t].size / z[t]
        reps.append(total / len(correct))
    est, lo, hi = bootstrap_average_ci(correct, z, n_boot=n_boot, seed=seed)
    assert est == pytest.approx((20 / 37 / 0.8 + 5 / 23 / 0.5) / 2)
    assert lo == pytest.approx(np.percentile(reps, 2.5), abs=1e-12)
    assert hi == pytest.approx(np.percentile(reps, 97.5), abs=1e-12)


def test_array_normalizer_is_resampled_with_the_same_indices() -> None:
    # model == normaliser on every example: every replicate's ratio is exactly 1
    ref = _bernoulli(120, 90)
    est, lo, hi = bootstrap_average_ci({"t": ref}, normalizer={"t": ref.astype(int)})
    assert est == lo == hi == pytest.approx(1.0, abs=1e-15)


def test_paired_with_itself_is_exactly_zero() -> None:
    a = {"x": _bernoulli(80, 50), "y": _bernoulli(60, 10)}
    assert paired_bootstrap_diff_ci(a, a, normalizer={"x": 0.9, "y": 0.7}) == (0.0, 0.0, 0.0)


def test_paired_diff_matches_binomial_of_discordant_examples() -> None:
    # a is right wherever b is, plus on k more of n examples: the resampled difference is Binomial(n, k/n)/n.
    n, k = 500, 40
    b = _bernoulli(n, 300)
    a = b.copy()
    a[np.flatnonzero(~b)[:k]] = True
    est, lo, hi = paired_bootstrap_diff_ci({"t": a}, {"t": b}, n_boot=20000, seed=2)
    assert est == pytest.approx(k / n)
    assert lo == pytest.approx(sps.binom.ppf(0.025, n, k / n) / n, abs=1.5 / n)
    assert hi == pytest.approx(sps.binom.ppf(0.975, n, k / n) / n, abs=1.5 / n)
    assert lo > 0


def test_paired_interval_narrower_than_unpaired_difference() -> None:
    # two methods agreeing on most examples: the paired interval is much narrower than either method's own
    b = _bernoulli(600, 400)
    a = b.copy()
    a[np.flatnonzero(~b)[:15]] = True
    _, lo_d, hi_d = paired_bootstrap_diff_ci({"t": a}, {"t": b})
    _, lo_a, hi_a = bootstrap_average_ci({"t": a})
    _, lo_b, hi_b = bootstrap_average_ci({"t": b})
    assert hi_d - lo_d < 0.5 * min(hi_a - lo_a, hi_b - lo_b)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_interval_within_range_and_contains_nothing_outside(values: list[bool], seed: int) -> None:
    x = np.array(values)
    est, lo, hi = bootstrap_average_ci({"t": x}, n_boot=200, seed=seed)
    assert 0.0 <= lo <= hi <= 1.0
    assert est == pytest.approx(x.mean())


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="'t'"):
        bootstrap_average_ci({"t": np.array([0, 2, 1])})
    with pytest.raises(ValueError, match="'t'"):
        paired_bootstrap_diff_ci({"t": np.ones(3)}, {"t": np.ones(4)})
    with pytest.raises(KeyError, match="'u'"):
        bootstrap_average_ci({"t": np.ones(3), "u": np.ones(2)}, normalizer={"t": 1.0})
    with pytest.raises(ValueError, match="level"):
        bootstrap_average_ci({"t": np.ones(3)}, level=1.5)
