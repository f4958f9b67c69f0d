"""AlignMerge-B and AlignMerge-O against independent computations: transcriptions of Eqs. 5, 7, 9 and of the
appendix's Algorithm 1 written with full SVDs and explicit rank-one matrices, closed forms of tasks that
share their singular bases, Prop. 2 by least squares, the norm-preserving factor (App. B.4), sign-flip
invariance, degenerate inputs, and the paper's qualitative claims for -B on synthetic task vectors with shared
and private directions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge import linalg
from taskmerge.errors import OptionError
from taskmerge.merge import merged_task_vector
from taskmerge.methods.alignmerge import PAPER_ALPHA, AlignMergeBOptions, calibrate, resolve_alpha
from taskmerge import registry
from taskmerge.registry import LayerContext, MethodOptions, MethodSpec, get_method, list_methods

CTX = LayerContext(name="blocks.0.attn.out_proj.weight")
B = get_method("alignmerge_b")
O = get_method("alignmerge_o")


# A plain-sum base that does not depend on another module (task_arithmetic is used when registered).
# Test-local methods enter the registry only for the duration of this module / test (monkeypatch), so
# they never show up in other tests' view of the registry.
class _SumOptions(MethodOptions):
    pass


def _sum(deltas, options, ctx):
    return deltas.sum(dim=0)


SUM = "task_arithmetic" if "task_arithmetic" in {spec.name for spec in list_methods()} else "_test_alignmerge_sum"


@pytest.fixture(autouse=True, scope="module")
def _sum_base():
    with pytest.MonkeyPatch.context() as mp:
        if SUM == "_test_alignmerge_sum":
            mp.setitem(registry._REGISTRY, SUM, MethodSpec(SUM, _sum, _SumOptions, paper="test", summary="sum"))
        yield


def _rand(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _b(deltas: torch.Tensor, **options) -> torch.Tensor:
    options.setdefault("base_method", SUM)
    return B.fn(deltas, B.parse(options), CTX)


def _o(deltas: torch.Tensor, **options) -> torch.Tensor:
    return O.fn(deltas, O.parse(options), CTX)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_rand(n, k, seed=seed))[0]


def _polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _partial_polar(x: torch.Tensor) -> torch.Tensor:
    """Polar factor over the numerical rank (the canonical whitening of a rank-deficient basis)."""
    p, d, qh = torch.linalg.svd(x, full_matrices=False)
    r = int((d > 1e-8 * d[0]).sum())
    return p[:, :r] @ qh[:r]


# ------------------------------------------------------------------------------------------------
# AlignMerge-B: independent transcription of Eqs. 4, 5, 7 (App. B.2, Eqs. 22–24) and 9
# ------------------------------------------------------------------------------------------------


def _frob_proj(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (b * b).sum()


def _ref_xi(deltas: torch.Tensor, u: torch.Tensor, v: torch.Tensor, i: int, j: int, reading: str, order: str):
    """ξ_{i,j} in the component u vᵀ: the two Frobenius projections with explicit m×m / n×n projectors."""
    if i == j:
        return torch.tensor(1.0, dtype=torch.float64)
    p_col, p_row = torch.outer(u, u), torch.outer(v, v)
    if reading == "ratio":  # the earlier reading: ξ_{i,j} = s_j / s_i
        return (u @ deltas[j] @ v) / (u @ deltas[i] @ v)
    if order == "column_first":
        a_i, a_j = p_col @ deltas[i], p_col @ deltas[j]
        alpha1 = _frob_proj(a_j, a_i)
        return alpha1 + _frob_proj((a_j - alpha1 * a_i) @ p_row, deltas[i] @ p_row)  # Eq. 23: ΔW_i P_row
    b_i, b_j = deltas[i] @ p_row, deltas[j] @ p_row
    alpha1 = _frob_proj(b_j, b_i)
    return alpha1 + _frob_proj(p_col @ (b_j - alpha1 * b_i), p_col @ deltas[i])


def _ref_b(deltas: torch.Tensor, merged: torch.Tensor, alpha: float, target: int | None = None,
           reading: str = "two_step", order: str = "column_first") -> torch.Tensor:
    deltas, merged = deltas.double(), merged.double()
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    K = deltas.shape[0]
    out = torch.zeros_like(merged)
    for r in range(sigma.numel()):
        eta = sigma[r] / (u[:, r] @ deltas.sum(0) @ vh[r])  # Eq. 4
        coeff = torch.stack([eta * sum(_ref_xi(deltas, u[:, r], vh[r], i, j, reading, order) for j in range(K))
                             for i in range(K)])  # Eq. 7: η (1 + Σ_{j≠i} ξ_{i,j})
        g = coeff.mean() if target is None else coeff[target]
        if g <= 0:
            continue
        value = sigma[r] / g if g >= alpha else sigma[r]
        out += value * torch.outer(u[:, r], vh[r])
    return out


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 4), m=st.integers(1, 8), n=st.integers(1, 8), alpha=st.sampled_from([0.0, 0.6, 1.8, 3.0]),
       reading=st.sampled_from(["two_step", "ratio"]), seed=st.integers(0, 1000))
def test_b_matches_eq_9_on_the_plain_sum(K, m, n, alpha, reading, seed):
    deltas = _rand(K, m, n, seed=seed)
    expected = _ref_b(deltas, deltas.sum(0), alpha, reading=reading)
    torch.testing.assert_close(_b(deltas, alpha=alpha, xi_mode=reading), expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("reading", ["two_step", "ratio"])
def test_b_preference_mode_matches_eq_9_for_the_target_task(reading):
    deltas = _rand(3, 7, 5, seed=1)
    for t in range(3):
        torch.testing.assert_close(_b(deltas, alpha=1.0, target_task=t, xi_mode=reading),
                                   _ref_b(deltas, deltas.sum(0), 1.0, t, reading), atol=1e-9, rtol=1e-9)


def test_b_default_is_the_two_step_xi_checked_against_a_float64_brute_force():
    """The default options (two-step ξ, column first, plain-sum base, α by task count: K = 3 → 3/4) against the
    transcription with explicit projectors, from float32 task vectors."""
    deltas = _rand(3, 9, 6, seed=23, dtype=torch.float32)
    expected = _ref_b(deltas, deltas.double().sum(0), 0.75)
    torch.testing.assert_close(_b(deltas).double(), expected, atol=1e-4, rtol=1e-4)
    assert float((expected - deltas.double().sum(0)).norm()) > 0.1  # the gate acted


@pytest.mark.parametrize("order", ["column_first", "row_first"])
def test_calibrate_on_any_merge_in_both_projection_orders(order):
    """Eq. 9 on a merge that is not the sum (η ≠ 1, Σ_j a_j ≠ σ v), where App. E.2's two orders differ."""
    deltas = _rand(3, 8, 6, seed=24)
    merged = deltas.sum(0) + 0.5 * _rand(8, 6, seed=25)
    expected = _ref_b(deltas, merged, 0.0, order=order)
    torch.testing.assert_close(calibrate(deltas, merged, alpha=0.0, projection_order=order), expected,
                               atol=1e-9, rtol=1e-9)
    other = _ref_b(deltas, merged, 0.0, order="row_first" if order == "column_first" else "column_first")
    assert float((other - expected).norm()) > 1e-3 * float(expected.norm())


