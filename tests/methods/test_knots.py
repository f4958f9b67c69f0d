"""KnOTS against hand-worked cases and independent computations (numpy SVD of the concatenation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmerge import linalg
from taskmerge.merge import merged_task_vector
from taskmerge.methods.knots import KnotsOptions, knots_decompose
from taskmerge.methods.ties import ties_merge
from taskmerge.registry import LayerContext, get_method
from taskmerge.selection import TensorPolicy

SPEC = get_method("knots")


def _run(deltas: torch.Tensor, factors=None, seed: int = 0, **options) -> torch.Tensor:
    return SPEC.fn(deltas, SPEC.parse({"scope": "tensor", **options}), LayerContext("w", seed=seed, factors=factors))


def _lora_parts(shapes: tuple[int, int], ranks, seed: int, dtype=torch.float64, std: float = 1.0) -> list[linalg.LowRank]:
    g = torch.Generator().manual_seed(seed)
    m, n = shapes
    return [linalg.LowRank(std * torch.randn(m, r, generator=g, dtype=dtype),
                           std * torch.randn(r, n, generator=g, dtype=dtype), 0.5 + i) for i, r in enumerate(ranks)]


def _unit(n: int, i: int) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[i] = 1.0
    return e


def test_registered_with_the_official_defaults() -> None:
    assert SPEC.matrix_only and SPEC.data_free
    assert SPEC.default_lambda == 0.6  # the official KnOTS-TIES ViT-B/32 alpha
    opts = SPEC.parse({})
    assert isinstance(opts, KnotsOptions)
    assert (opts.merge, opts.scope, opts.svd_tol, opts.svd_dtype) == ("ties", "global", 1e-5, "float64")
    assert opts.resolved_keep == 0.2  # topK: 20
    assert SPEC.parse({"merge": "dare_ties"}).resolved_keep == 1.0 and SPEC.parse({"merge": "dare_ties"}).p == 0.1
    assert SPEC.parse({"merge": "ta"}).resolved_keep == 1.0
    # a model-wide statistics pass only where something is trimmed model-wide
    assert SPEC.statistic_for(opts) is not None
    assert SPEC.statistic_for(SPEC.parse({"scope": "tensor"})) is None
    assert SPEC.statistic_for(SPEC.parse({"merge": "ta"})) is None


@pytest.mark.parametrize("low_rank", [False, True])
def test_knots_ta_is_task_arithmetic(low_rank: bool) -> None:
    if low_rank:
        parts = _lora_parts((9, 7), (2, 3, 1), seed=1)
        d = torch.stack([p.dense() for p in parts])
    else:
        d = torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(_run(d, merge="ta"), d.sum(0), rtol=0, atol=1e-12)


def test_hand_worked_shared_direction() -> None:
    # Both tasks live on the same rank-1 direction u vᵀ: X = u [3vᵀ, −vᵀ] has one singular triplet and the
    # blocks are 3v and −v (up to a common sign). TIES elects v's sign and keeps task 1 only; TA sums.
    u, v = _unit(4, 1), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d = torch.stack([3 * torch.outer(u, v), -torch.outer(u, v)])
    torch.testing.assert_close(_run(d, merge="ties", keep=1.0), d[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(_run(d, merge="ta"), 2 * torch.outer(u, v), rtol=0, atol=1e-12)
    # agreeing tasks: the disjoint mean of 2v and 4v is 3v
    d = torch.stack([2 * torch.outer(u, v), 4 * torch.outer(u, v)])
    torch.testing.assert_close(_run(d, merge="ties", keep=1.0), 3 * torch.outer(u, v), rtol=0, atol=1e-12)


def test_tasks_in_orthogonal_subspaces_do_not_interfere() -> None:
    # Δ_1 = u_1 v_1ᵀ, Δ_2 = u_2 v_2ᵀ with u_1 ⟂ u_2: each block is non-zero on its own row only, so TIES's
    # disjoint mean (no trim) returns the sum — KnOTS resolves what TIES in parameter space would average.
    d = torch.stack([torch.outer(_unit(5, 0), torch.tensor([1.0, 2, 3], dtype=torch.float64)),
                     torch.outer(_unit(5, 3), torch.tensor([1.0, 2, 3], dtype=torch.float64))])
    torch.testing.assert_close(_run(d, merge="ties", keep=1.0), d.sum(0), rtol=0, atol=1e-12)
    plain_ties = ties_merge(d, keep=1.0)  # entry-wise: also the sum here (disjoint supports)
    torch.testing.assert_close(plain_ties, d.sum(0))


def test_matches_an_independent_numpy_computation() -> None:
    g = torch.Generator().manual_seed(3)
    d = torch.randn(4, 10, 6, generator=g, dtype=torch.float64)
    x = np.concatenate(list(d.numpy()), axis=1)  # O × T·I
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    keep = s > 1e-5
    blocks = np.stack(np.split(s[keep, None] * vh[keep], 4, axis=1))  # (T, k, I)
    expected = u[:, keep] @ ties_merge(torch.from_numpy(blocks), keep=0.2).numpy()
    np.testing.assert_allclose(_run(d, merge="ties").numpy(), expected, atol=1e-10)


def test_output_lies_in_the_span_of_the_updates() -> None:
    parts = _lora_parts((12, 9), (2, 1, 2), seed=4)
    d = torch.stack([p.dense() for p in parts])
    out = _run(d, merge="ties", keep=0.3)
    span = linalg.orthonormal_basis(torch.cat([p.B for p in parts], dim=1))  # column space of [ΔW_1 … ΔW_T]
    torch.testing.assert_close(linalg.project(span, out), out, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(out, rtol=1e-10) <= sum(p.rank for p in parts)


def test_decomposition_basis_orthonormal_and_exact() -> None:
    d = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u, blocks = knots_decompose(d)
    assert u.shape == (8, 8) and blocks.shape == (3, 8, 5)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    for t in range(3):  # ΔW_t = U (Σ V_tᵀ)
        torch.testing.assert_close(u @ blocks[t], d[t], rtol=0, atol=1e-12)


def test_small_singular_values_are_dropped() -> None:
    d = torch.stack([torch.diag(torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)),
                     torch.diag(torch.tensor([0.0, 0.0, 1e-6, 0.0], dtype=torch.float64))])
    expected = torch.diag(torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(_run(d, merge="ta"), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(_run(d, merge="ta", svd_tol=0.0), d.sum(0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("merge", ["ties", "dare_ties", "ta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_route_equals_dense_route(merge: str, dtype: torch.dtype) -> None:
    # LoRA-sized updates (entries ~1e-2): the float32 rounding of B A then stays far below svd_tol, so the
    # dense SVD finds no spurious directions. Task 2 leaves the matrix alone (rank 0).
    parts = _lora_parts((16, 11), (3, 0, 2, 4), seed=6, dtype=dtype, std=0.05)
    d = torch.stack([p.dense() for p in parts])
    opts = {"merge": merge, "keep": 0.3}
    dense = _run(d, None, seed=9, **opts)
    low = _run(d, tuple(parts), seed=9, **opts)
    assert low.dtype == dtype
    scale = d.abs().max()
    torch.testing.assert_close(low / scale, dense / scale, rtol=0, atol=1e-5)
    off = SPEC.fn(d, SPEC.parse({**opts, "scope": "tensor", "lowrank": False}), LayerContext("w", seed=9, factors=tuple(parts)))
    torch.testing.assert_close(off, dense, rtol=0, atol=0)


def test_hstack_lowrank_svd_equals_dense_svd() -> None:
    parts = _lora_parts((7, 5), (3, 0, 6, 2), seed=7)  # r > n and rank-0 parts
    x = torch.cat([p.dense() for p in parts], dim=1)
    dec = linalg.hstack_lowrank_svd(parts)
    ref = torch.linalg.svdvals(x)
    k = dec.S.shape[0]
    torch.testing.assert_close(dec.S, ref[:k], rtol=1e-10, atol=1e-12)
    assert bool((ref[k:] < 1e-10).all())
    torch.testing.assert_close(dec.reconstruct(), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(dec.U.T @ dec.U, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.Vh @ dec.Vh.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    # a single part is lowrank_svd of (scale·B) A
    one = linalg.hstack_lowrank_svd(parts[:1])
    ref_one = linalg.lowrank_svd(parts[0].B * parts[0].scale, parts[0].A)
    torch.testing.assert_close(one.S, ref_one.S)


def test_dare_ties_without_dropping_is_untrimmed_ties_and_is_seeded() -> None:
    d = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(_run(d, merge="dare_ties", p=0.0), _run(d, merge="ties", keep=1.0))
    a, b, c = (_run(d, merge="dare_ties", p=0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_updates_merge_to_zero() -> None:
    d = torch.zeros(2, 4, 3, dtype=torch.float64)
    for merge in ("ties", "dare_ties", "ta"):
        assert torch.equal(_run(d, merge=merge), torch.zeros(4, 3, dtype=torch.float64))


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(6, 4, generator=g, dtype=torch.float64),
            "b.weight": 3 * torch.randn(5, 6, generator=g, dtype=torch.float64),
            "b.bias": torch.randn(5, generator=g, dtype=torch.float64)}


def test_global_scope_trims_with_one_model_wide_threshold() -> None:
    base, tasks = _model(0), [_model(1), _model(2), _model(3)]
    keep = 0.25
    tau = merged_task_vector(base, tasks, "knots", {"keep": keep}, policy=TensorPolicy(exclude=()),
                             compute_dtype="float64")
    # independent: blocks of every matrix, one top-k per task over all of them, then sign election and
    # disjoint mean per matrix
    decomposed = {}
    for name in ("a.weight", "b.weight"):
        d = torch.stack([t[name] - base[name] for t in tasks])
        decomposed[name] = knots_decompose(d)
    flat = torch.cat([blocks.reshape(3, -1) for _, blocks in decomposed.values()], dim=1)
    k = round(keep * flat.shape[1])
    thr = flat.abs().topk(k, dim=1).values[:, -1:]
    for name, (u, blocks) in decomposed.items():
        trimmed = torch.where(blocks.abs() >= thr.unsqueeze(2), blocks, 0)
        expected = u @ ties_merge(trimmed, keep=1.0)
        torch.testing.assert_close(tau[name], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tau["b.bias"], torch.stack([t["b.bias"] - base["b.bias"] for t in tasks]).mean(0))
    per_tensor = merged_task_vector(base, tasks, "knots", {"keep": keep, "scope": "tensor"},
                                    policy=TensorPolicy(exclude=()), compute_dtype="float64")
    assert not torch.allclose(per_tensor["b.weight"], tau["b.weight"])


def test_global_and_tensor_scope_agree_on_a_single_matrix() -> None:
    base = {"w.weight": torch.zeros(5, 4)}
    tasks = [{"w.weight": torch.randn(5, 4, generator=torch.Generator().manual_seed(s))} for s in range(3)]
    g = merged_task_vector(base, tasks, "knots", {}, policy=TensorPolicy(exclude=()))
    t = merged_task_vector(base, tasks, "knots", {"scope": "tensor"}, policy=TensorPolicy(exclude=()))
    torch.testing.assert_close(g["w.weight"], t["w.weight"], rtol=0, atol=1e-6)
