"""Iso-C and Iso-CTS: flat spectra, orthonormal bases, the official construction re-implemented in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskmerge.linalg as linalg
from taskmerge.errors import OptionError
from taskmerge.methods.iso import iso_cts_bases, iso_cts_split
from taskmerge.registry import LayerContext, get_method
from lowrank_helpers import (
    assert_relatively_close,
    decomposition_shapes,
    dense,
    lora_factors,
    peak_rss_bytes,
    stride_zero_updates,
)

ISO_C = get_method("iso_c")
ISO_CTS = get_method("iso_cts")


def _run(spec, d: torch.Tensor, **options) -> torch.Tensor:
    return spec.fn(d, spec.parse(options), LayerContext(name="w"))


def _random(t: int, m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(t, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _numpy_iso_cts(d: np.ndarray, fraction: float = 0.8, r: int | None = None) -> np.ndarray:
    """Iso-CTS as the official code builds it (numpy, full SVDs everywhere, task blocks before the common one),
    splitting ``r`` directions (default min(m, n))."""
    t, m, n = d.shape
    r = min(m, n) if r is None else r
    k = int(r * fraction)
    k = r - round((r - k) / t) * t
    s_task = (r - k) // t
    u, s, vh = np.linalg.svd(d.sum(0), full_matrices=False)
    uk, sk, vk = u[:, :k], s[:k], vh[:k]
    us, ss, vs = [], [], []
    for x in d:
        w = x - uk @ uk.T @ x
        a, b, c = np.linalg.svd(w, full_matrices=False)
        us.append(a[:, :s_task]), ss.append(b[:s_task]), vs.append(c[:s_task])
    U = np.concatenate(us + [uk], 1)
    S = np.concatenate(ss + [sk])
    V = np.concatenate(vs + [vk], 0)
    pu, _, qu = np.linalg.svd(U, full_matrices=False)
    pv, _, qv = np.linalg.svd(V, full_matrices=False)
    return S.mean() * (pu @ qu) @ (pv @ qv)


# ---------------------------------------------------------------- Iso-C
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 5), m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_iso_c_spectrum_is_flat_at_the_mean_singular_value(t: int, m: int, n: int, seed: int) -> None:
    d = _random(t, m, n, seed)
    out = _run(ISO_C, d).numpy()
    sv_ta = np.linalg.svd(d.sum(0).numpy(), compute_uv=False)
    sv_out = np.linalg.svd(out, compute_uv=False)
    np.testing.assert_allclose(sv_out, np.full(min(m, n), sv_ta.mean()), rtol=1e-9, atol=1e-12)
    # same singular subspaces as Δ_TA: Iso-C is σ̄ times the orthogonal polar factor of Δ_TA
    u, _, vh = np.linalg.svd(d.sum(0).numpy(), full_matrices=False)
    np.testing.assert_allclose(out, sv_ta.mean() * u @ vh, rtol=1e-9, atol=1e-10)


def test_iso_c_zero_and_degenerate_inputs() -> None:
    assert torch.equal(_run(ISO_C, torch.zeros(3, 4, 5, dtype=torch.float64)), torch.zeros(4, 5, dtype=torch.float64))
    for shape in [(3, 1, 7), (2, 7, 1), (8, 2, 3)]:
        out = _run(ISO_C, _random(*shape, seed=0))
        assert out.shape == shape[1:] and torch.isfinite(out).all()


# ---------------------------------------------------------------- Iso-CTS
def test_split_follows_the_official_rule() -> None:
    assert iso_cts_split(768, 8) == (616, 19)
    assert iso_cts_split(768, 14) == (614, 11)  # k0 = 614, 154 / 14 = 11
    assert iso_cts_split(768, 20) == (608, 8)  # 154 / 20 = 7.7 → 8
    assert iso_cts_split(1024, 8) == (816, 26)  # k0 = 819, 205 / 8 = 25.6 → 26
    assert iso_cts_split(100, 8) == (84, 2)  # 20 / 8 = 2.5 → 2 (Python rounds half to even)
    assert iso_cts_split(3, 8) == (3, 0)
    assert iso_cts_split(4, 8, 0.0) == (4, 0)  # 4 / 8 = 0.5 → 0
    for r, t, f in [(50, 3, 0.8), (7, 2, 0.1), (10, 9, 0.0), (1, 1, 0.8)]:
        k, s = iso_cts_split(r, t, f)
        assert k >= 0 and s >= 0 and k + t * s == r


@pytest.mark.parametrize("shape", [(3, 20, 15), (4, 16, 24), (2, 30, 30), (8, 40, 32)])
def test_iso_cts_matches_a_numpy_reference(shape: tuple[int, int, int]) -> None:
    d = _random(*shape, seed=3)
    np.testing.assert_allclose(_run(ISO_CTS, d).numpy(), _numpy_iso_cts(d.numpy()), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 20, 15), (4, 16, 24), (8, 40, 32)])
def test_iso_cts_bases_orthonormal_and_spectrum_flat(shape: tuple[int, int, int]) -> None:
    d = _random(*shape, seed=4)
    b = iso_cts_bases(d)
    r = min(shape[1:])
    eye = torch.eye(r, dtype=torch.float64)
    assert b.U.shape == (shape[1], r) and b.Vh.shape == (r, shape[2]) and b.S.shape == (r,)
    torch.testing.assert_close(b.U.T @ b.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.Vh @ b.Vh.T, eye, atol=1e-10, rtol=0)
    out = _run(ISO_CTS, d).numpy()
    sv = np.linalg.svd(out, compute_uv=False)
    np.testing.assert_allclose(sv, np.full(r, float(b.S.mean())), rtol=1e-9)


def test_iso_cts_common_subspace_and_task_directions() -> None:
    # the first k left directions are exactly Δ_TA's top-k singular vectors (already orthonormal and
    # orthogonal to the task-specific ones, so the polar step keeps them)
    d = _random(4, 24, 20, 5)
    k, _ = iso_cts_split(20, 4)
    b = iso_cts_bases(d)
    u, _, _ = np.linalg.svd(d.sum(0).numpy(), full_matrices=False)
    proj = b.U[:, :k].numpy().T @ u[:, :k]
    np.testing.assert_allclose(np.abs(np.linalg.svd(proj, compute_uv=False)), np.ones(k), atol=1e-10)


def test_iso_cts_reduces_to_iso_c_without_task_subspaces() -> None:
    d = _random(3, 10, 12, 6)
    torch.testing.assert_close(_run(ISO_CTS, d, common_fraction=1.0), _run(ISO_C, d))
    d = _random(8, 3, 5, 7)  # r = 3 < T: no room for task-specific directions
    torch.testing.assert_close(_run(ISO_CTS, d), _run(ISO_C, d))


@settings(max_examples=20, deadline=None)
@given(flips=st.lists(st.booleans(), min_size=20, max_size=20), seed=st.integers(0, 1000))
def test_iso_cts_sign_flips_leave_the_merge_unchanged(flips: list[bool], seed: int) -> None:
    d = _random(3, 12, 10, seed)
    reference = _run(ISO_CTS, d)
    sign = torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=torch.float64)
    tsvd, full = linalg.truncated_svd, linalg.svd

    def flip(dec: linalg.SVD) -> linalg.SVD:
        f = sign[: dec.S.shape[0]]
        return linalg.SVD(dec.U * f, dec.S, f[:, None] * dec.Vh)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "truncated_svd", lambda a, k, *args, **kw: flip(tsvd(a, k, *args, **kw)))
        mp.setattr(linalg, "svd", lambda a: flip(full(a)))
        out = _run(ISO_CTS, d)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(3, 1, 9), (4, 9, 1), (8, 5, 4), (1, 6, 6), (2, 1, 1)])
def test_iso_cts_degenerate_inputs_are_finite(shape: tuple[int, int, int]) -> None:
    out = _run(ISO_CTS, _random(*shape, seed=8))
    assert out.shape == shape[1:] and torch.isfinite(out).all()
    z = _run(ISO_CTS, torch.zeros(shape, dtype=torch.float64))
    assert torch.isfinite(z).all() and float(z.abs().max()) == 0.0


def test_float32_matches_float64() -> None:
    d = _random(8, 48, 40, 9)
    torch.testing.assert_close(_run(ISO_CTS, d.float()).double(), _run(ISO_CTS, d), atol=1e-4, rtol=1e-4)


def _power_law_tasks(t: int, m: int, n: int, seed: int) -> np.ndarray:
    """Task updates with fine-tuned-like spectra: a shared power-law part plus each task's own power-law part."""
    rng = np.random.default_rng(seed)

    def power_law(scale: float) -> np.ndarray:
        u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
        v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
        return scale * (u * np.arange(1, min(m, n) + 1) ** -1.2) @ v.T

    shared = power_law(1.0)
    return np.stack([shared + power_law(1.0) for _ in range(t)]).astype(np.float32)


