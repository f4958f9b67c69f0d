"""Weight averaging: the mean of the task updates (uniform model soup)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.registry import LayerContext, get_method


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 5), shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), seed=st.integers(0, 2**16))
def test_weight_averaging_is_the_elementwise_mean(t: int, shape: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    thetas0 = rng.normal(size=shape)
    thetas = [rng.normal(size=shape) for _ in range(t)]
    deltas = torch.tensor(np.stack([th - thetas0 for th in thetas]))
    spec = get_method("weight_averaging")
    merged = spec.fn(deltas, spec.parse({}), LayerContext(name="w"))
    # θ₀ + 1·mean(Δ) is the uniform soup (1/T) Σ θ_t
    soup = sum(thetas) / t
    np.testing.assert_allclose(thetas0 + spec.default_lambda * merged.numpy(), soup, rtol=1e-12, atol=1e-12)


def test_weight_averaging_registry_entry() -> None:
    spec = get_method("weight_averaging")
    assert spec.default_lambda == 1.0 and spec.lambda_grid == (1.0,)
    assert not spec.matrix_only and spec.data_free