def _shared_basis_tasks(values: torch.Tensor, m: int = 7, n: int = 5):
    """Tasks ΔW_i = Q_u diag(values[i]) Q_vᵀ sharing their singular bases."""
    qu, qv = _orthonormal(m, values.shape[1], 2), _orthonormal(n, values.shape[1], 3)
    return torch.stack([qu @ torch.diag(v) @ qv.T for v in values]), qu, qv


@pytest.mark.parametrize("reading", ["ratio", "two_step"])
def test_b_divides_aligned_components_to_the_harmonic_mean_of_the_task_projections(reading):
    """Tasks sharing their singular bases: every a_k = ΔW_kᵀu_r is parallel, so the two-step ξ is s_j/s_i too
    and both readings give ξ̃_i^r = σ_r / s_i^r."""
    values = torch.tensor([[5.0, 2.0, 1.0], [4.0, 3.0, 0.5], [6.0, 1.0, 2.0]], dtype=torch.float64)
    deltas, qu, qv = _shared_basis_tasks(values)
    harmonic = 3 / (1 / values).sum(0)
    torch.testing.assert_close(_b(deltas, alpha=0.0, xi_mode=reading), qu @ torch.diag(harmonic) @ qv.T,
                               atol=1e-10, rtol=1e-10)
    # All contributions positive: g = σ·mean(1/s) >= K by AM-HM, so α = K still divides everything (under the
    # ratio reading this holds for every summed base: no α <= K acts, resolved.md §AlignMerge 1)...
    torch.testing.assert_close(_b(deltas, alpha=3.0, xi_mode=reading), qu @ torch.diag(harmonic) @ qv.T,
                               atol=1e-10, rtol=1e-10)
    # ...and an α above every g leaves the base merge (the plain sum) untouched.
    torch.testing.assert_close(_b(deltas, alpha=1e6, xi_mode=reading), deltas.sum(0), atol=1e-10, rtol=1e-10)
    # Preference mode with α = 0 returns the target task itself (SAI_t = 0 in every component).
    torch.testing.assert_close(_b(deltas, alpha=0.0, target_task=1, xi_mode=reading), deltas[1],
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reading", ["ratio", "two_step"])
def test_b_drops_components_where_the_tasks_are_non_contributing(reading):
    # component 0: s = (3, -1): Σ = 2 > 0 but mean(1/s) = -1/3 < 0, so g < 0 and the component is removed
    values = torch.tensor([[3.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
    deltas, qu, qv = _shared_basis_tasks(values, 6, 4)
    expected = qu[:, 1:] @ torch.diag(2 / (1 / values[:, 1]).sum(0, keepdim=True)) @ qv[:, 1:].T
    torch.testing.assert_close(_b(deltas, alpha=0.0, xi_mode=reading), expected, atol=1e-10, rtol=1e-10)


def test_b_ratio_preference_mode_reaches_the_prop_2_optimum():
    """Under the ratio reading, α = 0 makes the target's components diag(UᵀΔ_tV), the least-squares optimum over
    diagonals (solved here by lstsq on the vectorised rank-one components); components with s ≤ 0 are removed."""
    deltas = _rand(3, 6, 5, seed=4)
    merged = deltas.sum(0)
    u, _, vh = torch.linalg.svd(merged, full_matrices=False)
    design = torch.stack([torch.outer(u[:, r], vh[r]).reshape(-1) for r in range(5)], dim=1)
    for t in range(3):
        best = torch.linalg.lstsq(design, deltas[t].reshape(-1, 1)).solution[:, 0]
        kept = torch.where(best > 0, best, torch.zeros_like(best))
        out = _b(deltas, alpha=0.0, target_task=t, xi_mode="ratio")
        torch.testing.assert_close(out, u @ torch.diag(kept) @ vh, atol=1e-9, rtol=1e-9)


def test_b_base_scale_and_other_bases():
    deltas = _rand(3, 6, 6, seed=5)
    expected = _ref_b(deltas, 0.3 * deltas.sum(0), 1.8)
    torch.testing.assert_close(_b(deltas, base_scale=0.3, alpha=1.8), expected, atol=1e-9, rtol=1e-9)
    names = {spec.name for spec in list_methods()}
    for base, options in (("tsv_m", {}), ("ties", {"keep": 0.5})):
        if base in names:  # s_i always from the original task vectors, not the base's pruned ones
            spec = get_method(base)
            merged = spec.fn(deltas, spec.parse(options), CTX)
            torch.testing.assert_close(_b(deltas, base_method=base, base_options=options, alpha=1.8),
                                       _ref_b(deltas, merged, 1.8), atol=1e-9, rtol=1e-9)


def test_b_alpha_by_task_count():
    """§5.1 / App. D: α = 0.6 / 1.8 / 2.8 / 6.5 for 2 / 8 / 14 / 20 tasks, else K/4 (§5.3); a given α wins."""
    table = AlignMergeBOptions(base_method=SUM)
    assert [resolve_alpha(table, k) for k in (2, 8, 14, 20, 6)] == [0.6, 1.8, 2.8, 6.5, 1.5]
    assert PAPER_ALPHA == {2: 0.6, 8: 1.8, 14: 2.8, 20: 6.5}
    quarter = AlignMergeBOptions(base_method=SUM, alpha_rule="num_tasks_over_4")
    assert [resolve_alpha(quarter, k) for k in (2, 8, 6)] == [0.5, 2.0, 1.5]
    assert resolve_alpha(AlignMergeBOptions(base_method=SUM, alpha=2.2), 8) == 2.2
    deltas = _rand(6, 5, 5, seed=6)
    torch.testing.assert_close(_b(deltas), _ref_b(deltas, deltas.sum(0), 1.5), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_b(deltas, alpha_rule="num_tasks_over_4"), _ref_b(deltas, deltas.sum(0), 1.5),
                               atol=1e-9, rtol=1e-9)


def test_b_registration_sweeps_alpha_not_lambda():
    """resolved.md §AlignMerge 2: W = W_pre + ΔW̃ with no global λ; α chosen on validation from this grid."""
    assert B.default_lambda == 1.0 and B.lambda_grid == (1.0,)
    assert B.option_grid == ("alpha", (1.0, 1.4, 1.8, 2.2, 3.0))


def test_every_option_is_described_with_its_range():
    for spec in (B, O):
        for name, field in spec.options.model_fields.items():
            assert field.description, f"{spec.name}.{name} has no description"
    bounds = {name: [type(m).__name__ for m in field.metadata] for name, field in B.options.model_fields.items()}
    assert "Gt" in bounds["base_scale"] and "Ge" in bounds["alpha"] and "Ge" in bounds["target_task"]
    assert "Ge" in [type(m).__name__ for m in O.options.model_fields["components_per_task"].metadata]


# The paper's claims for -B on a summed base (resolved.md §AlignMerge 1, 4): 8 tasks with shared rank-2
# directions common to all, a private rank-6 block per task, and noise.

T, SHARED, PRIVATE = 8, 2, 6


def _structured_tasks(noise: float = 0.01, seed: int = 0, m: int = 64, n: int = 64):
    """``(deltas, private)``: the task vectors and, per task, the orthonormal bases ``(U_t, V_t)`` of its
    private block (values 2 … 1 × U(0.8, 1.2)); the shared block has values (3, 2) × U(0.8, 1.2) per task."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(k: int) -> torch.Tensor:
        return 0.8 + 0.4 * torch.rand(k, generator=gen, dtype=torch.float64)

    cols = SHARED + PRIVATE * T
    u = torch.linalg.qr(torch.randn(m, cols, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, cols, generator=gen, dtype=torch.float64))[0]
    top = torch.tensor([3.0, 2.0], dtype=torch.float64)
    tasks, private = [], []
    for t in range(T):
        lo, hi = SHARED + PRIVATE * t, SHARED + PRIVATE * (t + 1)
        values = torch.linspace(2.0, 1.0, PRIVATE, dtype=torch.float64) * uniform(PRIVATE)
        tasks.append(u[:, :SHARED] @ torch.diag(top * uniform(2)) @ v[:, :SHARED].T
                     + u[:, lo:hi] @ torch.diag(values) @ v[:, lo:hi].T
                     + noise * torch.randn(m, n, generator=gen, dtype=torch.float64))
        private.append((u[:, lo:hi], v[:, lo:hi]))
    return torch.stack(tasks), private


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def _private_share(out: torch.Tensor, deltas: torch.Tensor, private) -> list[float]:
    """‖U_tᵀ out V_t‖_F / ‖U_tᵀ ΔW_t V_t‖_F: how much of task t's private block the merge keeps."""
    return [float((u.T @ out @ v).norm() / (u.T @ deltas[t] @ v).norm()) for t, (u, v) in enumerate(private)]


def test_b_on_the_sum_rebalances_keeps_every_private_direction_and_alpha_acts():
    deltas, private = _structured_tasks()
    total = deltas.sum(0)
    out = _b(deltas, alpha=1.8)
    assert _cosine(out, total) < 0.9  # not the sum rescaled: the shared components are divided by ≈ K
    assert min(_private_share(out, deltas, private)) > 0.3  # every task's private block survives
    for r in range(SHARED):  # the shared components end at about one task's share
        u, v = torch.linalg.svd(total)[0][:, r], torch.linalg.svd(total)[2][r]
        mean_share = float(torch.stack([u @ d @ v for d in deltas]).mean())
        assert float(u @ out @ v) == pytest.approx(mean_share, rel=0.1)
    low, high = _b(deltas, alpha=1.4), _b(deltas, alpha=3.0)  # two α between 1 and K
    assert float((low - high).norm()) > 0.1 * float(out.norm())


def test_b_ratio_reading_is_the_sum_divided_by_about_k():
    """resolved.md §AlignMerge 1, the finding behind the change of default: under the ratio reading the output
    has cosine > 0.95 with the plain sum, the private blocks are all but removed, and α in [1, K] barely acts."""
    deltas, private = _structured_tasks()
    out = _b(deltas, alpha=1.8, xi_mode="ratio")
    assert _cosine(out, deltas.sum(0)) > 0.95
    assert max(_private_share(out, deltas, private)) < 0.2
    low, high = _b(deltas, alpha=1.4, xi_mode="ratio"), _b(deltas, alpha=3.0, xi_mode="ratio")
    assert float((low - high).norm()) < 0.05 * float(out.norm())


def test_b_option_errors():
    deltas = _rand(2, 4, 4, seed=0)
    with pytest.raises(OptionError, match="target_task"):
        _b(deltas, target_task=2)
    for bad in ({"base_method": "no_such_method"}, {"base_method": "alignmerge_b"}, {"alpha": -1.0},
                {"base_options": {"no_such_option": 1}}, {"xi_mode": "exact"}, {"projection_order": "diagonal"},
                {"alpha_rule": "fixed"}, {"base_scale": 0.0}, {"eps": 1.0}):
        key, value = next(iter(bad.items()))
        with pytest.raises(OptionError, match=next(iter(value)) if isinstance(value, dict) else key):
            B.parse({"base_method": SUM, **bad} if key != "base_method" else bad)
    assert B.matrix_only


def test_b_delegates_the_base_methods_model_level_statistic(monkeypatch):
    calls: list[tuple[str, object]] = []

    class _Stat:
        def collect(self, name, deltas, options):
            calls.append(("collect", options.factor))
            return float(deltas.abs().max())

        def finalize(self, collected, options):
            calls.append(("finalize", options.factor))
            return max(collected.values()) * options.factor

    class _ScaledOptions(MethodOptions):
        factor: float = 1.0

    def _stat_base(deltas, options, ctx):
        return deltas.sum(0) / ctx.state

    name = "_test_alignmerge_stat_base"
    spec = MethodSpec(name, _stat_base, _ScaledOptions, paper="test", summary="sum / a global statistic",
                      global_statistic=lambda options: _Stat())
    monkeypatch.setitem(registry._REGISTRY, name, spec)

    base = {"w": torch.zeros(5, 4), "v": torch.zeros(3, 3)}
    tasks = [{"w": _rand(5, 4, seed=s, dtype=torch.float32), "v": _rand(3, 3, seed=10 + s, dtype=torch.float32)}
             for s in range(2)]
    tau = merged_task_vector(base, tasks, "alignmerge_b", {"base_method": name, "base_options": {"factor": 2.0},
                                                           "alpha": 1e6})
    peak = max(float(t[k].abs().max()) for t in tasks for k in t) * 2.0
    assert ("finalize", 2.0) in calls and all(factor == 2.0 for _, factor in calls)
    for key in ("w", "v"):
        stack = torch.stack([t[key] for t in tasks])
        torch.testing.assert_close(tau[key], _ref_b(stack.double(), stack.double().sum(0) / peak, 1e6).float(),
                                   atol=1e-5, rtol=1e-5)


def test_b_statistic_forwards_the_layer_context_when_the_base_wants_it(monkeypatch):
    seen = []

    class _CtxStat:
        wants_context = True

        def collect(self, name, deltas, options, ctx):
            seen.append(ctx.name)
            return 1.0

        def finalize(self, collected, options):
            return len(collected)

    name = "_test_alignmerge_ctx_base"
    spec = MethodSpec(name, lambda d, o, c: d.sum(0), _SumOptions, paper="test", summary="sum",
                      global_statistic=lambda options: _CtxStat())
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    stat = B.statistic_for(B.parse({"base_method": name}))
    assert stat.wants_context
    stat.collect("layer.weight", torch.zeros(2, 3, 3), None, LayerContext("layer.weight"))
    assert seen == ["layer.weight"] and stat.finalize({"a": 1.0}, None) == 1
    assert B.statistic_for(B.parse({"base_method": SUM})) is None


# ------------------------------------------------------------------------------------------------
# AlignMerge-O: independent transcription of Algorithm 1 (App.) with explicit rank-one matrices
# ------------------------------------------------------------------------------------------------


def _ref_o_parts(deltas: torch.Tensor, L: int, extract: bool = True, first_task_sign: bool = False):
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    cols: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if extract:
        ref = svds[0][0][:, 0] if first_task_sign else torch.linalg.svd(deltas.sum(0), full_matrices=False)[0][:, 0]
        signs = [1.0 if float(u[:, 0] @ ref) >= 0 else -1.0 for u, _, _ in svds]
        u_top = sum(e * u[:, 0] for e, (u, _, _) in zip(signs, svds))
        v_top = sum(e * vh[0] for e, (_, _, vh) in zip(signs, svds))
        u_top, v_top = u_top / u_top.norm(), v_top / v_top.norm()
        s_top = torch.stack([s[0] for _, s, _ in svds]).mean()
        m_top = s_top * torch.outer(u_top, v_top)
        cols.append((u_top, s_top, v_top))
        for u, s, vh in svds:
            m_i = s[0] * torch.outer(u[:, 0], vh[0])
            m_res = m_i - ((m_i * m_top).sum() / (m_top * m_top).sum()) * m_top  # Eq. 12
            ur, sr, vr = torch.linalg.svd(m_res, full_matrices=False)
            if sr[0] > 1e-8 * s[0]:  # a single task has no residual (√eps, as the method)
                cols.append((ur[:, 0], sr[0], vr[0]))
        start = 1
    else:
        start = 0
    for u, s, vh in svds:
        for r in range(start, L):
            cols.append((u[:, r], s[r], vh[r]))
    u_hat = torch.stack([c[0] for c in cols], 1)
    s_hat = torch.stack([c[1] for c in cols])
    v_hat = torch.stack([c[2] for c in cols], 1)
    # u_top and the residuals all lie in span(u_1¹..u_K¹): Û is rank-deficient, whitened over its rank
    return _partial_polar(u_hat), s_hat, _partial_polar(v_hat)


def _ref_o(deltas, L=None, *, extract=True, divide=True, owner=False, first_task_sign=False):
    K, m, n = deltas.shape
    L = L or max(1, (min(m, n) - 1) // K)
    up, s_hat, vp = _ref_o_parts(deltas, L, extract, first_task_sign)
    if not divide:
        return up @ torch.diag(s_hat) @ vp.T
    if owner:
        proj = torch.stack([torch.diag(up.T @ d @ vp) for d in deltas])
        p = proj.gather(0, proj.abs().argmax(0, keepdim=True))[0]
    else:
        p = torch.diag(up.T @ deltas.sum(0) @ vp)  # σ̂/η (Alg. 1 line 24)
    core = up @ torch.diag(p) @ vp.T
    return core * s_hat.norm() / core.norm()  # Eq. 14 with ‖ΔW̃‖_F = ‖σ̂‖₂ (App. B.4)


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 4), m=st.integers(2, 10), n=st.integers(2, 10), seed=st.integers(0, 1000))
def test_o_matches_algorithm_1(K, m, n, seed):
    deltas = _rand(K, m, n, seed=seed)
    torch.testing.assert_close(_o(deltas), _ref_o(deltas), atol=1e-8, rtol=1e-8)


def test_o_variants_match_the_reference():
    deltas = _rand(3, 11, 9, seed=8)
    torch.testing.assert_close(_o(deltas, eta_reference="owner"), _ref_o(deltas, owner=True), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_o(deltas, sign_reference="first_task"), _ref_o(deltas, first_task_sign=True),
                               atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_o(deltas, extract_aligned=False), _ref_o(deltas, extract=False), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_o(deltas, divide_eta=False), _ref_o(deltas, divide=False), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_o(deltas, components_per_task=2), _ref_o(deltas, 2), atol=1e-9, rtol=1e-9)


def test_o_with_both_ablations_off_is_tsv_m_of_rank_l():
    deltas = _rand(3, 10, 8, seed=9)
    L = 8 // 3
    us = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    tsv = (_polar(torch.cat([u[:, :L] for u, _, _ in us], 1)) @ torch.diag(torch.cat([s[:L] for _, s, _ in us]))
           @ _polar(torch.cat([vh[:L].T for _, _, vh in us], 1)).T)
    out = _o(deltas, extract_aligned=False, divide_eta=False, components_per_task=L)
    torch.testing.assert_close(out, tsv, atol=1e-9, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 4), m=st.integers(2, 9), n=st.integers(2, 9), seed=st.integers(0, 1000))
def test_o_norm_preserving_factor(K, m, n, seed):
    """App. B.4: ‖ΔW̃‖_F = ‖σ̂‖₂ with σ̂ = [σ_top, σ_res,i, σ_i^{2..L}] computed here from scratch."""
    deltas = _rand(K, m, n, seed=seed)
    L = max(1, (min(m, n) - 1) // K)
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    ref = torch.linalg.svd(deltas.sum(0))[0][:, 0]
    signs = [1.0 if float(u[:, 0] @ ref) >= 0 else -1.0 for u, _, _ in svds]
    u_top = sum(e * u[:, 0] for e, (u, _, _) in zip(signs, svds))
    v_top = sum(e * vh[0] for e, (_, _, vh) in zip(signs, svds))
    u_top, v_top = u_top / u_top.norm(), v_top / v_top.norm()
    s_top = sum(float(s[0]) for _, s, _ in svds) / K
    energy = s_top**2
    for u, s, vh in svds:
        m_res = s[0] * (torch.outer(u[:, 0], vh[0]) - (u[:, 0] @ u_top) * (vh[0] @ v_top) * torch.outer(u_top, v_top))
        energy += float(torch.linalg.matrix_norm(m_res, ord=2)) ** 2 + float((s[1:L] ** 2).sum())
    assert float(_o(deltas).norm()) == pytest.approx(energy**0.5, rel=1e-9)


def test_o_norm_factor_is_the_papers_formula_when_the_bases_are_orthonormal():
    """Without extraction the whitened bases have orthonormal columns and Eq. 14's
    c = sqrt(Σσ̂² / Σ(σ̂/η)²) with σ̂/η = diag(U⊥ᵀ ΣΔ V⊥) is what preserves the norm."""
    deltas = _rand(3, 10, 9, seed=19)
    L = (9 - 1) // 3
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    up = _polar(torch.cat([u[:, :L] for u, _, _ in svds], 1))
    vp = _polar(torch.cat([vh[:L].T for _, _, vh in svds], 1))
    s_hat = torch.cat([s[:L] for _, s, _ in svds])
    p = torch.diag(up.T @ deltas.sum(0) @ vp)
    expected = torch.sqrt((s_hat**2).sum() / (p**2).sum()) * up @ torch.diag(p) @ vp.T
    out = _o(deltas, extract_aligned=False)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    assert float(out.norm()) == pytest.approx(float(s_hat.norm()), rel=1e-10)


def test_o_concatenated_basis_is_rank_deficient_by_construction():
    """u_top and every u_res,i lie in span(u_1¹..u_K¹): Û = [u_top, u_res,1..K, …] loses one rank."""
    deltas = _rand(3, 12, 10, seed=20)
    up, _, vp = _ref_o_parts(deltas, 3)
    assert up.shape[1] == 1 + 3 + 3 * 2
    assert torch.linalg.matrix_rank(up) == up.shape[1] - 1 and torch.linalg.matrix_rank(vp) == vp.shape[1] - 1


def test_o_single_task_drops_only_the_last_component():
    d = _rand(1, 6, 5, seed=10)[0]
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    expected = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # L = R − 1 = 4; the residual of a single task is zero
    torch.testing.assert_close(_o(d[None]), expected, atol=1e-9, rtol=1e-9)


def test_o_with_a_zero_task_is_the_norm_corrected_truncation():
    d = _rand(7, 7, seed=11)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    L = (7 - 1) // 2
    s_hat = torch.cat([s[:1] / 2, s[1:L]])  # σ_top is the mean over both tasks; the residuals vanish
    c = s_hat.norm() / s[:L].norm()
    expected = c * u[:, :L] @ torch.diag(s[:L]) @ vh[:L]
    torch.testing.assert_close(_o(torch.stack([d, torch.zeros_like(d)])), expected, atol=1e-9, rtol=1e-9)


def test_o_identical_tasks_closed_form():
    """K identical tasks: the residuals vanish, the top component is extracted once with σ̂/η = Kσ₁, and the
    K copies of u_2..u_L whiten to u_r/√K each (σ̂/η = σ_r per copy), so the merge is
    c (Kσ₁ u₁v₁ᵀ + Σ_{r=2..L} σ_r u_r v_rᵀ) with c = ‖σ̂‖ / ‖that matrix‖, σ̂ = [σ₁, σ_r × K]."""
    d = _rand(8, 7, seed=12)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    K, L = 3, (7 - 1) // 3
    core = K * s[0] * torch.outer(u[:, 0], vh[0]) + u[:, 1:L] @ torch.diag(s[1:L]) @ vh[1:L]
    s_hat = torch.cat([s[:1], s[1:L].repeat(K)])
    expected = core * s_hat.norm() / core.norm()
    torch.testing.assert_close(_o(torch.stack([d] * K)), expected, atol=1e-9, rtol=1e-9)


def test_o_cancelling_tasks_and_zero_tasks_merge_to_zero():
    d = _rand(5, 4, seed=13)
    assert torch.equal(_o(torch.stack([d, -d])), torch.zeros(5, 4, dtype=torch.float64))
    assert torch.equal(_o(torch.zeros(3, 5, 4, dtype=torch.float64)), torch.zeros(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("shape, K, L", [((1, 7), 3, None), ((7, 1), 2, None), ((3, 5), 4, None), ((6, 4), 2, 9)])
def test_o_thin_matrices_and_rank_budget_beyond_min_dim(shape, K, L):
    deltas = _rand(K, *shape, seed=14)
    out = _o(deltas, components_per_task=L)
    assert out.shape == shape and torch.isfinite(out).all()


def test_o_does_not_depend_on_the_task_order_and_float32_matches_float64():
    """The merge is a function of the set of tasks: u_top, σ_top and the sum-based sign reference are symmetric,
    and the polar factor is equivariant to the column order of Û, V̂ (spec §11.8)."""
    deltas = _rand(4, 12, 10, seed=15)
    expected = _o(deltas)
    torch.testing.assert_close(_o(deltas[[2, 0, 3, 1]]), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_o(deltas.float()).double(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Sign-flip invariance of singular pairs, degenerate inputs for B, engine integration
# ------------------------------------------------------------------------------------------------


def _flip_pairs(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    svd, truncated = linalg.svd, linalg.truncated_svd

    def flip(dec: linalg.SVD) -> linalg.SVD:
        sign = torch.where(torch.rand(dec.S.shape, generator=gen) < 0.5, -1.0, 1.0).to(dec.S.dtype)
        return linalg.SVD(dec.U * sign, dec.S, dec.Vh * sign[:, None])

    monkeypatch.setattr(linalg, "svd", lambda matrix: flip(svd(matrix)))
    monkeypatch.setattr(linalg, "truncated_svd", lambda matrix, k, *args, **kw: flip(truncated(matrix, k, *args, **kw)))


def test_sign_flips_of_singular_pairs_do_not_change_either_method(monkeypatch):
    deltas = _rand(3, 9, 7, seed=16)
    def run():
        return {"b": _b(deltas), "b1": _b(deltas, target_task=1, alpha=0.0), "b_ratio": _b(deltas, xi_mode="ratio"),
                "b_row": _b(deltas, projection_order="row_first"), "o": _o(deltas),
                "o_first": _o(deltas, sign_reference="first_task"), "o_owner": _o(deltas, eta_reference="owner")}

    expected = run()
    _flip_pairs(monkeypatch)
    got = run()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-9, rtol=1e-9)


def test_b_degenerate_inputs():
    d = _rand(6, 4, seed=17)
    torch.testing.assert_close(_b(d[None]), d, atol=1e-10, rtol=1e-10)  # ξ̃ = 1 < α: unchanged
    torch.testing.assert_close(_b(torch.stack([d, d, d])), d, atol=1e-10, rtol=1e-10)  # ξ̃ = 3 ≥ α: divided by 3
    torch.testing.assert_close(_b(torch.stack([d, torch.zeros_like(d)]), alpha=0.0), d, atol=1e-10, rtol=1e-10)
    assert torch.equal(_b(torch.zeros(2, 6, 4, dtype=torch.float64)), torch.zeros(6, 4, dtype=torch.float64))
    for shape in [(1, 7), (7, 1), (2, 9)]:
        deltas = _rand(3, *shape, seed=18)
        for alpha in (0.0, 1.8):
            out = _b(deltas, alpha=alpha)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, _ref_b(deltas, deltas.sum(0), alpha), atol=1e-9, rtol=1e-9)
    for reading in ("two_step", "ratio"):
        assert torch.isfinite(_b(torch.stack([d, -d, d]), alpha=0.0, xi_mode=reading)).all()


@pytest.mark.parametrize("method, options", [("alignmerge_b", {"base_method": SUM}), ("alignmerge_o", {})])
def test_engine_merges_matrices_and_averages_the_rest(method, options):
    base = {"w": torch.zeros(6, 5), "b": torch.zeros(5)}
    tasks = [{"w": _rand(6, 5, seed=s, dtype=torch.float32), "b": torch.full((5,), float(s))} for s in range(3)]
    tau = merged_task_vector(base, tasks, method, options)
    spec = get_method(method)
    stack = torch.stack([t["w"] for t in tasks])
    torch.testing.assert_close(tau["w"], spec.fn(stack, spec.parse(options), LayerContext("w")))
    torch.testing.assert_close(tau["b"], torch.full((5,), 1.0))