def test_float32_on_power_law_spectra_matches_the_official_construction_in_float64() -> None:
    # On the spectra real task vectors have, the float32 merge must sit at float32 round-off (2.5e-7 here) from
    # the official construction run in float64 on the same inputs. The common subspace keeps 80 % of the
    # directions, whose tail is too close together for a float32 SVD (3.6e-5 here when it took one), and the
    # stacked bases are ill-conditioned, so rounding them to float32 before their polar factors costs ~eps/σ_min
    # (3.0e-6 here when they were).
    d = _power_law_tasks(8, 256, 192, 3)
    ref = _numpy_iso_cts(d.astype(np.float64))
    out = _run(ISO_CTS, torch.from_numpy(d))
    assert out.dtype == torch.float32
    got = out.double().numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


def test_registry_entries() -> None:
    assert ISO_C.matrix_only and ISO_CTS.matrix_only
    assert ISO_C.default_lambda == 1.3 and ISO_CTS.default_lambda == 1.5
    assert ISO_CTS.parse({}).common_fraction == 0.8


# ---------------------------------------------------------------- subspace = "lora" and the low-rank route
def _run_with(spec, d: torch.Tensor, factors, **options) -> torch.Tensor:
    return spec.fn(d, spec.parse(options), LayerContext(name="w", factors=factors))


