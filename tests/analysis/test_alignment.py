"""AlignMerge algebra and diagnostics against brute force: Frobenius projections with explicit m×m / n×n
projectors in both readings and both projection orders, Prop. 2 by least squares and by perturbation, the
Eq. 4 identity, the rank-one factorisation of Eq. 20, and the paper's qualitative claims (Figs. 2, 3, the
gate's range) on synthetic task vectors with shared and private directions."""

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


def _brute_xi(deltas: torch.Tensor, merged: torch.Tensor, reading: str, order: str = "column_first") -> torch.Tensor:
    """Prop. 1 / App. B.2 (Eqs. 22–24) with explicit m×m and n×n projectors and Frobenius projections.

    ``reading="two_step"``: Eq. 23's base ``W_i^r P_row`` is ``ΔW_i P_row``; ``"ratio"``: it is ``P_col ΔW_i P_row``
    (the earlier reading). ``order="row_first"`` projects on the row side first (App. E.2, Fig. 7).
    """
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    K, R = deltas.shape[0], sigma.numel()
    xi = torch.zeros(K, K, R, dtype=torch.float64)
    for r in range(R):
        p_col = torch.outer(u[:, r], u[:, r])
        p_row = torch.outer(vh[r], vh[r])
        for i in range(K):
            for j in range(K):
                if order == "column_first":
                    a_i, a_j = p_col @ deltas[i], p_col @ deltas[j]
                    alpha1 = _frob_proj(a_j, a_i)
                    w_res = a_j - alpha1 * a_i
                    base = (a_i if reading == "ratio" else deltas[i]) @ p_row
                    alpha2 = _frob_proj(w_res @ p_row, base)
                else:
                    b_i, b_j = deltas[i] @ p_row, deltas[j] @ p_row
                    alpha1 = _frob_proj(b_j, b_i)
                    w_res = b_j - alpha1 * b_i
                    base = p_col @ (b_i if reading == "ratio" else deltas[i])
                    alpha2 = _frob_proj(p_col @ w_res, base)
                xi[i, j, r] = alpha1 + alpha2
    return xi


@pytest.mark.parametrize("order", ["column_first", "row_first"])
@pytest.mark.parametrize("reading", ["two_step", "ratio"])
def test_cross_influence_matches_the_two_step_projection(reading, order):
    deltas = _rand(3, 6, 4, seed=3)
    merged = deltas.sum(0)
    torch.testing.assert_close(cross_influence(deltas, merged, mode=reading, order=order),
                               _brute_xi(deltas, merged, reading, order), atol=1e-9, rtol=1e-9)
    wide = _rand(2, 3, 7, seed=4)  # the other branch of subspace_projections, and a merge with η ≠ 1
    torch.testing.assert_close(cross_influence(wide, 0.5 * wide.sum(0), mode=reading, order=order),
                               _brute_xi(wide, 0.5 * wide.sum(0), reading, order), atol=1e-9, rtol=1e-9)


def test_default_is_the_two_step_reading_and_the_ratio_reading_is_s_j_over_s_i():
    deltas = _rand(3, 6, 5, seed=21)
    merged = deltas.sum(0)
    torch.testing.assert_close(cross_influence(deltas, merged), _brute_xi(deltas, merged, "two_step"),
                               atol=1e-9, rtol=1e-9)
    u, _, vh = torch.linalg.svd(merged, full_matrices=False)
    s = torch.stack([torch.diag(u.T @ d @ vh.T) for d in deltas])  # s_i^r = u_rᵀ ΔW_i v_r
    torch.testing.assert_close(cross_influence(deltas, merged, mode="ratio"), s[None] / s[:, None],
                               atol=1e-9, rtol=1e-9)


def test_row_first_is_column_first_of_the_transposed_problem_and_differs_from_it():
    """App. E.2 / Fig. 7: the two orders are the same construction on ΔWᵀ, close but not identical in general
    (they coincide under the ratio reading, where both are s_j/s_i)."""
    deltas = _rand(3, 7, 5, seed=22)
    merged = deltas.sum(0)
    row = cross_influence(deltas, merged, order="row_first")
    col = cross_influence(deltas, merged)
    torch.testing.assert_close(row, cross_influence(deltas.transpose(1, 2), merged.T), atol=1e-9, rtol=1e-9)
    assert not torch.allclose(row, col, atol=1e-3)
    torch.testing.assert_close(cross_influence(deltas, merged, mode="ratio", order="row_first"),
                               cross_influence(deltas, merged, mode="ratio"), atol=0, rtol=0)


