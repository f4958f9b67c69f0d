"""Consensus merging with TALL masks, on hand-worked examples."""

from __future__ import annotations

import pytest
import torch

from taskmerge.errors import OptionError
from taskmerge.methods.consensus import tall_masks
from taskmerge.registry import LayerContext, get_method

SPEC = get_method("consensus")

D = torch.tensor(
    [
        [2.0, 0.0, 2.0, -1.0, 0.1, 1.0, 3.0],
        [1.0, 3.0, 1.0, 0.0, 0.1, 1.0, 3.0],
        [1.0, 0.0, -1.0, 2.0, -3.0, 1.0, 0.0],
    ],
    dtype=torch.float64,
)
# τ_MTL = Σ Δ = [4, 3, 2, 1, -2.8, 3, 6]; with λ = 0.5, m_t = |Δ_t| > 0.5·|τ − Δ_t|:
#   task 1: 0.5|τ−Δ1| = [1, 1.5, 0, 1, 1.45, 1, 1.5]   vs [2, 0, 2, 1, 0.1, 1, 3] → T F T F F F T
#   task 2: 0.5|τ−Δ2| = [1.5, 0, 0.5, 0.5, 1.45, 1, 1.5] vs [1, 3, 1, 0, 0.1, 1, 3] → F T T F F F T
#   task 3: 0.5|τ−Δ3| = [1.5, 1.5, 1.5, 0.5, 0.1, 1, 3] vs [1, 0, 1, 2, 3, 1, 0]   → F F F T T F F
MASKS = torch.tensor(
    [
        [True, False, True, False, False, False, True],
        [False, True, True, False, False, False, True],
        [False, False, False, True, True, False, False],
    ]
)
# counts [1, 1, 2, 1, 1, 0, 2]


def test_tall_masks_hand_worked() -> None:
    assert torch.equal(tall_masks(D, 0.5), MASKS)


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, [4.0, 3.0, 2.0, 1.0, -2.8, 3.0, 6.0]),
        (1, [4.0, 3.0, 2.0, 1.0, -2.8, 0.0, 6.0]),
        (2, [0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 6.0]),
        (3, [0.0] * 7),
    ],
)
def test_consensus_task_arithmetic_hand_worked(k: int, expected: list[float]) -> None:
    out = SPEC.fn(D, SPEC.parse({"tall_lambda": 0.5, "k": k}), LayerContext(name="w"))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_consensus_ties_hand_worked() -> None:
    # no trim (ties_keep = 1): elected signs of Σ Δ are +,+,+,+,-,+,+; disjoint SUM of agreeing entries:
    #   τ = [2+1+1, 3, 2+1, 2, -3, 3, 3+3] = [4, 3, 3, 2, -3, 3, 6]
    # masks against this τ with λ = 0.5:
    #   task 1: 0.5|τ−Δ1| = [1, 1.5, 0.5, 1.5, 1.55, 1, 1.5] vs |Δ1| → T F T F F F T
    #   task 2: 0.5|τ−Δ2| = [1.5, 0, 1, 1, 1.55, 1, 1.5]     vs |Δ2| → F T F F F F T
    #   task 3: 0.5|τ−Δ3| = [1.5, 1.5, 2, 0, 0, 1, 3]        vs |Δ3| → F F F T T F F
    # counts [1, 1, 1, 1, 1, 0, 2]
    opts = {"tall_lambda": 0.5, "base": "ties", "ties_keep": 1.0}
    out1 = SPEC.fn(D, SPEC.parse({**opts, "k": 1}), LayerContext(name="w"))
    torch.testing.assert_close(out1, torch.tensor([4.0, 3.0, 3.0, 2.0, -3.0, 0.0, 6.0], dtype=torch.float64))
    out2 = SPEC.fn(D, SPEC.parse({**opts, "k": 2}), LayerContext(name="w"))
    torch.testing.assert_close(out2, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0], dtype=torch.float64))


def test_defaults_and_validation() -> None:
    opts = SPEC.parse({})
    assert (opts.tall_lambda, opts.k, opts.base) == (0.4, 2, "task_arithmetic")
    assert SPEC.default_lambda == 0.3
    with pytest.raises(OptionError, match="k"):
        SPEC.parse({"k": -1})
    with pytest.raises(OptionError, match="base"):
        SPEC.parse({"base": "dare"})