def _numpy_iso_c_lora(d: np.ndarray, big_r: int) -> np.ndarray:
    """The paper's LoRA protocol, independently: top-R triplets of the dense Δ_TA, their mean singular value."""
    u, s, vh = np.linalg.svd(d.sum(0), full_matrices=False)
    return s[:big_r].mean() * u[:, :big_r] @ vh[:big_r]


@pytest.mark.parametrize("m, n", [(48, 40), (40, 48)])
@pytest.mark.parametrize("ranks", [(2, 3, 5), (4, 0, 2)])
def test_iso_c_lora_subspace_matches_numpy(m: int, n: int, ranks: tuple[int, ...]) -> None:
    factors = lora_factors(m, n, ranks, seed=21)
    d = dense(factors)
    big_r = sum(ranks)
    want = _numpy_iso_c_lora(d.numpy(), big_r)
    # R from the factors' inner dimensions (factor and dense SVD routes) or from the dense numerical ranks
    for factors_, lowrank in [(factors, True), (factors, False), (None, True)]:
        got = _run_with(ISO_C, d, factors_, subspace="lora", lowrank=lowrank)
        assert_relatively_close(got, torch.from_numpy(want), rtol=1e-9)
    sv = np.linalg.svd(want, compute_uv=False)  # R flat singular values, then zeros
    np.testing.assert_allclose(sv[:big_r], np.full(big_r, sv[0]), rtol=1e-9)
    assert sv[big_r] < 1e-9 * sv[0]


@pytest.mark.parametrize("m, n", [(48, 40), (40, 48)])
@pytest.mark.parametrize("ranks", [(2, 3, 5), (4, 0, 2)])
@pytest.mark.parametrize("fraction", [0.8, 0.0])  # f = 0: s = 3 (resp. 2) exceeds some tasks' ranks
def test_iso_lora_low_rank_route_equals_dense_route(m: int, n: int, ranks: tuple[int, ...], fraction: float) -> None:
    factors = lora_factors(m, n, ranks, seed=22)
    d = dense(factors)
    for spec, opts in [(ISO_C, {}), (ISO_CTS, {"common_fraction": fraction})]:
        want = _run_with(spec, d, None, subspace="lora", **opts)
        assert_relatively_close(_run_with(spec, d, factors, subspace="lora", **opts), want)
        assert_relatively_close(_run_with(spec, d, factors, subspace="lora", lowrank=False, **opts), want, rtol=1e-9)


