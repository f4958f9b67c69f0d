"""DARE: unbiased drop-and-rescale, seeded, and its TIES combination."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmerge.errors import OptionError
from taskmerge.methods.dare import dare_drop
from taskmerge.registry import LayerContext, get_method

SPEC = get_method("dare")


def _deltas() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 5, 10, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_expectation_over_seeds_is_the_undropped_update(p: float) -> None:
    d = _deltas()
    n_seeds = 4000
    opts = SPEC.parse({"p": p, "combine": "task_arithmetic"})
    acc = torch.zeros(d.shape[1:], dtype=torch.float64)
    kept = 0
    for seed in range(n_seeds):
        out = SPEC.fn(d[:1], opts, LayerContext(name="w", seed=seed))  # one task: TA returns its dropped Δ
        acc += out
        kept += int((out != 0).sum())
    mean = acc / n_seeds
    # each entry is δ·B/(1−p), B ~ Bernoulli(1−p): mean δ, std |δ|·sqrt(p/(1−p)); z-score of the sample mean
    se = d[0].abs() * np.sqrt(p / (1 - p) / n_seeds)
    z = ((mean - d[0]) / se).abs()
    assert float(z.max()) < 5.0, float(z.max())
    # the fraction of survivors is 1 − p (binomial, 5 standard errors)
    total = n_seeds * d[0].numel()
    assert abs(kept / total - (1 - p)) < 5 * np.sqrt(p * (1 - p) / total)


def test_survivors_are_rescaled_by_one_over_one_minus_p() -> None:
    d = _deltas()
    out = dare_drop(d, 0.75, torch.Generator().manual_seed(0))
    nz = out != 0
    assert 0 < int(nz.sum()) < d.numel()
    torch.testing.assert_close(out[nz], d[nz] * 4.0)


def test_deterministic_given_the_seed() -> None:
    d = _deltas()
    opts = SPEC.parse({})
    a = SPEC.fn(d, opts, LayerContext(name="w", seed=7))
    b = SPEC.fn(d, opts, LayerContext(name="w", seed=7))
    c = SPEC.fn(d, opts, LayerContext(name="w", seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_p_zero_is_task_arithmetic_and_ties() -> None:
    d = torch.tensor([[4.0, -1.0, 0.5, -3.0, 2.0, 0.2],
                      [-2.0, 3.0, 1.0, 3.5, -0.5, 0.3],
                      [1.0, -5.0, 2.0, 6.0, 0.1, -2.5]], dtype=torch.float64)
    ta = SPEC.fn(d, SPEC.parse({"p": 0.0}), LayerContext(name="w"))
    torch.testing.assert_close(ta, torch.tensor([3.0, -3.0, 3.5, 6.5, 1.6, -2.0], dtype=torch.float64))
    # DARE-TIES with nothing dropped and TIES trimming 50 %: the hand-worked TIES example of test_ties.py
    ties = SPEC.fn(d, SPEC.parse({"p": 0.0, "combine": "ties", "ties_keep": 0.5}), LayerContext(name="w"))
    torch.testing.assert_close(ties, torch.tensor([4.0, -5.0, 0.0, 4.75, 2.0, -2.5], dtype=torch.float64))


def test_dare_ties_merges_only_surviving_entries() -> None:
    # one task: DARE-TIES (no further trim) is the dropped-and-rescaled update itself
    d = _deltas()[:1]
    ctx = LayerContext(name="w", seed=11)
    out = SPEC.fn(d, SPEC.parse({"combine": "ties"}), ctx)
    ta = SPEC.fn(d, SPEC.parse({"combine": "task_arithmetic"}), ctx)
    torch.testing.assert_close(out, ta)


def test_options_are_validated() -> None:
    with pytest.raises(OptionError, match="p"):
        SPEC.parse({"p": 1.0})
    with pytest.raises(OptionError, match="combine"):
        SPEC.parse({"combine": "mean"})
    assert SPEC.parse({}).p == 0.9


def test_dare_sum_is_the_sum_of_the_same_draws() -> None:
    """The task-arithmetic combination sums task by task; it must use the very draws of ``dare_drop``."""
    from taskmerge.methods.dare import dare_sum

    d = _deltas()
    dropped = dare_drop(d, 0.6, torch.Generator().manual_seed(5))
    torch.testing.assert_close(dare_sum(d, 0.6, torch.Generator().manual_seed(5)), dropped.sum(dim=0))
    manual = torch.stack([torch.where(torch.rand(d.shape[1:], generator=g, dtype=d.dtype) >= 0.6, x / 0.4, 0)
                          for g in [torch.Generator().manual_seed(5)] for x in d])
    torch.testing.assert_close(dropped, manual)
