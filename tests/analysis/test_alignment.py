"""AlignMerge diagnostics against brute force: Frobenius projections with explicit m×m / n×n projectors,
Prop. 2 by least squares and by perturbation, the Eq. 4 identity, and the rank-one factorisation of Eq. 20."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.analysis.alignment import (
    cross_influence,
    decompose_merge,
    eta,
    full_coefficient,
    layer_alignment,
    plot_cross_influence,
    plot_sai_curves,
    plot_subspace_overlap,
    proj_coefficient,
    rank_one_alignment,
    sai,
    sai_curves,
    subspace_overlap,
    subspace_projections,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _frob_proj(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.trace(a.T @ b) / torch.trace(b.T @ b))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 1000))
def test_projection_coefficient_of_rank_one_matrices_factorises(m, n, seed):
    """App. B.1, Eq. 20: Proj_{b1 b2ᵀ}(a1 a2ᵀ) = (a1·b1/‖b1‖²)(a2·b2/‖b2‖²)."""
    a1, b1 = _rand(m, seed=seed), _rand(m, seed=seed + 1)
    a2, b2 = _rand(n, seed=seed + 2), _rand(n, seed=seed + 3)
    expected = float((a1 @ b1) / (b1 @ b1) * (a2 @ b2) / (b2 @ b2))
    got = float(proj_coefficient(torch.outer(a1, a2), torch.outer(b1, b2)))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(proj_coefficient(torch.outer(a1, a2), torch.zeros(m, n, dtype=torch.float64))) == 0.0


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 4), m=st.integers(1, 7), n=st.integers(1, 7), seed=st.integers(0, 1000))
def test_prop_2_diagonal_of_ut_delta_v_minimises_the_distance(K, m, n, seed):
    """Prop. 2: for fixed U, V the best diagonal Σ in ‖ΔW_i − U Σ Vᵀ‖_F is diag(UᵀΔW_iV): check against
    least squares on the vectorised rank-one components and against random perturbations."""
    deltas = _rand(K, m, n, seed=seed)
    merged = _rand(m, n, seed=seed + 7)
    u, _, vh = torch.linalg.svd(merged, full_matrices=False)
    s = subspace_projections(deltas, u, vh)
    design = torch.stack([torch.outer(u[:, r], vh[r]).reshape(-1) for r in range(u.shape[1])], dim=1)
    gen = torch.Generator().manual_seed(seed)
    for i in range(K):
        best = torch.linalg.lstsq(design, deltas[i].reshape(-1, 1)).solution[:, 0]
        torch.testing.assert_close(s[i], best, atol=1e-9, rtol=1e-9)
        dist = float((deltas[i] - u @ torch.diag(s[i]) @ vh).norm())
        for _ in range(5):
            other = s[i] + 0.1 * torch.randn(s.shape[1], generator=gen, dtype=torch.float64)
            assert float((deltas[i] - u @ torch.diag(other) @ vh).norm()) >= dist - 1e-12


@pytest.mark.parametrize("merge", ["sum", "scaled", "arbitrary"])
def test_eq_4_decomposition_and_eta(merge):
    deltas = _rand(3, 6, 5, seed=1)
    merged = {"sum": deltas.sum(0), "scaled": 0.3 * deltas.sum(0), "arbitrary": _rand(6, 5, seed=2)}[merge]
    dec = decompose_merge(deltas, merged)
    e = eta(dec)
    # ΔW_merge = Σ_r η^r Σ_i P_col^r ΔW_i P_row^r with explicit projectors
    rebuilt = torch.zeros_like(merged)
    for r in range(dec.sigma.numel()):
        p_col = torch.outer(dec.U[:, r], dec.U[:, r])
        p_row = torch.outer(dec.Vh[r], dec.Vh[r])
        rebuilt += e[r] * sum(p_col @ d @ p_row for d in deltas)
    torch.testing.assert_close(rebuilt, merged, atol=1e-10, rtol=1e-10)
    if merge != "arbitrary":
        torch.testing.assert_close(e, torch.full_like(e, 1.0 if merge == "sum" else 0.3), atol=1e-10, rtol=1e-10)


def _brute_xi(deltas: torch.Tensor, merged: torch.Tensor, reading: str) -> torch.Tensor:
    """Prop. 1 / App. B.2 with explicit m×m and n×n projectors and Frobenius projections."""
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    K, R = deltas.shape[0], sigma.numel()
    xi = torch.zeros(K, K, R, dtype=torch.float64)
    for r in range(R):
        p_col = torch.outer(u[:, r], u[:, r])
        p_row = torch.outer(vh[r], vh[r])
        for i in range(K):
            for j in range(K):
                a_i, a_j = p_col @ deltas[i], p_col @ deltas[j]
                alpha1 = _frob_proj(a_j, a_i)
                w_res = a_j - alpha1 * a_i
                base = (a_i if reading == "A" else deltas[i]) @ p_row
                alpha2 = _frob_proj(w_res @ p_row, base)
                xi[i, j, r] = alpha1 + alpha2
    return xi


def test_cross_influence_matches_the_two_step_projection_in_both_readings():
    deltas = _rand(3, 6, 4, seed=3)
    merged = deltas.sum(0)
    torch.testing.assert_close(cross_influence(deltas, merged), _brute_xi(deltas, merged, "A"), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(cross_influence(deltas, merged, mode="two_step_full"), _brute_xi(deltas, merged, "B"),
                               atol=1e-9, rtol=1e-9)
    wide = _rand(2, 3, 7, seed=4)  # the other branch of subspace_projections
    torch.testing.assert_close(cross_influence(wide, 0.5 * wide.sum(0), mode="two_step_full"),
                               _brute_xi(wide, 0.5 * wide.sum(0), "B"), atol=1e-9, rtol=1e-9)


def test_full_coefficient_is_eq_7_and_reading_a_makes_it_exact():
    deltas = _rand(3, 5, 5, seed=5)
    merged = _rand(5, 5, seed=6)  # any merge: η ≠ 1
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    xi = _brute_xi(deltas, merged, "A")
    dec = decompose_merge(deltas, merged)
    eta_bf = torch.stack([sigma[r] / (u[:, r] @ deltas.sum(0) @ vh[r]) for r in range(5)])
    off_diagonal = xi.sum(1) - torch.diagonal(xi, dim1=0, dim2=1).T  # Σ_{j≠i} ξ_{i,j}^r
    eq7 = eta_bf[None, :] * (off_diagonal + 1)
    coeff = full_coefficient(deltas, merged)
    torch.testing.assert_close(coeff, eq7, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(full_coefficient(deltas, dec=dec, mode="two_step_full"),
                               eta_bf[None, :] * _brute_xi(deltas, merged, "B").sum(1), atol=1e-8, rtol=1e-8)
    # Reading A: σ_r M_r = ξ̃_i^r P_col ΔW_i P_row exactly
    for i in range(3):
        for r in range(5):
            lhs = sigma[r] * torch.outer(u[:, r], vh[r])
            rhs = coeff[i, r] * torch.outer(u[:, r], u[:, r]) @ deltas[i] @ torch.outer(vh[r], vh[r])
            torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=1e-9)


def test_sai():
    deltas = _rand(3, 6, 4, seed=7)
    merged = deltas.sum(0)
    signed = sai(deltas, merged, signed=True)
    torch.testing.assert_close(sai(deltas, merged), signed.abs())
    torch.testing.assert_close(signed, full_coefficient(deltas, merged) - 1)
    single = deltas[:1]
    torch.testing.assert_close(sai(single, single[0]), torch.zeros(1, 4, dtype=torch.float64), atol=1e-10, rtol=0)
    curves = sai_curves(deltas, {"TA": merged, "WA": merged / 3})
    assert set(curves) == {"TA", "WA"} and curves["TA"].shape == (4,)
    # WA divides every singular value by K, so ξ̃ shrinks by K: signed SAI_WA = (ξ̃_TA)/3 − 1
    torch.testing.assert_close(curves["WA"], (full_coefficient(deltas, merged) / 3 - 1).mean(0), atol=1e-10, rtol=0)
    assert sai_curves(deltas, {"TA": merged}, reduce="none")["TA"].shape == (3, 4)


def test_guards_give_finite_numbers_for_degenerate_inputs():
    d = _rand(5, 4, seed=8)
    zero = torch.zeros_like(d)
    cases = [(torch.stack([d, zero]), d), (torch.stack([d, -d]), zero), (torch.stack([zero, zero]), zero)]
    for deltas, merged in cases:
        for mode in ("exact", "two_step_full"):
            assert torch.isfinite(cross_influence(deltas, merged, mode=mode)).all()
            assert torch.isfinite(full_coefficient(deltas, merged, mode=mode)).all()
    row = _rand(2, 1, 6, seed=9)
    assert full_coefficient(row, row.sum(0)).shape == (2, 1)


def test_subspace_overlap_and_rank_one_alignment():
    a, b = _rand(9, 7, seed=10), _rand(9, 7, seed=11)
    h = subspace_overlap(a, b, k=4)
    ua, _, vah = torch.linalg.svd(a, full_matrices=False)
    ub, _, vbh = torch.linalg.svd(b, full_matrices=False)
    score = (ua[:, :4].T @ ub[:, :4]).norm() ** 2 + (vah[:4] @ vbh[:4].T).norm() ** 2
    assert h.shape == (4, 4) and float(h.sum()) == pytest.approx(float(score), rel=1e-9)
    torch.testing.assert_close(torch.diagonal(subspace_overlap(a, a, k=3)), torch.full((3,), 2.0, dtype=torch.float64))
    align = rank_one_alignment(a, b, k=3)
    torch.testing.assert_close(align["left"], (ua[:, :3] * ub[:, :3]).sum(0).abs(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rank_one_alignment(a, a)["both"], torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)


def test_layer_alignment_and_plots(tmp_path):
    tasks = [{"w": _rand(5, 4, seed=s), "b": _rand(4, seed=s)} for s in range(3)]
    merged = {"w": sum(t["w"] for t in tasks), "b": sum(t["b"] for t in tasks)}
    per_layer = layer_alignment(tasks, merged)
    assert set(per_layer) == {"w"}
    layer = per_layer["w"]
    torch.testing.assert_close(layer.eta, torch.ones(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.signed_sai, sai(torch.stack([t["w"] for t in tasks]), merged["w"], signed=True))
    assert layer.mean_abs_sai == pytest.approx(float(layer.signed_sai.abs().mean()))
    deltas = torch.stack([t["w"] for t in tasks])
    paths = [
        plot_cross_influence(cross_influence(deltas, merged["w"])[0, 1], tmp_path / "xi.png", title="task 1 on task 0"),
        plot_sai_curves(sai_curves(deltas, {"TA": merged["w"]}, reduce="none"), tmp_path / "sai" / "curves.png"),
        plot_subspace_overlap(subspace_overlap(deltas[0], deltas[1], k=3), tmp_path / "overlap.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
