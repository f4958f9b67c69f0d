"""The shared linear algebra against independent computations (numpy, closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge import linalg


def _random(m: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(0, 40), seed=st.integers(0, 10_000))
def test_truncated_svd_matches_numpy_top_k(m: int, n: int, k: int, seed: int) -> None:
    a = _random(m, n, seed)
    res = linalg.truncated_svd(a, k)
    kk = min(k, m, n)
    u, s, vh = np.linalg.svd(a.numpy(), full_matrices=False)
    np.testing.assert_allclose(res.S.numpy(), s[:kk], rtol=1e-7, atol=1e-9)
    best = (u[:, :kk] * s[:kk]) @ vh[:kk]
    np.testing.assert_allclose(res.reconstruct().numpy(), best, atol=1e-7)
    assert res.U.shape == (m, kk) and res.Vh.shape == (kk, n)


def test_truncated_svd_gram_route_float32_accuracy() -> None:
    # k well below min(m, n)/2 takes the Gram route: compare with a float64 numpy SVD.
    a = _random(300, 120, 1, torch.float32)
    res = linalg.truncated_svd(a, 10)
    s = np.linalg.svd(a.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(res.S.numpy(), s[:10], rtol=1e-5)
    np.testing.assert_allclose(res.U.T @ res.U, np.eye(10), atol=1e-5)


def test_truncated_svd_large_k_float32_subspace_matches_float64() -> None:
    # Iso-CTS keeps the top 80 % of a power-law spectrum: the float32 input's top-k subspace must match a
    # float64 numpy SVD of the same (float32-representable) matrix to ~1e-6, which a float32 LAPACK SVD
    # misses by ~1e-4..1e-3 on such spectra (eps · σ₁ / gap).
    rng = np.random.default_rng(7)
    m, n = 600, 200
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = torch.from_numpy((u * np.arange(1, n + 1) ** -1.0) @ v.T).float()
    k = int(0.8 * n)
    res = linalg.truncated_svd(a, k)
    ref_u = np.linalg.svd(a.double().numpy(), full_matrices=False)[0][:, :k]
    got = res.U.double().numpy()
    assert np.linalg.norm(got @ got.T - ref_u @ ref_u.T, 2) < 1e-5


def test_truncated_svd_falls_back_on_rank_deficient_input() -> None:
    # rank 3, asked for 5: the trailing values are zero, with no NaN from dividing by them.
    a = _random(50, 3, 2) @ _random(3, 40, 3)
    res = linalg.truncated_svd(a, 5)
    assert torch.isfinite(res.U).all() and torch.isfinite(res.Vh).all()
    np.testing.assert_allclose(res.S[3:].numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(res.reconstruct().numpy(), a.numpy(), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_lowrank_svd_equals_dense_svd(m: int, n: int, r: int, seed: int) -> None:
    b, a = _random(m, r, seed), _random(r, n, seed + 1)
    res = linalg.lowrank_svd(b, a)
    s = np.linalg.svd((b @ a).numpy(), compute_uv=False)
    kk = res.S.shape[0]
    np.testing.assert_allclose(res.S.numpy(), s[:kk], atol=1e-9)
    np.testing.assert_allclose(res.reconstruct().numpy(), (b @ a).numpy(), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 25), n=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_polar_is_the_procrustes_solution(m: int, n: int, seed: int) -> None:
    a = _random(m, n, seed)
    q = linalg.polar(a)
    # orthonormal columns (rows, if wide)
    gram = q.T @ q if m >= n else q @ q.T
    np.testing.assert_allclose(gram.numpy(), np.eye(min(m, n)), atol=1e-10)
    # A = Q H with H = QᵀA symmetric positive semi-definite (the defining property of the polar factor)
    if m >= n:
        h = (q.T @ a).numpy()
        np.testing.assert_allclose(h, h.T, atol=1e-9)
        assert np.linalg.eigvalsh((h + h.T) / 2).min() > -1e-9
        np.testing.assert_allclose((q @ q.T @ a).numpy(), a.numpy(), atol=1e-9)


def test_polar_keeps_column_order_of_orthonormal_input() -> None:
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 5)))
    perm = q[:, [3, 0, 4, 1, 2]]
    np.testing.assert_allclose(linalg.polar(torch.from_numpy(perm)).numpy(), perm, atol=1e-12)


def test_projections() -> None:
    basis = linalg.orthonormal_basis(_random(10, 3, 4))
    x = _random(10, 6, 5)
    p = linalg.project(basis, x)
    np.testing.assert_allclose(linalg.project(basis, p).numpy(), p.numpy(), atol=1e-12)
    np.testing.assert_allclose((basis.T @ linalg.project_out(basis, x)).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose((p + linalg.project_out(basis, x)).numpy(), x.numpy(), atol=1e-12)


def test_svd_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match="2-D"):
        linalg.svd(torch.zeros(3))


@pytest.mark.parametrize("cond", [2.0, 1e2, 1e4])
def test_polar_float32_accuracy_across_conditioning(cond: float) -> None:
    # A = Q diag(s) Wᵀ with known factors: the polar factor is Q Wᵀ exactly.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(60, 20)))
    w, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    s = np.geomspace(1.0, 1.0 / cond, 20)
    a = torch.from_numpy((q * s) @ w.T).float()
    np.testing.assert_allclose(linalg.polar(a).double().numpy(), q @ w.T, atol=2e-5)


@pytest.mark.parametrize("decay", [0.5, 1e-1, 1e-3, 1e-6])
def test_truncated_svd_float32_steep_spectra(decay: float) -> None:
    # known singular values spanning `decay`: every route must return them to float32 accuracy
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.normal(size=(80, 40)))
    v, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    s = np.geomspace(1.0, decay, 40)
    a = torch.from_numpy((u * s) @ v.T).float()
    res = linalg.truncated_svd(a, 10)
    np.testing.assert_allclose(res.S.double().numpy(), s[:10], rtol=1e-4, atol=1e-6)
    best = (u[:, :10] * s[:10]) @ v[:, :10].T
    np.testing.assert_allclose(res.reconstruct().double().numpy(), best, atol=1e-5)
