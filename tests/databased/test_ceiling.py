"""MOMA's ceiling check (taskmerge.databased.ceiling) against scipy / numpy and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmerge.databased.ceiling import (
    average_ceiling,
    least_squares_map,
    orthogonal_map,
    relative_residual,
    task_ceiling,
)
from taskmerge.databased.loop import LinearHead

D = torch.float64


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=D))
    return q * torch.sign(torch.diagonal(r))


def test_orthogonal_map_is_scipys_procrustes_and_beats_random_orthogonal_maps() -> None:
    from scipy.linalg import orthogonal_procrustes

    gen = torch.Generator().manual_seed(0)
    for n, d in ((40, 3), (30, 6), (50, 8)):
        x = torch.randn(n, d, generator=gen, dtype=D)
        y = x @ _orthogonal(d, gen).T + 0.3 * torch.randn(n, d, generator=gen, dtype=D)
        a = orthogonal_map(x, y)
        ref, _ = orthogonal_procrustes(x.numpy(), y.numpy())  # argmin ‖X R − Y‖ over O(d): R = Aᵀ
        torch.testing.assert_close(a, torch.from_numpy(ref).T, atol=1e-10, rtol=0)
        torch.testing.assert_close(a.T @ a, torch.eye(d, dtype=D), atol=1e-10, rtol=0)
        best = relative_residual(x, y, a)
        assert all(best <= relative_residual(x, y, _orthogonal(d, gen)) + 1e-12 for _ in range(100))


def test_orthogonal_map_recovers_an_exact_rotation_or_reflection() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(25, 5, generator=gen, dtype=D)
    q = _orthogonal(5, gen)
    q[:, 0] = -q[:, 0]  # det −1 is allowed: the map is over O(d)
    torch.testing.assert_close(orthogonal_map(x, x @ q.T), q, atol=1e-10, rtol=0)


def test_orthogonal_map_with_fewer_inputs_than_dimensions_is_still_orthogonal() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 6, generator=gen, dtype=D), torch.randn(3, 6, generator=gen, dtype=D)
    a = orthogonal_map(x, y)
    torch.testing.assert_close(a.T @ a, torch.eye(6, dtype=D), atol=1e-10, rtol=0)
    for _ in range(200):  # still optimal among orthogonal maps
        assert relative_residual(x, y, a) <= relative_residual(x, y, _orthogonal(6, gen)) + 1e-12


def test_least_squares_map_is_numpys_and_solves_the_normal_equations() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 6, generator=gen, dtype=D), torch.randn(40, 6, generator=gen, dtype=D)
    a = least_squares_map(x, y)
    ref = np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)[0].T
    np.testing.assert_allclose(a.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(x.T @ (x @ a.T - y), torch.zeros(6, 6, dtype=D), atol=1e-10, rtol=0)
    assert relative_residual(x, y, a) <= relative_residual(x, y, orthogonal_map(x, y)) + 1e-12


def test_a_rotated_merge_is_fully_recovered_by_the_orthogonal_map() -> None:
    gen = torch.Generator().manual_seed(4)
    d, n = 6, 200
    ft = torch.randn(n, d, generator=gen, dtype=D)
    head = LinearHead(torch.randn(4, d, generator=gen, dtype=D), torch.zeros(4, dtype=D))
    labels = (ft @ head.weight.T).argmax(-1)  # the fine-tuned model is always right
    merged = ft @ _orthogonal(d, gen).T  # the merge's features: the fine-tuned ones, rotated
    out = task_ceiling(merged, ft, merged, ft, labels, head)
    assert out["finetuned"] == 1.0 and out["orthogonal"]["accuracy"] == 1.0 and out["linear"]["accuracy"] == 1.0
    assert out["identity"]["accuracy"] < 0.9
    assert out["orthogonal"]["residual_fit"] < 1e-10
    avg = average_ceiling({"a": out, "b": out})
    assert avg["orthogonal"]["gap_closed"] == pytest.approx(1.0)
    assert avg["identity"]["normalized"] == pytest.approx(out["identity"]["accuracy"])
