"""TSV-M: orthonormal bases, per-task reconstruction on orthogonal subspaces, sign invariance, degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskmerge.linalg as linalg
from taskmerge.methods.tsv import tsv_bases, tsv_rank
from taskmerge.registry import LayerContext, get_method
from lowrank_helpers import (
    assert_relatively_close,
    decomposition_shapes,
    dense,
    lora_factors,
    peak_rss_bytes,
    stride_zero_updates,
)

SPEC = get_method("tsv_m")


def _run(d: torch.Tensor, **options) -> torch.Tensor:
    return SPEC.fn(d, SPEC.parse(options), LayerContext(name="w"))


def _numpy_tsv_m(d: np.ndarray, k: int) -> np.ndarray:
    """TSV-M as in the paper's reference code, with numpy: full SVD per task, slice, polar via SVD."""
    us, ss, vhs = [], [], []
    for x in d:
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vhs.append(vh[:k])
    u, s, vh = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vhs, 0)
    pu, _, qu = np.linalg.svd(u, full_matrices=False)
    pv, _, qv = np.linalg.svd(vh, full_matrices=False)
    return (pu @ qu) @ np.diag(s) @ (pv @ qv)


def _random(t: int, m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(t, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rank_rule() -> None:
    assert tsv_rank((768, 768), 8) == 96
    assert tsv_rank((3072, 768), 8) == 96
    assert tsv_rank((768, 768), 14) == 54
    assert tsv_rank((4, 6), 8) == 1  # r < T: at least one triplet per task
    assert tsv_rank((1, 9), 3) == 1
    assert tsv_rank((10, 10), 2, k=7) == 7
    assert tsv_rank((10, 10), 2, fraction=0.5) == 2


@pytest.mark.parametrize("shape", [(3, 12, 9), (4, 8, 20), (2, 16, 16)])
def test_bases_are_orthonormal_and_reconstruct_the_merge(shape: tuple[int, int, int]) -> None:
    d = _random(*shape, seed=1)
    k = tsv_rank(shape[1:], shape[0])
    b = tsv_bases(d, k)
    eye = torch.eye(b.U.shape[1], dtype=torch.float64)
    torch.testing.assert_close(b.U.T @ b.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.Vh @ b.Vh.T, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(_run(d), (b.U * b.S) @ b.Vh)


@pytest.mark.parametrize("shape", [(3, 12, 9), (4, 8, 20), (8, 32, 24)])
def test_matches_a_numpy_reference(shape: tuple[int, int, int]) -> None:
    d = _random(*shape, seed=2)
    k = tsv_rank(shape[1:], shape[0])
    np.testing.assert_allclose(_run(d).numpy(), _numpy_tsv_m(d.numpy(), k), rtol=1e-9, atol=1e-9)


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q


@pytest.mark.parametrize("k", [None, 2])
def test_orthogonal_tasks_merge_to_the_sum_of_their_rank_k_truncations(k: int | None) -> None:
    # three tasks whose column spaces and row spaces are mutually orthogonal (blocks of random
    # orthogonal bases), each of rank 4; TSV-M must return Σ_t (rank-k truncation of Δ_t)
    rng = np.random.default_rng(0)
    t, m, n, rank = 3, 13, 12, 4
    qm, qn = _orthogonal(m, rng), _orthogonal(n, rng)
    d = np.stack([
        qm[:, i * rank:(i + 1) * rank]
        @ np.diag(rng.uniform(1, 5, rank)) @ _orthogonal(rank, rng)
        @ qn[:, i * rank:(i + 1) * rank].T
        for i in range(t)
    ])
    kk = tsv_rank((m, n), t) if k is None else k
    expected = np.zeros((m, n))
    for x in d:
        u, s, vh = np.linalg.svd(x)
        expected += u[:, :kk] @ np.diag(s[:kk]) @ vh[:kk]
    out = _run(torch.tensor(d), k=k)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(flips=st.lists(st.booleans(), min_size=12, max_size=12), seed=st.integers(0, 1000))
def test_sign_flips_of_singular_pairs_leave_the_merge_unchanged(flips: list[bool], seed: int) -> None:
    d = _random(3, 10, 8, seed)
    reference = _run(d)
    original = linalg.truncated_svd
    sign = torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=torch.float64)

    def flipped(matrix: torch.Tensor, k: int, *args, **kwargs) -> linalg.SVD:
        u, s, vh = original(matrix, k, *args, **kwargs)
        f = sign[: s.shape[0]]
        return linalg.SVD(u * f, s, f[:, None] * vh)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "truncated_svd", flipped)
        out = _run(d)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=1e-10)


def test_single_task_returns_its_update() -> None:
    d = _random(1, 7, 5, 3)
    torch.testing.assert_close(_run(d), d[0], atol=1e-10, rtol=0)


def test_zero_task_changes_nothing_and_all_zero_gives_zero() -> None:
    d = _random(2, 9, 6, 4)
    d[1] = 0
    k = tsv_rank((9, 6), 2)
    torch.testing.assert_close(_run(d), _run(d[:1], k=k), atol=1e-10, rtol=0)
    z = torch.zeros(3, 6, 4, dtype=torch.float64)
    out = _run(z)
    assert torch.equal(out, torch.zeros(6, 4, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 1, 9), (4, 9, 1), (5, 3, 4), (8, 2, 2), (2, 1, 1)])