@pytest.mark.parametrize("reading", ["two_step", "ratio"])
def test_full_coefficient_is_eq_7(reading):
    deltas = _rand(3, 5, 5, seed=5)
    merged = _rand(5, 5, seed=6)  # any merge: η ≠ 1
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    xi = _brute_xi(deltas, merged, reading)
    eta_bf = torch.stack([sigma[r] / (u[:, r] @ deltas.sum(0) @ vh[r]) for r in range(5)])
    off_diagonal = xi.sum(1) - torch.diagonal(xi, dim1=0, dim2=1).T  # Σ_{j≠i} ξ_{i,j}^r
    eq7 = eta_bf[None, :] * (off_diagonal + 1)
    torch.testing.assert_close(full_coefficient(deltas, merged, mode=reading), eq7, atol=1e-8, rtol=1e-8)
    dec = decompose_merge(deltas, merged)
    torch.testing.assert_close(full_coefficient(deltas, dec=dec, mode=reading, order="row_first"),
                               eta_bf[None, :] * _brute_xi(deltas, merged, reading, "row_first").sum(1),
                               atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_on_a_summed_base_the_full_coefficient_has_a_closed_form_symmetric_in_the_two_orders(scale):
    """For ΔW_merge = c Σ_j ΔW_j, Σ_j a_j = σ v / c (a_k = ΔW_kᵀu, b_k = ΔW_k v), so Eq. 7 sums to
    ξ̃_i = σ s_i (‖a_i‖² + ‖b_i‖² − s_i²) / (‖a_i‖² ‖b_i‖²): symmetric in a and b, hence the same in both
    projection orders, and σ/s_i (the ratio reading) only when ΔW_i has nothing else along u or v."""
    deltas = _rand(4, 7, 5, seed=23)
    merged = scale * deltas.sum(0)
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    a2 = torch.stack([((d.T @ u) ** 2).sum(0) for d in deltas])  # ‖a_i^r‖²
    b2 = torch.stack([((d @ vh.T) ** 2).sum(0) for d in deltas])  # ‖b_i^r‖²
    s = torch.stack([torch.diag(u.T @ d @ vh.T) for d in deltas])
    closed = sigma * s * (a2 + b2 - s**2) / (a2 * b2)
    for order in ("column_first", "row_first"):
        torch.testing.assert_close(full_coefficient(deltas, merged, order=order), closed, atol=1e-9, rtol=1e-9)


def test_the_ratio_reading_makes_eqs_6_and_7_exact_and_the_two_step_one_does_not():
    """resolved.md §AlignMerge 1: under the ratio reading σ_r M_r = ξ̃_i^r P_col ΔW_i P_row holds exactly (the
    paper writes ≈ and a noise term); the two-step reading leaves a residual."""
    deltas = _rand(3, 5, 5, seed=5)
    merged = _rand(5, 5, seed=6)
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    gap = {}
    for reading in ("ratio", "two_step"):
        coeff = full_coefficient(deltas, merged, mode=reading)
        worst = 0.0
        for i in range(3):
            for r in range(5):
                lhs = sigma[r] * torch.outer(u[:, r], vh[r])
                rhs = coeff[i, r] * torch.outer(u[:, r], u[:, r]) @ deltas[i] @ torch.outer(vh[r], vh[r])
                worst = max(worst, float((lhs - rhs).norm() / sigma[r]))
        gap[reading] = worst
    assert gap["ratio"] < 1e-9 and gap["two_step"] > 1e-2


# ------------------------------------------------------------------------------------------------
# The paper's qualitative claims on task vectors of known structure
# ------------------------------------------------------------------------------------------------

T, SHARED, PRIVATE = 8, 2, 6


def _structured_tasks(noise: float, seed: int = 0, m: int = 64, n: int = 64):
    """8 tasks: rank-2 shared directions common to all (coefficients 3, 2 × U(0.8, 1.2) per task), a private
    rank-6 block per task (values 2 … 1 × U(0.8, 1.2), mutually orthogonal to everything else) and i.i.d.
    noise. The merged sum's top 2 components are the shared ones, the next 48 the private ones."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(k: int) -> torch.Tensor:
        return 0.8 + 0.4 * torch.rand(k, generator=gen, dtype=torch.float64)

    cols = SHARED + PRIVATE * T
    u = torch.linalg.qr(torch.randn(m, cols, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, cols, generator=gen, dtype=torch.float64))[0]
    top = torch.tensor([3.0, 2.0], dtype=torch.float64)
    tasks = []
    for t in range(T):
        shared = u[:, :SHARED] @ torch.diag(top * uniform(2)) @ v[:, :SHARED].T
        lo, hi = SHARED + PRIVATE * t, SHARED + PRIVATE * (t + 1)
        private = u[:, lo:hi] @ torch.diag(torch.linspace(2.0, 1.0, PRIVATE, dtype=torch.float64) * uniform(PRIVATE))
        tasks.append(shared + private @ v[:, lo:hi].T + noise * torch.randn(m, n, generator=gen, dtype=torch.float64))
    return torch.stack(tasks)


def test_xi_decays_with_the_component_index():
    """Fig. 2: ξ is large in the top (shared) components and decays with r: mean off-diagonal ξ_{i,j}^r is ≈ 1
    on the shared components, small on the private ones, smaller still (≈ 0) on the noise-only tail."""
    deltas = _structured_tasks(noise=0.01)
    xi = cross_influence(deltas, deltas.sum(0))
    off = ((xi.sum(1) - 1) / (T - 1)).mean(0)  # mean over pairs i ≠ j, per component r
    R = SHARED + PRIVATE * T
    shared, private, tail = off[:SHARED].mean(), off[SHARED:R].mean(), off[R:].mean()
    assert 0.9 < float(shared) < 1.1
    assert float(shared) > 3 * float(private) and float(private) > float(tail) + 0.1


def test_gate_runs_from_one_on_a_private_component_to_t_on_a_shared_one():
    """On a summed base the multi-task gate mean_i ξ̃_i^r is K where every task has the same share of
    component r and 1 where one task owns it (closed form without noise: a_k ∥ a_i on the shared
    components, a_i = 0 for the non-owners of a private one). With noise, the shared gates stay ≈ K and the
    private ones between ≈ 1 and K/4."""
    clean = _structured_tasks(noise=0.0)
    gate = full_coefficient(clean, clean.sum(0)).mean(0)
    R = SHARED + PRIVATE * T
    u, _, vh = torch.linalg.svd(clean.sum(0), full_matrices=False)
    c = torch.stack([torch.diag(u[:, :SHARED].T @ d @ vh[:SHARED].T) for d in clean])  # task i's share c_i^r
    expected_shared = c.sum(0) * (1 / c).mean(0)  # ξ_ij = c_j/c_i: Σ_j c_j · mean_i 1/c_i (AM-HM: ≥ K, = K if equal)
    torch.testing.assert_close(gate[:SHARED], expected_shared, atol=1e-8, rtol=1e-8)
    assert float((expected_shared / T - 1).abs().max()) < 0.05
    torch.testing.assert_close(gate[SHARED:R], torch.ones(R - SHARED, dtype=torch.float64), atol=1e-8, rtol=0)
    noisy = _structured_tasks(noise=0.01)
    gate = full_coefficient(noisy, noisy.sum(0)).mean(0)
    assert float((gate[:SHARED] / T - 1).abs().max()) < 0.1
    assert 1.0 < float(gate[SHARED:R].median()) < T / 4


def test_weight_averaging_signed_sai_is_negative_in_the_bottom_components():
    """Fig. 3: weight averaging (η = 1/K) balances the shared top components (signed SAI ≈ 0) and
    over-suppresses every weaker-aligned component below them (signed SAI < 0)."""
    deltas = _structured_tasks(noise=0.01)
    curve = sai_curves(deltas, {"WA": deltas.mean(0)})["WA"]
    assert float(curve[:SHARED].abs().max()) < 0.1
    assert float(curve[SHARED:].max()) < -0.3


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
        for mode in ("two_step", "ratio"):
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
