"""DC-Merge against independent computations: a numpy transcription of Algorithm 1, a port of the authors'
released code (default keep = 0.001, where the trim removes entries; the 'official' tensor rule), closed
forms of structured inputs, the paper's invariances, and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.errors import OptionError
from taskmerge.methods.dc_merge import (
    DCMergeOptions,
    block_diagonal_mask,
    cover_basis,
    cover_space_merge,
    dc_merge,
    smooth_spectrum,
)
from taskmerge.linalg import LowRank
from taskmerge.registry import LayerContext, get_method
from lowrank_helpers import assert_relatively_close, decomposition_shapes, dense, lora_factors

CTX = LayerContext(name="layer.weight")


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Independent numpy reference (spec §3.2 / §3.3, written with explicit loops)
# ------------------------------------------------------------------------------------------------


def _np_smooth(s: np.ndarray, mode: str, rho: float = 5.0, tau: float = 0.5) -> np.ndarray:
    r = len(s)
    if mode == "none":
        return s.copy()
    avg = np.full(r, s.sum() / r)
    if mode == "average":
        return avg
    if mode == "interpolated":
        return tau * s + (1 - tau) * avg
    assert mode == "linear"
    q = rho if s[-1] <= 0 else min(s[0] / s[-1], rho)
    if r == 1:
        return s.copy()
    w = np.array([(q - (q - 1) * j / (r - 1)) / (r * (q + 1) / 2) for j in range(r)])
    return s.sum() * w


def _np_polar(x: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def _np_ties_keep_all(ms: np.ndarray) -> np.ndarray:
    """TIES without trimming: elect the sign of the sum, average the agreeing non-zero entries."""
    T, a, b = ms.shape
    out = np.zeros((a, b))
    for i in range(a):
        for j in range(b):
            col = ms[:, i, j]
            gamma = np.sign(col.sum())
            agree = [v for v in col if v != 0 and np.sign(v) == gamma]
            out[i, j] = sum(agree) / len(agree) if agree else 0.0
    return out


def _np_dc_merge(deltas, r, mode="none", inner="ta", mask=True, block=None, rho=5.0, tau=0.5, cover=True):
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    T = len(deltas)
    us, vs, smoothed = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        sb = _np_smooth(s[:r], mode, rho, tau)
        us.append(u[:, :r])
        vs.append(vh[:r].T)
        smoothed.append(u[:, :r] @ np.diag(sb) @ vh[:r])
    if not cover:
        stack = np.stack(smoothed)
        return stack.sum(0) if inner == "ta" else _np_ties_keep_all(stack)
    ut = _np_polar(np.concatenate(us, axis=1))
    vt = _np_polar(np.concatenate(vs, axis=1))
    ms = np.stack([ut.T @ d @ vt for d in smoothed])
    merged = ms.sum(0) if inner == "ta" else _np_ties_keep_all(ms)
    k = r * T
    if mask:
        b = block or r
        mk = np.zeros((k, k))
        for i in range(k):
            for j in range(k):
                mk[i, j] = 1.0 if i // b == j // b else 0.0
        merged = merged * mk
    return ut @ merged @ vt.T


def _official_dc_merge(deltas: torch.Tensor, percent: float = 1e-3) -> torch.Tensor:
    """Port of the authors' full fine-tuning DC-Merge for one 2-D tensor (github.com/Tobeginwith/DC-Merge,
    vision_fft_merge/src/utils/DC_utils.py: ``dc_merge``, ``keep_topk_percent``, ``ties_small``), statement by
    statement, in the dtype of ``deltas``: truncation without smoothing, zero-padded stacks of singular vectors,
    cover bases ``u @ vh`` of their SVDs, top-``percent`` trim of each M_i, sign-elected mean, block mask."""
    num_tasks = deltas.shape[0]
    sv_reduction = 1 / num_tasks
    trunc_vecs = []
    for i, vec in enumerate(deltas):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u = torch.zeros_like(u)
            sum_v = torch.zeros_like(v)
        low_rank_per_task = int(s.shape[0] * sv_reduction)
        sum_u[:, i * low_rank_per_task : (i + 1) * low_rank_per_task] = u[:, :low_rank_per_task]
        sum_v[i * low_rank_per_task : (i + 1) * low_rank_per_task, :] = v[:low_rank_per_task, :]
        trunc_vecs.append(u[:, :low_rank_per_task] @ torch.diag(s[:low_rank_per_task]) @ v[:low_rank_per_task, :])
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    cover_space_u = u_u @ v_u
    cover_space_vt = u_v @ v_v
    ms = [torch.linalg.multi_dot((cover_space_u.T, t, cover_space_vt.T)) for t in trunc_vecs]
    filtered = []
    for t in ms:  # keep_topk_percent
        flat_abs = t.abs().view(-1)
        k = max(1, int(percent * flat_abs.numel()))
        threshold = torch.topk(flat_abs, k).values.min()
        filtered.append(t * (t.abs() >= threshold))
    stacked = torch.stack(filtered)  # ties_small
    summed = stacked.sum(dim=0)
    agree = torch.sign(stacked) == torch.sign(summed).unsqueeze(0)
    agg = (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    agg = torch.where(summed == 0, torch.zeros_like(agg), agg)
    mask = torch.zeros_like(agg)
    d_per_task = mask.shape[0] // num_tasks
    for i in range(num_tasks):
        mask[i * d_per_task : (i + 1) * d_per_task, i * d_per_task : (i + 1) * d_per_task] = 1
    return torch.linalg.multi_dot((cover_space_u, agg * mask, cover_space_vt))


# ------------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 4),
    m=st.integers(4, 14),
    n=st.integers(4, 14),
    mode=st.sampled_from(["none", "average", "linear", "interpolated"]),
    seed=st.integers(0, 10_000),
)
def test_full_setting_ta_matches_reference(T: int, m: int, n: int, mode: str, seed: int) -> None:
    deltas = _rand(T, m, n, seed=seed)
    r = min(m, n) // T
    got = dc_merge(deltas, {"inner": "ta", "smoothing": mode, "rho": 3.0, "tau": 0.3}, CTX)
    want = _np_dc_merge(deltas.numpy(), r, mode, "ta", rho=3.0, tau=0.3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 4), seed=st.integers(0, 10_000), mask=st.booleans())
def test_ties_without_trimming_matches_reference(T: int, seed: int, mask: bool) -> None:
    deltas = _rand(T, 12, 9, seed=seed)
    got = dc_merge(deltas, {"inner": "ties", "keep": 1.0, "mask": mask}, CTX)
    want = _np_dc_merge(deltas.numpy(), 9 // T, "none", "ties", mask=mask)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


@pytest.mark.parametrize(
    "T, m, n, keep",
    [
        (4, 80, 64, 0.001),  # k = 64, N = 4096: 4 of 4096 entries of each M_i kept
        (3, 96, 120, 0.001),  # wide; k = 96, N = 9216: 9 kept
        (4, 60, 72, 0.1),  # the 10 % variant: 360 of 3600 kept
    ],
)
def test_default_path_matches_a_port_of_the_official_code(T: int, m: int, n: int, keep: float) -> None:
    # T divides min(m, n) and keep·N has a fractional part below 1/2, where the code's count ⌊keep·N⌋ and
    # ours round(keep·N) agree (module docstring); the trim removes almost every entry.
    deltas = _rand(T, m, n, seed=m + n)
    opts = {} if keep == 0.001 else {"keep": keep}
    got = dc_merge(deltas, opts, CTX)
    want = _official_dc_merge(deltas, keep)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-9 * float(want.abs().max()))
    untrimmed = dc_merge(deltas, {"keep": 1.0}, CTX)
    assert float((untrimmed - got).norm()) > 0.1 * float(untrimmed.norm())  # the trim did change the merge


def test_lora_setting_defaults_match_reference() -> None:
    # Rank-3 LoRA updates B A; setting lora with lora_rank 3 defaults to average smoothing.
    T, m, n, rank = 3, 16, 12, 3
    deltas = torch.stack([_rand(m, rank, seed=i) @ _rand(rank, n, seed=100 + i) for i in range(T)])
    got = dc_merge(deltas, {"setting": "lora", "lora_rank": rank, "inner": "ta"}, CTX)
    want = _np_dc_merge(deltas.numpy(), rank, "average", "ta")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)
    lin = dc_merge(deltas, {"setting": "lora", "lora_rank": rank, "inner": "ta", "smoothing": "linear"}, CTX)
    np.testing.assert_allclose(lin.numpy(), _np_dc_merge(deltas.numpy(), rank, "linear", "ta"), atol=1e-9)


def test_es_alone_merges_smoothed_updates_in_parameter_space() -> None:
    deltas = _rand(3, 10, 8, seed=4)
    opts = {"setting": "lora", "lora_rank": 3, "cover_space": False, "inner": "ta"}
    want = _np_dc_merge(deltas.numpy(), 3, "average", "ta", cover=False)
    np.testing.assert_allclose(dc_merge(deltas, opts, CTX).numpy(), want, atol=1e-10)
    # Without the cover space the constraint r·T ≤ min(m, n) does not apply (3·5 > 8).
    big = dc_merge(deltas, {**opts, "lora_rank": 5}, CTX)
    np.testing.assert_allclose(big.numpy(), _np_dc_merge(deltas.numpy(), 5, "average", "ta", cover=False), atol=1e-10)
    ties = dc_merge(deltas, {**opts, "inner": "ties", "keep": 1.0}, CTX)
    want_ties = _np_dc_merge(deltas.numpy(), 3, "average", "ties", cover=False)
    np.testing.assert_allclose(ties.numpy(), want_ties, atol=1e-10)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_block_size_matches_reference(block: int) -> None:
    deltas = _rand(3, 12, 12, seed=7)
    got = dc_merge(deltas, {"inner": "ta", "block_size": block}, CTX)
    want = _np_dc_merge(deltas.numpy(), 4, "none", "ta", block=block)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


def test_block_ratio_and_large_blocks() -> None:
    deltas = _rand(3, 12, 12, seed=8)
    half = dc_merge(deltas, {"inner": "ta", "block_ratio": 0.5}, CTX)
    np.testing.assert_allclose(half.numpy(), _np_dc_merge(deltas.numpy(), 4, block=2), atol=1e-9)
    whole = dc_merge(deltas, {"inner": "ta", "block_size": 100}, CTX)
    nomask = dc_merge(deltas, {"inner": "ta", "mask": False}, CTX)
    np.testing.assert_allclose(whole.numpy(), nomask.numpy(), atol=1e-12)
    # Without the mask, TA in a complete cover space (k = min(m, n) = m) is the plain sum of the
    # truncated updates: Ũ Ũᵀ = I.
    trunc = sum(_np_dc_merge([d], 4, mask=False) for d in deltas.numpy())
    np.testing.assert_allclose(nomask.numpy(), trunc, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Closed forms of structured inputs
# ------------------------------------------------------------------------------------------------


def _orthogonal_tasks(T: int, r: int, m: int, n: int, seed: int):
    q_u, _ = torch.linalg.qr(_rand(m, T * r, seed=seed))
    q_v, _ = torch.linalg.qr(_rand(n, T * r, seed=seed + 1))
    sig = torch.sort(_rand(T, r, seed=seed + 2).abs() + 0.1, dim=1, descending=True).values
    deltas = torch.stack(
        [(q_u[:, i * r : (i + 1) * r] * sig[i]) @ q_v[:, i * r : (i + 1) * r].T for i in range(T)]
    )
    return deltas, q_u, q_v, sig


@pytest.mark.parametrize("inner", ["ta", "ties"])
def test_tasks_in_orthogonal_subspaces_merge_to_their_sum(inner: str) -> None:
    # Each M_i is diag(σ_i) in its own block and zero elsewhere, so TA and TIES (one non-zero task per
    # entry, all kept since round(keep·k²) = round(0.05·144) = 7 ≥ r) both return Σ Δ_i; averaging replaces
    # σ_i by its mean.
    T, r = 4, 3
    deltas, q_u, q_v, sig = _orthogonal_tasks(T, r, 20, 16, seed=11)
    got = dc_merge(deltas, {"inner": inner, "rank": r, "keep": 0.05}, CTX)
    np.testing.assert_allclose(got.numpy(), deltas.sum(0).numpy(), atol=1e-9)
    avg = dc_merge(deltas, {"inner": inner, "rank": r, "keep": 0.05, "smoothing": "average"}, CTX)
    want = sum(
        sig[i].mean() * q_u[:, i * r : (i + 1) * r] @ q_v[:, i * r : (i + 1) * r].T for i in range(T)
    )
    np.testing.assert_allclose(avg.numpy(), want.numpy(), atol=1e-9)


def test_default_keep_trims_orthogonal_tasks_to_their_top_direction() -> None:
    # keep = 0.001 of k² = 144 entries keeps max(1, round(0.144)) = 1 entry of each M_i = diag(σ_i): its largest,
    # σ_i1, so TIES returns Σ_i σ_i1 u_i1 v_i1ᵀ (the top singular triplet of every task, nothing else).
    T, r = 4, 3
    deltas, q_u, q_v, sig = _orthogonal_tasks(T, r, 20, 16, seed=11)
    got = dc_merge(deltas, {"rank": r}, CTX)
    want = sum(sig[i, 0] * torch.outer(q_u[:, i * r], q_v[:, i * r]) for i in range(T))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-9)


def test_single_task_returns_its_update() -> None:
    delta = _rand(1, 9, 6, seed=3)
    np.testing.assert_allclose(dc_merge(delta, {"inner": "ta"}, CTX).numpy(), delta[0].numpy(), atol=1e-10)
    np.testing.assert_allclose(
        dc_merge(delta, {"inner": "ties", "keep": 1.0}, CTX).numpy(), delta[0].numpy(), atol=1e-10
    )


def test_identical_tasks_are_deterministic_and_finite() -> None:
    # Stacked bases of identical tasks are rank-deficient: the polar factor is the partial isometry
    # U₁(1ᵀ⊗I)/√T, so TA gives the truncated update and TIES (a mean) a T-th of it (module docstring).
    T, m, n = 3, 12, 9
    base = _rand(m, n, seed=5)
    deltas = base.expand(T, m, n).clone()
    r = min(m, n) // T
    u, s, vh = np.linalg.svd(base.numpy(), full_matrices=False)
    trunc = (u[:, :r] * s[:r]) @ vh[:r]
    ta = dc_merge(deltas, {"inner": "ta"}, CTX)
    np.testing.assert_allclose(ta.numpy(), trunc, atol=1e-8)
    ties = dc_merge(deltas, {"inner": "ties", "keep": 1.0}, CTX)
    np.testing.assert_allclose(ties.numpy(), trunc / T, atol=1e-8)
    # Without the mask TA is the sum of the T identical truncated updates.
    np.testing.assert_allclose(dc_merge(deltas, {"inner": "ta", "mask": False}, CTX).numpy(), T * trunc, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Invariances
# ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 4),
    r=st.integers(1, 3),
    extra=st.integers(0, 4),
    flips=st.lists(st.booleans(), min_size=12, max_size=12),
    inner=st.sampled_from(["ta", "ties"]),
    seed=st.integers(0, 10_000),
)
def test_invariant_to_sign_flips_of_singular_pairs(T, r, extra, flips, inner, seed) -> None:
    m, n = T * r + extra, T * r + 1
    U = torch.stack([torch.linalg.qr(_rand(m, r, seed=seed + i))[0] for i in range(T)])
    V = torch.stack([torch.linalg.qr(_rand(n, r, seed=seed + 50 + i))[0] for i in range(T)])
    S = torch.sort(_rand(T, r, seed=seed + 99).abs() + 0.1, dim=1, descending=True).values
    d = torch.tensor([-1.0 if f else 1.0 for f in flips[: T * r]], dtype=torch.float64).reshape(T, 1, r)
    kw = {"inner": inner, "keep": 0.3}
    a = cover_space_merge(U, S, V, **kw)
    b = cover_space_merge(U * d, S, V * d, **kw)  # flip (u^j, v^j) together
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-9)


def test_invariant_to_task_order_and_equivariant_to_scale() -> None:
    deltas = _rand(4, 16, 12, seed=21)
    perm = torch.tensor([2, 0, 3, 1])
    for inner in ("ta", "ties"):
        a = dc_merge(deltas, {"inner": inner}, CTX)
        np.testing.assert_allclose(dc_merge(deltas[perm], {"inner": inner}, CTX).numpy(), a.numpy(), atol=1e-9)
        np.testing.assert_allclose(dc_merge(2.5 * deltas, {"inner": inner}, CTX).numpy(), 2.5 * a.numpy(), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=12),
    mode=st.sampled_from(["none", "average", "linear", "interpolated"]),
    rho=st.floats(1.0, 10.0),
    tau=st.floats(0.0, 1.0),
)
def test_smoothing_keeps_the_sum_and_the_order(values, mode, rho, tau) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    out = smooth_spectrum(s, mode, rho=rho, tau=tau)
    valid = s > 0
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(float(out.sum()), float(s.sum()), rtol=1e-12, atol=1e-12)
    assert (out[:-1] >= out[1:] - 1e-12).all()
    assert (out[~valid] == 0).all()


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=12), rho=st.floats(1.0, 10.0))
def test_linear_smoothing_profile(values, rho) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    out = smooth_spectrum(s, "linear", rho=rho).numpy()
    # Eq. 39: max/min ratio min(σ_max/σ_min, ρ); Eq. 40: linear (constant differences).
    np.testing.assert_allclose(out[0] / out[-1], min(float(s[0] / s[-1]), rho), rtol=1e-9)
    np.testing.assert_allclose(np.diff(out, 2), 0.0, atol=1e-9 * out.max())
    np.testing.assert_allclose(out, _np_smooth(s.numpy(), "linear", rho), rtol=1e-12)


def test_smoothing_special_cases() -> None:
    s = torch.tensor([9.0, 4.0, 1.0, 0.5], dtype=torch.float64)
    avg = smooth_spectrum(s, "average")
    np.testing.assert_allclose(avg.numpy(), np.full(4, 14.5 / 4))
    np.testing.assert_allclose(smooth_spectrum(s, "linear", rho=1.0).numpy(), avg.numpy())  # ρ = 1: average
    np.testing.assert_allclose(smooth_spectrum(s, "interpolated", tau=1.0).numpy(), s.numpy())
    np.testing.assert_allclose(smooth_spectrum(s, "interpolated", tau=0.0).numpy(), avg.numpy())
    # A zero last value: q = ρ (spec §3.2) when the value is kept; with it marked null, the valid
    # prefix [9, 4, 1] is smoothed (ratio 9 capped at 5) and the null entry stays 0.
    z = torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    out = smooth_spectrum(z, "linear", rho=5.0, valid=torch.tensor([True, True, True, False]))
    np.testing.assert_allclose(out.numpy(), np.append(_np_smooth(np.array([9.0, 4.0, 1.0]), "linear", 5.0), 0.0))
    batched = smooth_spectrum(torch.stack([s, 2 * s]), "linear", rho=3.0)
    np.testing.assert_allclose(batched[1].numpy(), 2 * smooth_spectrum(s, "linear", rho=3.0).numpy())


def test_polar_factor_keeps_column_order() -> None:
    x = _rand(10, 4, seed=1)
    basis, overlap = cover_basis(x)
    # Closed form for full column rank: X (XᵀX)^{-1/2} (symmetric orthogonalisation), via numpy eigh.
    w, q = np.linalg.eigh(x.numpy().T @ x.numpy())
    want = x.numpy() @ (q @ np.diag(w**-0.5) @ q.T)
    np.testing.assert_allclose(basis.numpy(), want, atol=1e-10)
    np.testing.assert_allclose(overlap.numpy(), basis.numpy().T @ x.numpy(), atol=1e-10)
    # Column j of the basis follows column j of the input under any permutation.
    perm = [2, 0, 3, 1]
    np.testing.assert_allclose(cover_basis(x[:, perm])[0].numpy(), basis[:, perm].numpy(), atol=1e-10)
    # Orthonormal input is its own polar factor.
    q_, _ = torch.linalg.qr(x)
    np.testing.assert_allclose(cover_basis(q_)[0].numpy(), q_.numpy(), atol=1e-12)
    # Procrustes: no orthonormal matrix is closer to x than the polar factor.
    best = float((basis * x).sum())
    for seed in range(20):
        other = torch.linalg.qr(_rand(10, 4, seed=100 + seed))[0]
        assert float((other * x).sum()) <= best + 1e-12


def test_polar_factor_of_rank_deficient_stack_is_finite() -> None:
    u = torch.linalg.qr(_rand(8, 2, seed=2))[0]
    stack = torch.cat([u, u, torch.zeros(8, 1, dtype=torch.float64)], dim=1)
    basis, overlap = cover_basis(stack)
    assert torch.isfinite(basis).all()
    gram = basis.T @ basis  # a projector: the partial isometry's initial space
    np.testing.assert_allclose((gram @ gram).numpy(), gram.numpy(), atol=1e-12)
    np.testing.assert_allclose(basis[:, :2].numpy(), u.numpy() / math.sqrt(2), atol=1e-12)
    np.testing.assert_allclose(basis[:, 4].numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(overlap.numpy(), basis.numpy().T @ stack.numpy(), atol=1e-12)


def test_block_diagonal_mask_layout() -> None:
    mk = block_diagonal_mask(5, 2, dtype=torch.float64).numpy()
    want = np.array(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=float
    )
    np.testing.assert_array_equal(mk, want)


# ------------------------------------------------------------------------------------------------
# Degenerate inputs
# ------------------------------------------------------------------------------------------------


def test_zero_task_is_dropped() -> None:
    live = _rand(2, 10, 8, seed=9)
    deltas = torch.cat([live[:1], torch.zeros(1, 10, 8, dtype=torch.float64), live[1:]])
    for inner in ("ta", "ties"):
        got = dc_merge(deltas, {"inner": inner}, CTX)
        np.testing.assert_allclose(got.numpy(), dc_merge(live, {"inner": inner}, CTX).numpy(), atol=1e-12)
    kept = dc_merge(deltas, {"inner": "ta", "drop_zero_tasks": False}, CTX)
    assert torch.isfinite(kept).all()
    np.testing.assert_allclose(kept.numpy(), _np_dc_merge(live.numpy(), 8 // 3, "none", "ta"), atol=1e-9)
    zero = dc_merge(torch.zeros(3, 4, 5), {}, CTX)
    assert zero.shape == (4, 5) and zero.dtype == torch.float32 and (zero == 0).all()


def test_rank_times_tasks_above_min_dim() -> None:
    deltas = _rand(3, 10, 12, seed=12)
    clamped = dc_merge(deltas, {"setting": "lora", "lora_rank": 16, "inner": "ta"}, CTX)
    explicit = dc_merge(deltas, {"rank": 3, "smoothing": "average", "inner": "ta"}, CTX)
    np.testing.assert_allclose(clamped.numpy(), explicit.numpy())
    np.testing.assert_allclose(clamped.numpy(), _np_dc_merge(deltas.numpy(), 3, "average", "ta"), atol=1e-9)
    with pytest.raises(OptionError, match="layer.weight"):
        dc_merge(deltas, {"setting": "lora", "lora_rank": 16, "overflow": "error"}, CTX)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (2, 9), (9, 3)])
def test_thin_matrices(shape) -> None:
    m, n = shape
    one = _rand(1, m, n, seed=13)
    np.testing.assert_allclose(dc_merge(one, {"inner": "ta"}, CTX).numpy(), one[0].numpy(), atol=1e-10)
    many = _rand(3, m, n, seed=14)
    out = dc_merge(many, {}, CTX)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    if min(m, n) < 3:  # no room for a cover space: the layer is averaged
        np.testing.assert_allclose(out.numpy(), many.mean(0).numpy(), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 5),
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    zero=st.booleans(),
    duplicate=st.booleans(),
    low_rank=st.booleans(),
    setting=st.sampled_from(["full", "lora"]),
    smoothing=st.sampled_from(["none", "average", "linear", "interpolated"]),
    inner=st.sampled_from(["ta", "ties"]),
    seed=st.integers(0, 10_000),
)
def test_never_nan(T, m, n, zero, duplicate, low_rank, setting, smoothing, inner, seed) -> None:
    deltas = _rand(T, m, n, seed=seed).float()
    if low_rank:
        deltas = deltas[:, :, :1] @ deltas[:, :1, :]
    if duplicate and T > 1:
        deltas[1] = deltas[0]
    if zero:
        deltas[0] = 0
    opts = {"setting": setting, "lora_rank": 2, "smoothing": smoothing, "inner": inner}
    out = dc_merge(deltas, opts, CTX)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_float32_close_to_float64() -> None:
    deltas = _rand(4, 24, 16, seed=15)
    a = dc_merge(deltas, {}, CTX)
    b = dc_merge(deltas.float(), {}, CTX)
    assert b.dtype == torch.float32
    np.testing.assert_allclose(b.double().numpy(), a.numpy(), atol=1e-4 * float(a.abs().max()))


def test_bad_inputs_raise_option_error() -> None:
    with pytest.raises(OptionError):
        dc_merge(torch.zeros(3, 4), {}, CTX)
    with pytest.raises(OptionError):
        dc_merge(torch.full((2, 3, 3), float("nan")), {}, CTX)


# ------------------------------------------------------------------------------------------------
# Registry and options
# ------------------------------------------------------------------------------------------------


def test_registered_with_options() -> None:
    spec = get_method("dc_merge")
    # not matrix_only: the method itself averages what its tensor rule leaves out
    assert not spec.matrix_only and spec.data_free and spec.options is DCMergeOptions
    opts = spec.parse({"setting": "lora"})
    assert opts.resolved_smoothing == "average" and opts.lora_rank == 16 and opts.keep == 0.001
    assert spec.parse({}).resolved_smoothing == "none" and spec.parse({}).tensor_rule == "library"
    for name, field in DCMergeOptions.model_fields.items():
        assert field.description, f"option {name} has no description"
    bads = ({"smoothing": "cubic"}, {"rho": 0.5}, {"keep": 0.0}, {"keep": 1.5}, {"tau": 1.5}, {"rank": 0},
            {"lora_rank": 0}, {"block_ratio": 0.0}, {"null_rtol": -1.0}, {"tensor_rule": "paper"}, {"bogus": 1},
            {"block_size": 2, "block_ratio": 1.0})
    for bad in bads:
        with pytest.raises(OptionError):
            spec.parse(bad)
    with pytest.raises(OptionError):
        dc_merge(_rand(2, 4, 4, seed=0), {"inner": "magic"}, CTX)
    out = spec.fn(_rand(2, 6, 6, seed=0), opts, CTX)
    assert out.shape == (6, 6)


def test_through_the_merge_engine() -> None:
    from taskmerge.merge import merged_task_vector

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(12, generator=g)}
    tasks = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    tau = merged_task_vector(base, tasks, "dc_merge", {"setting": "lora", "lora_rank": 2})
    deltas = torch.stack([t["w"] - base["w"] for t in tasks])
    want = dc_merge(deltas, DCMergeOptions(setting="lora", lora_rank=2), CTX)
    np.testing.assert_allclose(tau["w"].numpy(), want.numpy(), atol=1e-6)
    # Non-matrix tensors are averaged (by the method: tensor_rule).
    mean_b = torch.stack([t["b"] - base["b"] for t in tasks]).mean(0)
    np.testing.assert_allclose(tau["b"].numpy(), mean_b.numpy(), atol=1e-6)


@pytest.mark.parametrize("rule", ["library", "official"])
def test_tensor_rule_on_a_state_dict_with_an_embedding_table(rule: str) -> None:
    """'library': embedding tables and text_projection averaged (the policy's matrix_exclude); 'official':
    every 2-D tensor but text_projection gets the official algorithm (port above), embeddings included.
    Biases are averaged and the task head is kept at the base (absent) under both."""
    from taskmerge.merge import merged_task_vector

    g = torch.Generator().manual_seed(1)
    shapes = {
        "embeddings.word_embeddings.weight": (30, 8),
        "encoder.layer.0.attention.self.query.weight": (8, 8),
        "encoder.layer.0.attention.self.query.bias": (8,),
        "text_projection.weight": (8, 6),
        "classifier.weight": (3, 8),
    }
    base = {k: torch.randn(v, generator=g, dtype=torch.float64) for k, v in shapes.items()}
    tasks = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()} for _ in range(2)]
    tau = merged_task_vector(base, tasks, "dc_merge", {"tensor_rule": rule}, compute_dtype="float64")
    stack = {k: torch.stack([t[k] - base[k] for t in tasks]) for k in shapes}
    assert "classifier.weight" not in tau
    dc_merged = {"encoder.layer.0.attention.self.query.weight"}
    if rule == "official":
        dc_merged.add("embeddings.word_embeddings.weight")
    for name in shapes.keys() - {"classifier.weight"}:
        want = _official_dc_merge(stack[name]) if name in dc_merged else stack[name].mean(0)
        np.testing.assert_allclose(tau[name].numpy(), want.numpy(), atol=1e-9, err_msg=name)
    embedding = stack["embeddings.word_embeddings.weight"]
    assert not torch.allclose(_official_dc_merge(embedding), embedding.mean(0), atol=1e-3)  # the rules differ


# ------------------------------------------------------------------------------------------------
# Low-rank route: per-task SVDs from the LoRA factors (ctx.factors)
# ------------------------------------------------------------------------------------------------


def _with(factors) -> LayerContext:
    return LayerContext(name="layer.weight", factors=factors)


@pytest.mark.parametrize("ranks", [(2, 3, 5), (4, 0, 2)])  # ranks below and above r; a zero task (dropped)
@pytest.mark.parametrize(
    "opts",
    [
        {"setting": "lora", "lora_rank": 4},  # r = 4: padded rank-2/3 tasks, truncated rank-5 task; TIES
        {"setting": "lora", "lora_rank": 4, "inner": "ta", "smoothing": "linear"},
        {"setting": "full"},  # r = ⌊40 / T⌋ > every rank
        {"setting": "full", "inner": "ta", "drop_zero_tasks": False},
        {"setting": "lora", "lora_rank": 3, "cover_space": False, "inner": "ta"},  # ES alone
    ],
)
def test_low_rank_route_equals_dense_route(ranks: tuple[int, ...], opts: dict) -> None:
    factors = lora_factors(48, 40, ranks, seed=31)
    d = dense(factors)
    want = dc_merge(d, opts, CTX)
    assert_relatively_close(dc_merge(d, opts, _with(factors)), want)
    assert torch.equal(dc_merge(d, {**opts, "lowrank": False}, _with(factors)), want)


def test_low_rank_route_through_the_registry_and_wide_matrices() -> None:
    spec = get_method("dc_merge")
    factors = lora_factors(24, 56, (3, 1, 2), seed=32)
    d = dense(factors)
    opts = spec.parse({"setting": "lora", "lora_rank": 3})
    assert_relatively_close(spec.fn(d, opts, _with(factors)), spec.fn(d, opts, CTX))


def test_low_rank_route_zero_and_bad_factors() -> None:
    z = torch.zeros(2, 8, 6, dtype=torch.float64)
    zero = (LowRank(torch.zeros(8, 0, dtype=torch.float64), torch.zeros(0, 6, dtype=torch.float64)),
            LowRank(torch.zeros(8, 2, dtype=torch.float64), _rand(2, 6, seed=1)))  # rank 0; B = 0 (fresh LoRA)
    out = dc_merge(z, {"setting": "lora", "lora_rank": 2}, _with(zero))
    assert torch.equal(out, torch.zeros(8, 6, dtype=torch.float64))
    nan = (LowRank(_rand(8, 2, seed=2), torch.full((2, 6), math.nan, dtype=torch.float64)),) * 2
    with pytest.raises(OptionError):
        dc_merge(z, {}, _with(nan))
    with pytest.raises(OptionError):
        dc_merge(z, {}, _with(zero[:1]))  # one factor for two tasks


def test_low_rank_route_decomposes_no_m_by_n_matrix() -> None:
    factors = lora_factors(300, 250, (2, 3, 4), seed=33)
    d = dense(factors)
    opts = {"setting": "lora", "lora_rank": 4}
    with decomposition_shapes() as shapes:
        low = dc_merge(d, opts, _with(factors))
    assert shapes and max(min(s) for s in shapes) <= 12  # QR of B_t / A_tᵀ, r_t × r_t cores, T·r = 12 cover bases
    with decomposition_shapes() as shapes:
        want = dc_merge(d, opts, CTX)
    assert max(min(s) for s in shapes) == 250
    assert_relatively_close(low, want)