def test_degenerate_shapes_give_finite_output(shape: tuple[int, int, int]) -> None:
    d = _random(*shape, seed=5)
    out = _run(d)
    assert out.shape == shape[1:] and torch.isfinite(out).all()
    if shape[1] == 1 and shape[2] == 1:
        # scalars: polar factors are ±1/√T-normalised, result is a combination of the task values
        assert out.abs().item() <= d.abs().sum().item() + 1e-12


def test_float32_matches_float64() -> None:
    d = _random(4, 24, 16, 6)
    torch.testing.assert_close(_run(d.float()).double(), _run(d), atol=1e-4, rtol=1e-4)


def test_registry_entry() -> None:
    assert SPEC.matrix_only and SPEC.default_lambda == 1.0
    assert SPEC.lambda_grid[0] == 0.1 and SPEC.lambda_grid[-1] == 3.0


# ---------------------------------------------------------------- low-rank route (LoRA factors in ctx.factors)
def _run_with(d: torch.Tensor, factors, **options) -> torch.Tensor:
    return SPEC.fn(d, SPEC.parse(options), LayerContext(name="w", factors=factors))


@pytest.mark.parametrize("m, n", [(48, 40), (40, 48)])  # tall, and wide (taken on the transposed factors)
@pytest.mark.parametrize("ranks", [(2, 3, 5), (4, 0, 2)])  # different ranks; a task that leaves the matrix alone
@pytest.mark.parametrize("k", [None, 3])  # k = 13 > every rank; k = 3 truncates the rank-4/5 tasks
def test_low_rank_route_equals_dense_route(m: int, n: int, ranks: tuple[int, ...], k: int | None) -> None:
    factors = lora_factors(m, n, ranks, seed=11)
    d = dense(factors)
    opts = {} if k is None else {"k": k}
    want = _run_with(d, None, **opts)
    assert_relatively_close(_run_with(d, factors, **opts), want)
    assert torch.equal(_run_with(d, factors, lowrank=False, **opts), want)


def test_low_rank_route_in_float32() -> None:
    factors = lora_factors(48, 40, (2, 3, 5), seed=13, dtype=torch.float32, std=0.1)
    d = dense(factors)
    assert_relatively_close(_run_with(d, factors), _run_with(d, None), rtol=1e-4)


def test_low_rank_route_decomposes_no_m_by_n_matrix() -> None:
    factors = lora_factors(300, 250, (2, 3, 4), seed=12)
    d = dense(factors)
    with decomposition_shapes() as shapes:
        low = _run_with(d, factors)
    assert shapes and max(min(s) for s in shapes) <= 9  # QR of B_t / A_tᵀ, r_t × r_t cores, 9 × 9 polar Grams
    with decomposition_shapes() as shapes:
        want = _run_with(d, None)
    assert max(min(s) for s in shapes) == 250  # the dense route does decompose the updates
    assert_relatively_close(low, want)


def test_low_rank_route_scales_to_large_matrices() -> None:
    # 20000 × 16000 updates of LoRA rank ≤ 4: each dense update would take 2.5 GB (float64); the bases come
    # from the factors alone (``deltas`` is a stride-0 stand-in that no step may read densely)
    m, n = 20_000, 16_000
    factors = lora_factors(m, n, (4, 3, 4), seed=14)
    before = peak_rss_bytes()
    b = tsv_bases(stride_zero_updates(3, m, n), 5, factors)
    assert peak_rss_bytes() - before < 500 * 2**20
    assert b.U.shape == (m, 11) and b.Vh.shape == (11, n)
    eye = torch.eye(11, dtype=torch.float64)
    torch.testing.assert_close(b.U.T @ b.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.Vh @ b.Vh.T, eye, atol=1e-10, rtol=0)


def test_ill_conditioned_but_full_rank_bases_keep_every_direction() -> None:
    """Two tasks whose top left singular vectors differ by ~1e-5: the stacked U (512 × 16) has σ_min/σ_max ~ 1e-5,
    below the usual max(m, n)·eps rank tolerance of float32 (6e-5 here) but far above the float32 eps, so it is
    not rank-deficient. Its polar factor, as the reference code's U Vᵀ, has 16 orthonormal columns; dropping
    the small direction would leave a rank-15 partial isometry."""
    rng = np.random.default_rng(7)
    t, m, n, k = 4, 512, 16, 4
    d = rng.normal(size=(t, m, n))
    u, s, _ = np.linalg.svd(d[0], full_matrices=False)
    u1, _ = np.linalg.qr(np.column_stack([u[:, 0] + 1e-5 * rng.normal(size=m) / np.sqrt(m), rng.normal(size=(m, n - 1))]))
    s1 = np.sort(rng.uniform(1, 2, n))[::-1] * s[0]  # task 1's top left direction ≈ task 0's
    d[1] = (u1 * s1) @ np.linalg.qr(rng.normal(size=(n, n)))[0]
    stacked = np.concatenate([u[:, :k], u1[:, :k]], 1)
    sv = np.linalg.svd(stacked, compute_uv=False)
    assert 1e-6 < sv[-1] / sv[0] < 2e-5
    bases = tsv_bases(torch.tensor(d, dtype=torch.float32), k)
    assert bases.U.shape == (m, t * k)
    gram = (bases.U.double().T @ bases.U.double()).numpy()
    np.testing.assert_allclose(gram, np.eye(t * k), atol=1e-4)
