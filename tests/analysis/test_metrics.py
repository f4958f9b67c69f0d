"""Normalized accuracy and NAI (DC-Merge Eqs. 29-30) on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.analysis.metrics import mean_nai, nai, normalized_accuracies, normalized_accuracy, pearson_r


def test_normalized_accuracy_by_hand() -> None:
    merged = {"mnist": 90.0, "svhn": 60.0}
    finetuned = {"svhn": 80.0, "mnist": 100.0}  # key order does not matter
    assert normalized_accuracies(merged, finetuned) == {"mnist": 0.9, "svhn": 0.75}
    assert normalized_accuracy(merged, finetuned) == pytest.approx((0.9 + 0.75) / 2)
    assert normalized_accuracy([0.9, 0.6], [1.0, 0.8]) == pytest.approx(0.825)


def test_nai_by_hand() -> None:
    merged, finetuned, zeroshot = [70.0, 50.0, 40.0], [90.0, 60.0, 80.0], [50.0, 50.0, 40.0]
    assert list(nai(merged, finetuned, zeroshot).values()) == pytest.approx([0.5, 0.0, 0.0])
    assert mean_nai(merged, finetuned, zeroshot) == pytest.approx(0.5 / 3)
    # Merged = fine-tuned gives 1; worse than zero-shot gives a negative value.
    assert nai({"a": 0.9}, {"a": 0.9}, {"a": 0.5})["a"] == pytest.approx(1.0)
    assert nai({"a": 0.4}, {"a": 0.9}, {"a": 0.5})["a"] == pytest.approx(-0.25)


@settings(max_examples=50, deadline=None)
@given(
    accs=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=10
    ),
)
def test_scale_free_and_matches_the_formulas(accs) -> None:
    m = [a[0] for a in accs]
    f = [a[1] for a in accs]
    z = [a[2] for a in accs]
    want = np.mean(np.array(m) / np.array(f))
    assert normalized_accuracy(m, f) == pytest.approx(want)
    # Fractions or percentages give the same ratios.
    assert normalized_accuracy([100 * x for x in m], [100 * x for x in f]) == pytest.approx(want)
    if all(abs(fi - zi) > 1e-6 for fi, zi in zip(f, z)):
        want_nai = (np.array(m) - np.array(z)) / (np.array(f) - np.array(z))
        np.testing.assert_allclose(list(nai(m, f, z).values()), want_nai, rtol=1e-9)


def test_undefined_ratios_raise() -> None:
    with pytest.raises(ValueError, match="task b"):
        normalized_accuracy({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="NAI is undefined"):
        nai([0.5], [0.7], [0.7])
    with pytest.raises(ValueError, match="different tasks"):
        normalized_accuracy({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError):
        normalized_accuracy([1.0, 0.5], [1.0])
    with pytest.raises(ValueError):
        normalized_accuracy({"a": 1.0}, [1.0])
    with pytest.raises(ValueError):
        normalized_accuracy([], [])
    with pytest.raises(ValueError):
        normalized_accuracy([float("nan")], [1.0])


def test_pearson_r() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(20), rng.standard_normal(20)
    assert pearson_r(x.tolist(), y.tolist()) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pearson_r([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError):
        pearson_r([1.0], [2.0])
