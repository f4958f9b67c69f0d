"""The certified top-k SVD (taskmerge.linalg.certified_top_k) and the methods' ``svd: certified`` option."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge import linalg
from taskmerge.merge import merged_task_vector


def _spectrum_matrix(m: int, n: int, sigma: torch.Tensor, noise: float = 0.0, seed: int = 0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U diag(sigma) Vᵀ`` with Haar-random orthonormal U, V, plus ``noise`` · a Gaussian matrix / √max(m, n)."""
    gen = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    a = (u * sigma.double()) @ v.T
    if noise:
        a = a + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / max(m, n) ** 0.5
    return a.to(dtype)


def _reference(a: torch.Tensor, k: int) -> linalg.SVD:
    """The exact top-k in float64 by LAPACK's full SVD (independent of the Gram / iterative routes)."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return linalg.SVD(u[:, :k], s[:k], vh[:k])


def _residuals(a: torch.Tensor, dec: linalg.SVD) -> float:
    """max_i max(‖A v_i − σ_i u_i‖, ‖Aᵀu_i − σ_i v_i‖) / σ₁, in float64."""
    a, u, s, v = a.double(), dec.U.double(), dec.S.double(), dec.Vh.double().T
    r1 = (a @ v - u * s).norm(dim=0)
    r2 = (a.T @ u - v * s).norm(dim=0)
    return float(torch.maximum(r1, r2).max() / s[0])


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(24, 96),
    n=st.integers(24, 96),
    rank=st.integers(1, 10),
    k_frac=st.floats(0.1, 1.0),
    noise=st.sampled_from([0.0, 1e-6, 1e-3]),
    seed=st.integers(0, 2**16),
)
def test_certified_top_k_matches_a_float64_svd_on_low_rank_plus_noise(m, n, rank, k_frac, noise, seed):
    k = max(1, round(k_frac * rank))
    sigma = torch.logspace(0, -1, rank, dtype=torch.float64)  # well separated: σ_{i+1}/σ_i ≥ 0.1^(1/9) ≈ 0.77
    a = _spectrum_matrix(m, n, sigma, noise, seed)
    dec, info = linalg.certified_top_k(a, k, tol=1e-8)
    ref = _reference(a, k)
    assert dec.U.shape == (m, k) and dec.S.shape == (k,) and dec.Vh.shape == (k, n)
    assert float((dec.S - ref.S).abs().max()) <= 1e-4 * float(ref.S[0])
    rec, want = dec.reconstruct(), ref.reconstruct()
    assert float((rec - want).norm() / want.norm()) <= 1e-4
    if info.route == "certified":
        assert _residuals(a, dec) <= 2e-8
        assert info.residual <= 1e-8


def test_float32_fast_decay_converges_at_the_default_tolerance():
    """σ_i = 0.8^i in float32: the iteration converges and the top-k is within 1e-4 of float64 LAPACK."""
    r = 160
    sigma = 0.8 ** torch.arange(r, dtype=torch.float64)
    a = _spectrum_matrix(200, r, sigma, seed=1, dtype=torch.float32)
    k = r // 8
    dec, info = linalg.certified_top_k(a, k)
    assert info.route == "certified" and info.reason == "converged"
    assert _residuals(a, dec) <= 2 * linalg.CERTIFIED_TOL
    ref = _reference(a, k).reconstruct()
    assert float((dec.reconstruct().double() - ref).norm() / ref.norm()) <= 1e-4
    assert dec.U.dtype == torch.float32


def test_float32_power_law_spectrum_is_accurate_on_either_route():
    """σ_i ∝ i^-0.75 (real task vectors' shape: σ_k/σ₁ ≈ 0.1 at k = r/8): the iteration is not affordable within
    the exact route's cost here, and whichever route is taken the top-k is within 1e-4 of float64 LAPACK."""
    r = 160
    sigma = torch.arange(1, r + 1, dtype=torch.float64).pow(-0.75)
    a = _spectrum_matrix(200, r, sigma, seed=1, dtype=torch.float32)
    dec, info = linalg.certified_top_k(a, r // 8)
    assert info.route == "exact" or _residuals(a, dec) <= 2 * linalg.CERTIFIED_TOL
    ref = _reference(a, r // 8).reconstruct()
    assert float((dec.reconstruct().double() - ref).norm() / ref.norm()) <= 1e-4


def test_wide_matrices_and_determinism():
    sigma = torch.logspace(0, -2, 30, dtype=torch.float64)
    a = _spectrum_matrix(200, 800, sigma, 1e-6, seed=2, dtype=torch.float32)
    one, info = linalg.certified_top_k(a, 6, seed=5)
    two, _ = linalg.certified_top_k(a, 6, seed=5)
    assert info.route == "certified" and one.U.shape == (200, 6) and one.Vh.shape == (6, 800)
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    ref = _reference(a, 6).reconstruct()
    assert float((one.reconstruct().double() - ref).norm() / ref.norm()) <= 1e-4


def test_flat_spectrum_with_a_tiny_budget_falls_back_to_the_exact_route(caplog):
    """A Gaussian matrix (Marchenko–Pastur spectrum, no gap at k) cannot be certified in 2 iterations."""
    a = torch.randn(120, 100, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.DEBUG, logger="taskmerge.linalg"):
        dec, info = linalg.certified_top_k(a, 10, max_iter=2)
    assert info.route == "exact" and info.reason in ("budget", "stalled") and info.iterations <= 2
    assert "exact route" in caplog.text
    exact = linalg.truncated_svd(a, 10)
    assert all(torch.equal(x, y) for x, y in zip(dec, exact))


def test_flat_spectrum_stalls_early_instead_of_spending_the_budget():
    a = torch.randn(600, 400, generator=torch.Generator().manual_seed(1))  # an iteration is affordable here
    _, info = linalg.certified_top_k(a, 20)
    assert info.route == "exact" and info.reason == "stalled" and info.iterations <= 5


def test_large_k_uses_the_checked_gram_route_and_ill_conditioned_kept_values_fall_back():
    sigma = torch.logspace(0, -2, 50, dtype=torch.float64)
    a = _spectrum_matrix(80, 50, sigma, seed=3, dtype=torch.float32)
    dec, info = linalg.certified_top_k(a, 40)  # 40 + 8 > 50 / 2: no iteration
    assert (info.route, info.reason) == ("certified", "gram")
    ref = _reference(a, 40).reconstruct()
    assert float((dec.reconstruct().double() - ref).norm() / ref.norm()) <= 1e-5
    # a kept σ at 1e-9 σ₁ next to a zero one: no gap to certify the subspace by → the check fails
    bad = _spectrum_matrix(80, 50, torch.cat([torch.ones(39), torch.tensor([1e-9])]).double(), seed=4)
    _, info = linalg.certified_top_k(bad, 40)
    assert (info.route, info.reason) == ("exact", "gram-residual")


def test_zero_matrix_and_k_zero():
    dec, info = linalg.certified_top_k(torch.zeros(30, 20), 3)
    assert info.route == "exact" and dec.S.shape == (3,) and float(dec.S.abs().max()) == 0.0
    dec, info = linalg.certified_top_k(torch.ones(5, 4), 0)
    assert dec.U.shape == (5, 0) and info.route == "exact"
    with pytest.raises(ValueError, match="route"):
        linalg.truncated_svd(torch.ones(3, 3), 1, "fast")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- methods

def _task_family(tasks: int, m: int, n: int, decay: float = 0.8) -> tuple[dict, list[dict]]:
    """Full-rank matrices with a geometric spectrum (σ_i = decay^i), plus a bias (averaged). With 0.8 the
    per-task top-k of TSV-M, DC-Merge and AlignMerge-O is certified by the iteration within its budget."""
    r = min(m, n)
    sigma = decay ** torch.arange(r, dtype=torch.float64)
    base = {"w": torch.zeros(m, n), "b": torch.zeros(n)}
    models = [{"w": _spectrum_matrix(m, n, sigma, seed=t, dtype=torch.float32),
               "b": torch.randn(n, generator=torch.Generator().manual_seed(100 + t))} for t in range(tasks)]
    return base, models


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.mark.parametrize("method,options,decay", [
    ("tsv_m", {}, 0.8),
    ("iso_cts", {}, 0.9),  # at 0.8 Iso-CTS's common-subspace boundary is beyond float32 (4 tasks: σ_128 ≈
    # 2e-4 σ₁, gap 7 %): the exact route itself was 9e-4 from float64 there, the certified one 3e-4
    ("dc_merge", {}, 0.8),
    ("dc_merge", {"inner": "ta"}, 0.8),
    ("alignmerge_o", {}, 0.8),
    ("knots", {"merge": "ta"}, 0.8),
    ("knots", {}, 0.8),
])
def test_methods_certified_equal_exact(method, options, decay):
    """``svd: certified`` against ``svd: exact`` and against the exact route in float64 (the --reference64 check)."""
    base, models = _task_family(8, 192, 160, decay)
    exact = merged_task_vector(base, models, method, {**options, "svd": "exact"})
    certified = merged_task_vector(base, models, method, {**options, "svd": "certified"})
    ref64 = merged_task_vector(base, models, method, {**options, "svd": "exact"}, compute_dtype="float64")
    for name, want in exact.items():
        assert _rel(certified[name], want) <= 1e-4, name
        assert _rel(certified[name], ref64[name]) <= 1e-4, name


@pytest.mark.parametrize("k,reason", [(160 // 8, "converged"), (4, "converged"), (90, "gram")])
def test_the_methods_top_k_take_the_certified_routes(k, reason):
    """The inputs above exercise the certified routes, not only the fall-back: TSV-M's / DC-Merge's per-task
    top-20 (decay 0.8), Iso-CTS's per-task top-4 (0.9) and, for a large k, the checked Gram route."""
    _, models = _task_family(8, 192, 160, 0.8 if k == 20 else 0.9)
    _, info = linalg.certified_top_k(models[0]["w"], k)
    assert (info.route, info.reason) == ("certified", reason)


def test_quarter_width_top_k_of_a_square_matrix_goes_straight_to_the_exact_route():
    """TSV-M with T = 4 on a square weight keeps k = n/4, so the block is n/2: an iteration (two products, two
    QRs, an l × l SVD in float64) costs about as much as the whole Gram route, and three of them before a
    stall cost ~3.6× the exact route (measured on LLaMA's 2048² q_proj). No iteration is run."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(7))
    dec, info = linalg.certified_top_k(a, 64)
    assert (info.route, info.reason, info.iterations) == ("exact", "cost", 0)
    assert all(torch.equal(x, y) for x, y in zip(dec, linalg.truncated_svd(a, 64)))
