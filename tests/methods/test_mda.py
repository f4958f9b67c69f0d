"""MDA-TA and the simplex ETF against independent computations: the ETF's defining Gram identity and
P_ETF's spectrum, a TSV-M reference written with torch.linalg.svd and the registry's TSV-M, the energy a
random ETF subspace keeps (App. B.2.2), closed forms of structured inputs, sign-flip invariance and
degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge import linalg
from taskmerge.errors import OptionError
from taskmerge.etf import (
    etf_branch,
    etf_projector,
    helmert_basis,
    low_rank_projector,
    orthogonal_projector,
    simplex_etf,
)
from taskmerge.merge import merged_task_vector
from taskmerge.registry import LayerContext, get_method

CTX = LayerContext(name="blocks.0.mlp.fc.weight")
SPEC = get_method("mda_ta")
TSV_M = get_method("tsv_m")


def _rand(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mda(deltas: torch.Tensor, ctx: LayerContext = CTX, **options) -> torch.Tensor:
    return SPEC.fn(deltas, SPEC.parse(options), ctx)


def _ref_polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _ref_tsv(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """TSV-M (Gargiulo et al., Eqs. 5-8) from full SVDs, float64."""
    us, ss, vs = [], [], []
    for d in deltas.double():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    return _ref_polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _ref_polar(torch.cat(vs, 1)).T


def _etf_gram_by_hand(c: int) -> torch.Tensor:
    g = torch.full((c, c), -1.0 / (c - 1), dtype=torch.float64)
    g.fill_diagonal_(1.0)
    return g


# ------------------------------------------------------------------------------------------------
# The simplex ETF (taskmerge.etf)
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(c=st.integers(2, 24), extra=st.integers(-1, 12), seed=st.integers(0, 5))
def test_etf_gram_is_one_on_the_diagonal_and_minus_one_over_c_minus_one_off_it(c, extra, seed):
    d = c + extra  # d >= C - 1: both branches produce a true simplex ETF
    w = simplex_etf(c, d, seed=seed)
    assert w.shape == (c, d)
    torch.testing.assert_close(w @ w.T, _etf_gram_by_hand(c), atol=1e-12, rtol=0)
    assert float((w * w).sum()) == pytest.approx(c)
    assert torch.allclose(w.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-12)  # centred frame


@settings(max_examples=40, deadline=None)
@given(c=st.integers(2, 20), d=st.integers(1, 30), seed=st.integers(0, 3))
def test_p_etf_is_wt_w_with_eigenvalues_c_over_c_minus_one(c, d, seed):
    w = simplex_etf(c, d, seed=seed)
    proj = etf_projector(d, c, seed=seed)
    p = proj.matrix()
    torch.testing.assert_close(p, w.T @ w, atol=1e-12, rtol=0)
    eig = torch.linalg.eigvalsh(p).flip(0)
    rank = min(c - 1, d)
    torch.testing.assert_close(eig[:rank], torch.full((rank,), c / (c - 1), dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.allclose(eig[rank:], torch.zeros(d - rank, dtype=torch.float64), atol=1e-10)
    assert proj.rank == rank
    assert proj.is_scalar == (d <= c - 1)


def test_svd_branch_is_an_exact_rescaling_and_the_branch_switches_at_d_equal_c():
    assert etf_branch(9, 10) == "svd" and etf_branch(10, 10) == "qr"
    p = etf_projector(5, 12).matrix()
    torch.testing.assert_close(p, torch.eye(5, dtype=torch.float64) * 12 / 11, atol=1e-15, rtol=0)


def test_helmert_basis_spans_the_orthogonal_complement_of_ones():
    h = helmert_basis(7)
    torch.testing.assert_close(h.T @ h, torch.eye(6, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(7, dtype=torch.float64) - 1 / 7, atol=1e-14, rtol=0)


def test_etf_is_deterministic_and_seeded():
    torch.testing.assert_close(simplex_etf(5, 9, seed=3), simplex_etf(5, 9, seed=3), atol=0, rtol=0)
    assert not torch.allclose(simplex_etf(5, 9, seed=3), simplex_etf(5, 9, seed=4))
    with pytest.raises(ValueError):
        simplex_etf(1, 4)


@pytest.mark.parametrize("c", [3, 10])
def test_orthogonal_and_low_rank_targets_are_projectors_of_the_stated_rank(c):
    d = 8
    for proj, rank in [(orthogonal_projector(d, c), min(c, d)), (low_rank_projector(d, 2), 2)]:
        p = proj.matrix()
        torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
        torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
        assert float(torch.trace(p)) == pytest.approx(rank)


def test_projector_sides_act_on_rows_and_columns():
    proj = etf_projector(6, 4, seed=1)
    p = proj.matrix()
    x = _rand(6, 3, seed=0)
    torch.testing.assert_close(proj.apply(x, "out"), p @ x)
    torch.testing.assert_close(proj.apply(x.T, "in"), x.T @ p)
    with pytest.raises(ValueError):
        proj.apply(x, "in")


def test_paper_identities_for_the_etf_subspace():
    """MDA spec §10.3-10.4: ⟨τ, τP⟩ = C/(C−1)‖τΠ‖² and Pythagoras for Π = (C−1)/C·P."""
    c, d = 5, 9
    p = simplex_etf(c, d).T @ simplex_etf(c, d)
    pi = p * (c - 1) / c
    tau = _rand(4, d, seed=2)
    assert float((tau * (tau @ p)).sum()) == pytest.approx(c / (c - 1) * float((tau @ pi).norm() ** 2))
    eye = torch.eye(d, dtype=torch.float64)
    assert float(tau.norm() ** 2) == pytest.approx(float((tau @ pi).norm() ** 2 + (tau @ (eye - pi)).norm() ** 2))


# ------------------------------------------------------------------------------------------------
# MDA-TA
# ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 4), m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 1000))
def test_without_projection_mda_is_tsv_m(T, m, n, seed):
    deltas = _rand(T, m, n, seed=seed)
    k = max(1, min(m, n) // T)
    torch.testing.assert_close(_mda(deltas, projection="none"), _ref_tsv(deltas, k), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("size", ["table", "literal"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_with_c_minus_one_at_least_d_mda_is_tsv_m_times_c_over_c_minus_one(shape, size):
    deltas = _rand(3, *shape, seed=1)
    ref = _ref_tsv(deltas, min(shape) // 3)
    classes = [4, 3, 5]  # C = 12 > every side: both readings take C = 12
    for side in ("out", "in"):
        out = _mda(deltas, num_classes=classes, etf_side=side, etf_size=size)
        torch.testing.assert_close(out, ref * 12 / 11, atol=1e-9, rtol=1e-9)


# The two ETF sizes (resolved readings, MDA §2)


def _tsv_m(deltas: torch.Tensor, ctx: LayerContext = CTX) -> torch.Tensor:
    return TSV_M.fn(deltas, TSV_M.parse({}), ctx)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("num_classes", [None, 5, 70])  # C unknown, C < d + 1, C > d + 1
@pytest.mark.parametrize("T, shape", [(2, (12, 9)), (3, (9, 12)), (3, (10, 10))])
def test_table_is_tsv_m_times_c_over_c_minus_one(T, shape, num_classes, side):
    """``etf_size="table"``: C_eff = max(ΣC_t, d + 1) with d the projected side, P_ETF = C_eff/(C_eff−1)·I, so
    MDA-TA is the registry's TSV-M (its own code path) times that scalar, and the closed form TSV-M of
    ``_ref_tsv`` (full SVDs) times it."""
    deltas = _rand(T, *shape, seed=20 + T)
    d = shape[0] if side == "out" else shape[1]
    c = max(num_classes or 0, d + 1)
    out = _mda(deltas, num_classes=num_classes, etf_side=side)
    torch.testing.assert_close(out, _tsv_m(deltas) * c / (c - 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, _ref_tsv(deltas, min(shape) // T) * c / (c - 1), atol=1e-6, rtol=0)


def test_table_through_the_engine_is_tsv_m_scaled_per_tensor():
    """Whole state dicts: every matrix is TSV-M's update times C/(C−1) of its own width; the rest is averaged
    by both methods."""
    g = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(8, 24, generator=g),
            "a.bias": torch.randn(16, generator=g)}
    tasks = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    classes = [5, 7, 6]  # C = 18: C_eff = max(18, 9) = 18 for the 8-wide input side, 25 for the 24-wide one
    mda = merged_task_vector(base, tasks, "mda_ta", {"num_classes": classes}, compute_dtype="float64")
    tsv = merged_task_vector(base, tasks, "tsv_m", compute_dtype="float64")
    torch.testing.assert_close(mda["a.weight"], tsv["a.weight"] * 18 / 17, atol=1e-6, rtol=0)
    torch.testing.assert_close(mda["b.weight"], tsv["b.weight"] * 25 / 24, atol=1e-6, rtol=0)
    torch.testing.assert_close(mda["a.bias"], tsv["a.bias"], atol=1e-12, rtol=0)


def _kept_energy(out: torch.Tensor, shared: torch.Tensor, c: int) -> float:
    """‖τ_share Π_S‖² / ‖τ_share‖², with τ_share Π_S = (C−1)/C · τ_etf (App. B.2.2)."""
    return float(((out * (c - 1) / c).norm() / shared.norm()) ** 2)


@pytest.mark.parametrize("T", [1, 3])
def test_literal_keeps_c_minus_one_over_d_of_a_random_update(T):
    """``etf_size="literal"`` with C − 1 < d: P_ETF = C/(C−1)·Π_S, Π_S a random (C−1)-dim subspace of the
    d-wide side, so it keeps E‖τΠ_S‖²/‖τ‖² = (C−1)/d of an update independent of the frame (App. B.2.2,
    Eq. 26). Eight frame seeds: each within ±0.08 of (C−1)/d = 0.25, their mean within ±0.03 (the
    fraction's standard deviation is about 0.01–0.02 here)."""
    m, d, c = 48, 96, 25
    deltas = _rand(T, m, d, seed=40 + T)
    shared = deltas[0] if T == 1 else _tsv_m(deltas)  # one task: TSV-M with k = min(m, d) is the update itself
    fractions = []
    for seed in range(8):
        out = _mda(deltas, num_classes=c, etf_size="literal", etf_seed=seed)
        fractions.append(_kept_energy(out, shared, c))
    assert all(abs(f - (c - 1) / d) < 0.08 for f in fractions), fractions
    assert abs(sum(fractions) / len(fractions) - (c - 1) / d) < 0.03, fractions
    # the default ("table") keeps all of it: C_eff = d + 1
    assert _kept_energy(_mda(deltas, num_classes=c), shared, d + 1) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("side", ["out", "in"])
def test_qr_branch_applies_wt_w_on_the_chosen_side(side):
    deltas = _rand(3, 10, 8, seed=2)
    ref = _ref_tsv(deltas, 8 // 3)
    c, seed = 4, 7
    d = 10 if side == "out" else 8
    w = simplex_etf(c, d, seed=seed)
    assert torch.allclose(w @ w.T, _etf_gram_by_hand(c), atol=1e-12)  # W is an ETF, so W^T W is P_ETF
    expected = (w.T @ w) @ ref if side == "out" else ref @ (w.T @ w)
    out = _mda(deltas, num_classes=c, etf_side=side, etf_seed=seed, etf_size="literal")
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


def test_k_fraction_and_k_reference():
    deltas = _rand(2, 10, 20, seed=3)
    close = dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_mda(deltas, projection="none", k_fraction=0.3), _ref_tsv(deltas, 3), **close)
    # "etf_side": k = ⌊d / T⌋ with d the projected side: m = 10 rows ("out") or n = 20 columns ("in")
    out = _mda(deltas, projection="none", k_reference="etf_side", etf_side="out")
    torch.testing.assert_close(out, _ref_tsv(deltas, 5), **close)
    out = _mda(deltas, projection="none", k_reference="etf_side")  # ⌊20/2⌋ = 10 is clamped to min(m, n) = 10
    torch.testing.assert_close(out, _ref_tsv(deltas, 10), **close)
    wide = _rand(2, 20, 6, seed=4)  # ⌊20/2⌋ = 10 is clamped to min(m, n) = 6
    out = _mda(wide, projection="none", k_reference="etf_side", etf_side="out")
    torch.testing.assert_close(out, _ref_tsv(wide, 6), **close)


def test_layer_filters_restrict_the_projection():
    deltas = _rand(2, 8, 8, seed=5)
    plain = _ref_tsv(deltas, 4)
    lit = {"num_classes": 3, "etf_size": "literal"}
    projected = _mda(deltas, **lit)
    assert not torch.allclose(projected, plain, atol=1e-6)
    torch.testing.assert_close(_mda(deltas, **lit, etf_layers=r"attn"), plain, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_mda(deltas, **lit, etf_layers=r"mlp\.fc"), projected, atol=1e-12, rtol=0)
    torch.testing.assert_close(_mda(deltas, **lit, etf_dims=[768]), plain, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_mda(deltas, **lit, etf_dims=[8]), projected, atol=1e-12, rtol=0)


def test_alternative_targets_of_table_15():
    deltas = _rand(2, 8, 6, seed=6)
    plain = _ref_tsv(deltas, 3)
    ortho = orthogonal_projector(6, 3).matrix()  # default side "in": the 6 columns
    out = _mda(deltas, num_classes=3, projection="orthogonal", etf_size="literal")
    torch.testing.assert_close(out, plain @ ortho, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_mda(deltas, num_classes=30, projection="orthogonal"), plain, atol=1e-9, rtol=1e-9)
    # under "table" C_eff = 7 > 6 orthonormal directions cannot exist: the target is the identity
    torch.testing.assert_close(_mda(deltas, num_classes=3, projection="orthogonal"), plain, atol=1e-9, rtol=1e-9)
    low = low_rank_projector(8, 2).matrix()
    out = _mda(deltas, projection="low_rank", etf_side="out")
    torch.testing.assert_close(out, low @ plain, atol=1e-9, rtol=1e-9)


def test_literal_basis_reading_is_the_truncated_left_basis():
    deltas = _rand(3, 9, 5, seed=7)
    out = _mda(deltas, projection="none", shared="basis")
    u_cat = torch.cat([torch.linalg.svd(d, full_matrices=False)[0][:, :1] for d in deltas], 1)  # k = ⌊5/3⌋ = 1
    u_share = torch.linalg.svd(u_cat, full_matrices=False)[0]  # 9 × 3, padded with zeros to 5 columns
    torch.testing.assert_close(out[:, 3:], torch.zeros(9, 2, dtype=torch.float64))
    torch.testing.assert_close(out[:, :3] @ out[:, :3].T, u_share @ u_share.T, atol=1e-9, rtol=0)


def test_option_errors():
    deltas = _rand(2, 4, 4, seed=0)
    with pytest.raises(OptionError, match="num_classes.*etf_size='literal'"):
        _mda(deltas, etf_size="literal")
    torch.testing.assert_close(_mda(deltas), _ref_tsv(deltas, 2) * 5 / 4, atol=1e-9, rtol=0)  # table: C_eff = d + 1
    for size in ("table", "literal"):
        with pytest.raises(OptionError, match="2 tasks"):
            _mda(deltas, num_classes=[3, 4, 5], etf_size=size)
    bads = ({"num_classes": 1}, {"num_classes": [0, 3]}, {"k_fraction": 0}, {"etf_layers": "("}, {"shared": "x"},
            {"etf_size": "paper"}, {"etf_seed": -1}, {"low_rank_fraction": 1.5})
    for bad in bads:
        with pytest.raises(OptionError):
            SPEC.parse(bad)


def test_registry_entry_follows_tsv_m_protocol_and_documents_every_option():
    assert SPEC.matrix_only and SPEC.default_lambda == 1.0
    assert SPEC.lambda_grid == tuple(round(0.1 * i, 1) for i in range(1, 31))  # 0.1, 0.2, ..., 3.0
    assert "TSV-M" in SPEC.summary and "C/(C−1)" in SPEC.summary
    assert SPEC.parse({}).etf_size == "table"
    for name, field in SPEC.options.model_fields.items():
        assert field.description, f"option {name} has no description"


# ------------------------------------------------------------------------------------------------
# Degenerate inputs and invariances
# ------------------------------------------------------------------------------------------------


def _truncate(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_single_task_gives_the_task_update_scaled_by_the_etf():
    d = _rand(1, 6, 4, seed=8)
    torch.testing.assert_close(_mda(d, num_classes=9), d[0] * 9 / 8, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("projection, scale", [("none", 1.0), ("etf", 6 / 5)])
def test_identical_tasks_merge_to_the_task_truncation(projection, scale):
    """T identical tasks: the concatenated bases [U_k … U_k] are rank-deficient; their partial-isometry polar
    factor is U_k·1ᵀ/√T (Σ and V alike), so TSV-M gives (1/T)·Σ_t U_k Σ_k V_kᵀ = the task's rank-k truncation,
    with nothing outside span(U_k) × span(V_k). Under "table" (C_eff = 5 + 1) the ETF scales it by 6/5."""
    d = _rand(6, 5, seed=9)
    out = _mda(torch.stack([d, d, d]), projection=projection)
    torch.testing.assert_close(out, scale * _truncate(d, 1), atol=1e-9, rtol=1e-9)


def test_a_zero_task_is_ignored_and_zero_tasks_merge_to_zero():
    d = _rand(6, 5, seed=9)
    with_zero = torch.stack([d, torch.zeros_like(d)])
    torch.testing.assert_close(_mda(with_zero, projection="none"), _truncate(d, 2), atol=1e-9, rtol=1e-9)
    out = _mda(torch.zeros(3, 5, 4, dtype=torch.float64), num_classes=4)
    assert torch.equal(out, torch.zeros(5, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "shape, T, fraction", [((1, 7), 3, None), ((7, 1), 2, None), ((4, 9), 3, 0.9), ((3, 3), 5, None)]
)
def test_rank_budget_beyond_min_dim_and_thin_matrices_are_finite(shape, T, fraction):
    deltas = _rand(T, *shape, seed=10)
    out = _mda(deltas, num_classes=[2] * T, k_fraction=fraction)
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", ["table", "literal"])
def test_float32_matches_float64(size):
    deltas = _rand(3, 12, 9, seed=11)
    out32 = _mda(deltas.float(), num_classes=5, etf_size=size)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _mda(deltas, num_classes=5, etf_size=size), atol=1e-4, rtol=1e-4)


def test_sign_flips_of_singular_pairs_do_not_change_the_merge(monkeypatch):
    deltas = _rand(3, 8, 7, seed=12)
    expected = _mda(deltas, num_classes=4, etf_size="literal")
    original = linalg.truncated_svd
    gen = torch.Generator().manual_seed(0)

    def flipped(matrix, k, *args, **kwargs):
        dec = original(matrix, k, *args, **kwargs)
        sign = torch.where(torch.rand(dec.S.shape, generator=gen) < 0.5, -1.0, 1.0).to(dec.S.dtype)
        return linalg.SVD(dec.U * sign, dec.S, dec.Vh * sign[:, None])

    monkeypatch.setattr(linalg, "truncated_svd", flipped)
    torch.testing.assert_close(_mda(deltas, num_classes=4, etf_size="literal"), expected, atol=1e-9, rtol=1e-9)


def test_engine_merges_matrices_and_averages_the_rest():
    base = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
    tasks = [{"w": _rand(6, 4, seed=s, dtype=torch.float32), "b": torch.full((4,), float(s))} for s in range(3)]
    tau = merged_task_vector(base, tasks, "mda_ta", {"num_classes": [10, 10, 10]})
    stack = torch.stack([t["w"] for t in tasks])
    torch.testing.assert_close(tau["w"], _mda(stack, LayerContext("w"), num_classes=[10, 10, 10]))
    torch.testing.assert_close(tau["b"], torch.full((4,), 1.0))
    assert math.isclose(SPEC.default_lambda, 1.0)
