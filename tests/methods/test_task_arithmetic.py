"""Task arithmetic: θ = θ₀ + λ Σ_t Δ_t."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.registry import LayerContext, get_method


def test_one_model_with_lambda_one_returns_that_model() -> None:
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    theta1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    spec = get_method("task_arithmetic")
    merged = spec.fn((theta1 - theta0).unsqueeze(0), spec.parse({}), LayerContext(name="w"))
    torch.testing.assert_close(theta0 + 1.0 * merged, theta1, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 6), n=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_task_arithmetic_is_the_sum(t: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(t, n))
    expected = np.zeros(n)
    for row in d:  # plain loop, independent of torch.sum
        expected = expected + row
    spec = get_method("task_arithmetic")
    merged = spec.fn(torch.tensor(d), spec.parse({}), LayerContext(name="w"))
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_defaults() -> None:
    spec = get_method("task_arithmetic")
    assert spec.default_lambda == 0.3
    assert spec.lambda_grid[0] == 0.05 and spec.lambda_grid[-1] == 1.0 and len(spec.lambda_grid) == 20
    assert np.allclose(np.diff(spec.lambda_grid), 0.05)