def test_iso_cts_lora_matches_numpy_with_r_lora_directions() -> None:
    # generic LoRA updates (no numerically null triplet): the official construction with R = Σ_t rank_t
    factors = lora_factors(48, 40, (2, 3, 5), seed=23)
    d = dense(factors)
    want = _numpy_iso_cts(d.numpy(), 0.8, r=10)
    assert_relatively_close(_run_with(ISO_CTS, d, factors, subspace="lora"), torch.from_numpy(want))
    b = iso_cts_bases(d, subspace="lora", factors=factors)
    assert b.S.shape == (10,) and b.U.shape == (48, 10) and b.Vh.shape == (10, 40)


def test_lora_subspace_with_null_triplets() -> None:
    # two identical tasks: Δ_TA has rank 3 < R = 6; σ̄ counts the 3 zeros, no arbitrary direction is kept
    (f,) = lora_factors(30, 20, (3,), seed=24)
    factors = (f, f)
    d = dense(factors)
    s = np.linalg.svd(d.sum(0).numpy(), compute_uv=False)
    u, _, vh = np.linalg.svd(d.sum(0).numpy(), full_matrices=False)
    want = s[:3].sum() / 6 * u[:, :3] @ vh[:3]
    for spec in (ISO_C, ISO_CTS):
        for factors_ in (factors, None):
            got = _run_with(spec, d, factors_, subspace="lora")
            assert_relatively_close(got, torch.from_numpy(want), rtol=1e-8)


def test_lora_subspace_covering_the_matrix_is_the_full_subspace() -> None:
    factors = lora_factors(24, 20, (9, 8, 7), seed=25)  # Σ ranks = 24 > min(m, n) = 20: R = r
    d = dense(factors)
    for spec in (ISO_C, ISO_CTS):
        assert_relatively_close(_run_with(spec, d, factors, subspace="lora"), _run(spec, d), rtol=1e-8)
    # the full subspace ignores the factors (it needs directions outside their span)
    assert torch.equal(_run_with(ISO_CTS, d, factors), _run(ISO_CTS, d))


def test_lora_subspace_zero_updates_give_zero() -> None:
    z = torch.zeros(3, 6, 5, dtype=torch.float64)
    factors = tuple(linalg.LowRank(torch.zeros(6, r, dtype=torch.float64), torch.zeros(r, 5, dtype=torch.float64))
                    for r in (0, 2, 0))
    for spec in (ISO_C, ISO_CTS):
        for factors_ in (factors, None):
            out = _run_with(spec, z, factors_, subspace="lora")
            assert torch.equal(out, torch.zeros(6, 5, dtype=torch.float64))


def test_lora_low_rank_route_decomposes_no_m_by_n_matrix() -> None:
    factors = lora_factors(300, 250, (2, 3, 4), seed=26)
    d = dense(factors)
    for spec in (ISO_C, ISO_CTS):
        with decomposition_shapes() as shapes:
            low = _run_with(spec, d, factors, subspace="lora")
        assert shapes and max(min(s) for s in shapes) <= 9  # QR of the stacked B's, 9 × 9 cores and Grams
        assert_relatively_close(low, _run_with(spec, d, None, subspace="lora"))


def test_subspace_option() -> None:
    assert ISO_C.parse({}).subspace == "full" and ISO_CTS.parse({}).subspace == "full"
    assert ISO_C.parse({"subspace": "lora"}).lowrank
    with pytest.raises(OptionError):
        ISO_CTS.parse({"subspace": "half"})


@pytest.mark.parametrize("fraction", [1.0, 0.8])  # Iso-C (no task-specific directions), Iso-CTS
def test_lora_low_rank_route_scales_to_large_matrices(fraction: float) -> None:
    # 20000 × 16000 updates of LoRA rank ≤ 4 (2.5 GB each, dense float64): the bases come from the factors alone
    # (``deltas`` is a stride-0 stand-in that no step may read densely); only σ̄ U* V*ᵀ would be m × n
    m, n = 20_000, 16_000
    factors = lora_factors(m, n, (4, 3, 4), seed=27)
    before = peak_rss_bytes()
    b = iso_cts_bases(stride_zero_updates(3, m, n), fraction, subspace="lora", factors=factors)
    assert peak_rss_bytes() - before < 500 * 2**20
    assert b.U.shape == (m, 11) and b.S.shape == (11,) and b.Vh.shape == (11, n)
    eye = torch.eye(11, dtype=torch.float64)
    torch.testing.assert_close(b.U.T @ b.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.Vh @ b.Vh.T, eye, atol=1e-10, rtol=0)
