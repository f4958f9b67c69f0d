"""The factored-matrix helpers of the shared linear algebra (``LowRank`` methods, ``lowrank_sum``,
``numerical_rank``) against dense numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmerge import linalg


def _low_rank(m: int, n: int, r: int, seed: int, scale: float = 1.5) -> linalg.LowRank:
    g = torch.Generator().manual_seed(seed)
    return linalg.LowRank(torch.randn(m, r, generator=g, dtype=torch.float64),
                          torch.randn(r, n, generator=g, dtype=torch.float64), scale)


@pytest.mark.parametrize("m, n, r, k", [(30, 20, 4, None), (20, 30, 4, 2), (6, 5, 9, None), (7, 5, 0, 3)])
def test_low_rank_svd_matches_the_dense_svd(m: int, n: int, r: int, k: int | None) -> None:
    f = _low_rank(m, n, r, seed=1)
    dec = f.svd(k)
    kk = min(r, m, n) if k is None else min(k, r, m, n)
    assert dec.U.shape == (m, kk) and dec.S.shape == (kk,) and dec.Vh.shape == (kk, n)
    s = np.linalg.svd(f.dense().numpy(), compute_uv=False)
    np.testing.assert_allclose(dec.S.numpy(), s[:kk], rtol=1e-10, atol=1e-12)
    if k is None:
        np.testing.assert_allclose(dec.reconstruct().numpy(), f.dense().numpy(), atol=1e-10)


def test_transpose_to_and_norm() -> None:
    f = _low_rank(9, 7, 3, seed=2, scale=-0.7)
    torch.testing.assert_close(f.transpose().dense(), f.dense().T)
    assert f.transpose().shape == (7, 9) and f.transpose().rank == 3
    g = f.to(torch.float32)
    assert g.B.dtype == g.A.dtype == torch.float32 and g.scale == f.scale
    assert f.norm() == pytest.approx(float(np.linalg.norm(f.dense().numpy())), rel=1e-12)
    assert _low_rank(9, 7, 0, seed=3).norm() == 0.0


def test_lowrank_sum_is_the_sum() -> None:
    parts = [_low_rank(8, 6, r, seed=4 + r, scale=0.5 + r) for r in (2, 0, 3)]
    total = linalg.lowrank_sum(parts)
    assert total.rank == 5 and total.shape == (8, 6)
    torch.testing.assert_close(total.dense(), sum(p.dense() for p in parts))
    assert linalg.lowrank_sum(parts, torch.float32).B.dtype == torch.float32
    with pytest.raises(ValueError):
        linalg.lowrank_sum([parts[0], _low_rank(8, 5, 1, seed=9)])
    with pytest.raises(ValueError):
        linalg.lowrank_sum([])


@pytest.mark.parametrize("m, n, r", [(12, 9, 4), (9, 12, 4), (10, 10, 10), (5, 8, 0), (0, 3, 0)])
def test_numerical_rank_matches_numpy(m: int, n: int, r: int) -> None:
    a = _low_rank(m, n, r, seed=5).dense()
    assert linalg.numerical_rank(a) == r
    if m and n:
        assert linalg.numerical_rank(a) == np.linalg.matrix_rank(a.numpy())
        assert linalg.numerical_rank(a.float()) == r
    assert linalg.numerical_rank(torch.zeros(4, 3)) == 0
