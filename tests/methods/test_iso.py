"""Iso-C and Iso-CTS: flat spectra, orthonormal bases, the official construction re-implemented in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskmerge.linalg as linalg
from taskmerge.methods.iso import iso_cts_bases, iso_cts_split
from taskmerge.registry import LayerContext, get_method

ISO_C = get_method("iso_c")
ISO_CTS = get_method("iso_cts")


def _run(spec, d: torch.Tensor, **options) -> torch.Tensor:
    return spec.fn(d, spec.parse(options), LayerContext(name="w"))


def _random(t: int, m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(t, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _numpy_iso_cts(d: np.ndarray, fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS as the official code builds it (numpy, full SVDs everywhere, task blocks before the common one)."""
    t, m, n = d.shape
    r = min(m, n)
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
        mp.setattr(linalg, "truncated_svd", lambda a, k: flip(tsvd(a, k)))
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


def test_registry_entries() -> None:
    assert ISO_C.matrix_only and ISO_CTS.matrix_only
    assert ISO_C.default_lambda == 1.3 and ISO_CTS.default_lambda == 1.5
    assert ISO_CTS.parse({}).common_fraction == 0.8
