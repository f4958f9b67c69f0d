"""DC-Merge diagnostics against independent computations: plain flattened cosines, the closed form of
DirSim, numpy SVDs and the paper's controlled-perturbation identities (App. E.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.analysis import direction as dr


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _np_cos(a, b) -> float:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _np_dirsim(a, b, ra=None, rb=None) -> float:
    """Closed form: cosine of the two matrices with every (kept) singular value set to one."""
    ua, sa, vha = np.linalg.svd(np.asarray(a), full_matrices=False)
    ub, sb, vhb = np.linalg.svd(np.asarray(b), full_matrices=False)
    na = ra or int((sa > 1e-10 * sa[0]).sum())
    nb = rb or int((sb > 1e-10 * sb[0]).sum())
    pa = ua[:, :na] @ vha[:na]
    pb = ub[:, :nb] @ vhb[:nb]
    return float((pa * pb).sum() / math.sqrt(na * nb))


def _low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    return _rand(m, r, seed=seed) @ _rand(r, n, seed=seed + 1)


# ------------------------------------------------------------------------------------------------
# Proposition 1 and DirSim
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    rs=st.integers(1, 12),
    rt=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_prop1_cossim_equals_flattened_cosine(m, n, rs, rt, seed) -> None:
    a = _low_rank(m, n, rs, seed)
    b = _low_rank(m, n, rt, seed + 7)
    dec = dr.cossim_decomposition(a, b)
    np.testing.assert_allclose(dec.cossim, _np_cos(a.numpy(), b.numpy()), atol=1e-9)
    np.testing.assert_allclose(dr.cossim(a, b), _np_cos(a.numpy(), b.numpy()), atol=1e-12)
    # R has one row per component of s and one column per component of t (numerical ranks).
    assert dec.R.shape == (min(rs, m, n), min(rt, m, n))
    # R_ij = (u_s^i · u_t^j)(v_s^i · v_t^j) entry by entry.
    us, _, vhs = np.linalg.svd(a.numpy(), full_matrices=False)
    ut, _, vht = np.linalg.svd(b.numpy(), full_matrices=False)
    i, j = dec.R.shape[0] - 1, dec.R.shape[1] - 1
    want = (us[:, i] @ ut[:, j]) * (vhs[i] @ vht[j])
    np.testing.assert_allclose(float(dec.R[i, j]), want, atol=1e-9)


def test_prop1_with_truncation_is_the_cosine_of_the_truncations() -> None:
    a, b = _rand(10, 8, seed=1), _rand(10, 8, seed=2)
    dec = dr.cossim_decomposition(a, b, rank_s=3, rank_t=5)

    def trunc(x, k):
        u, s, vh = np.linalg.svd(x.numpy(), full_matrices=False)
        return (u[:, :k] * s[:k]) @ vh[:k]

    np.testing.assert_allclose(dec.cossim, _np_cos(trunc(a, 3), trunc(b, 5)), atol=1e-10)
    np.testing.assert_allclose(dec.dirsim, _np_dirsim(a.numpy(), b.numpy(), 3, 5), atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    rs=st.integers(1, 6),
    rt=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_dirsim_closed_form(m, n, rs, rt, seed) -> None:
    a = _low_rank(m, n, rs, seed)
    b = _low_rank(m, n, rt, seed + 3)
    got = dr.dirsim(a, b)
    np.testing.assert_allclose(got, _np_dirsim(a.numpy(), b.numpy()), atol=1e-9)
    assert -1 - 1e-12 <= got <= 1 + 1e-12
    np.testing.assert_allclose(dr.dirsim(b, a), got, atol=1e-12)  # symmetric


def test_dirsim_ignores_energy_and_sees_direction() -> None:
    a = _low_rank(12, 9, 4, seed=3)
    u, s, vh = np.linalg.svd(a.numpy(), full_matrices=False)
    # Same directions, any positive energy: DirSim = 1 while CosSim < 1.
    other = torch.from_numpy((u[:, :4] * np.array([0.1, 5.0, 2.0, 7.0])) @ vh[:4])
    assert dr.dirsim(a, other) == pytest.approx(1.0, abs=1e-10)
    assert dr.cossim(a, other) < 0.99
    assert dr.dirsim(a, -2.0 * a) == pytest.approx(-1.0, abs=1e-10)
    # Flipping a singular pair together changes nothing.
    u2, vh2 = u.copy(), vh.copy()
    u2[:, 1] *= -1
    vh2[1] *= -1
    flipped = torch.from_numpy((u2[:, :4] * s[:4]) @ vh2[:4])
    assert dr.dirsim(a, flipped) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6, 1.0])
def test_dirsim_of_a_directional_perturbation_is_p(p: float) -> None:
    # Eqs. 36-37 built here with numpy: U(p) = √p U + √(1−p) Û with Û ⊥ U (same for V).
    m, n, r = 14, 12, 3
    a = _low_rank(m, n, r, seed=5).numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    U, V = u[:, :r], vh[:r].T
    rng = np.random.default_rng(0)
    uh = np.linalg.qr((np.eye(m) - U @ U.T) @ rng.standard_normal((m, r)))[0]
    vhat = np.linalg.qr((np.eye(n) - V @ V.T) @ rng.standard_normal((n, r)))[0]
    up = math.sqrt(p) * U + math.sqrt(1 - p) * uh
    vp = math.sqrt(p) * V + math.sqrt(1 - p) * vhat
    b = (up * s[:r]) @ vp.T
    assert dr.dirsim(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(p, abs=1e-9)


def test_perturbation_helpers_hit_their_targets() -> None:
    a = _low_rank(16, 14, 4, seed=6)
    for p in (0.3, 0.8):
        e = dr.energy_perturbation(a, p)
        np.testing.assert_allclose(_np_cos(a.numpy(), e.numpy()), p, atol=1e-9)
        d = dr.directional_perturbation(a, p, generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(_np_dirsim(a.numpy(), d.numpy()), p, atol=1e-9)
        # The directional perturbation keeps the spectrum.
        np.testing.assert_allclose(
            np.linalg.svd(d.numpy(), compute_uv=False)[:4], np.linalg.svd(a.numpy(), compute_uv=False)[:4]
        )
    with pytest.raises(ValueError):
        dr.directional_perturbation(_rand(4, 4, seed=0), 0.5)  # 2·rank > min(m, n)
    with pytest.raises(ValueError):
        dr.energy_perturbation(torch.zeros(3, 3), 0.5)


def test_zero_and_degenerate_inputs_are_defined() -> None:
    a = _rand(5, 4, seed=8)
    z = torch.zeros(5, 4)
    assert dr.dirsim(a, z) == 0.0 and dr.cossim(a, z) == 0.0
    dec = dr.cossim_decomposition(z, z)
    assert dec.cossim == 0.0 and dec.dirsim == 0.0 and dec.R.shape == (0, 0)
    assert dr.projected_dirsim(a, z) == 0.0 and dr.projected_dirsim(z, a) == 0.0
    row = _rand(1, 6, seed=9)
    assert dr.dirsim(row, 3 * row) == pytest.approx(1.0)
    assert torch.equal(dr.energy_spectrum(z), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(dr.energy_retention(z), torch.zeros(4, dtype=torch.float64))
    pair = dr.pairwise_dirsim([a, z])
    assert torch.isfinite(pair).all() and pair[0, 1] == 0 and pair[1, 1] == 0


# ------------------------------------------------------------------------------------------------
# Projected DirSim (Eq. 6)
# ------------------------------------------------------------------------------------------------


def _np_projected_dirsim(delta, merged, r):
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    Ui = u[:, :r]
    proj = Ui @ Ui.T @ merged
    pu, ps, pvh = np.linalg.svd(proj, full_matrices=False)
    k = int((ps[:r] > 1e-10 * ps[0]).sum())
    a = u[:, :r] @ vh[:r]
    b = pu[:, :k] @ pvh[:k]
    return float((a * b).sum() / math.sqrt(r * k))


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 4), seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_projected_dirsim_matches_numpy(r, seed, scale) -> None:
    delta = _rand(12, 10, seed=seed)
    merged = _rand(12, 10, seed=seed + 1) + delta
    got = dr.projected_dirsim(delta, merged, rank=r)
    np.testing.assert_allclose(got, _np_projected_dirsim(delta.numpy(), merged.numpy(), r), atol=1e-9)
    np.testing.assert_allclose(dr.projected_dirsim(delta, scale * merged, rank=r), got, atol=1e-9)


def test_projected_dirsim_extremes() -> None:
    delta = _low_rank(10, 8, 3, seed=2)
    assert dr.projected_dirsim(delta, delta) == pytest.approx(1.0, abs=1e-10)
    # A merge whose columns lie in the orthogonal complement of U_i keeps nothing of task i.
    u = np.linalg.svd(delta.numpy())[0][:, :3]
    other = torch.from_numpy((np.eye(10) - u @ u.T) @ _rand(10, 8, seed=3).numpy())
    assert dr.projected_dirsim(delta, other) == 0.0
    with pytest.raises(ValueError):
        dr.projected_dirsim(delta, torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------------
# Spectra and the per-layer wrappers
# ------------------------------------------------------------------------------------------------


def test_energy_spectrum_and_retention() -> None:
    a = _rand(9, 7, seed=4)
    s = np.linalg.svd(a.numpy(), compute_uv=False)
    np.testing.assert_allclose(dr.energy_spectrum(a).numpy(), s / s[0], atol=1e-12)
    np.testing.assert_allclose(dr.energy_spectrum(a, 3, normalize=False).numpy(), s[:3], atol=1e-12)
    np.testing.assert_allclose(dr.energy_retention(a).numpy(), np.cumsum(s**2) / np.sum(s**2), atol=1e-12)


def _task_vectors():
    tvs = {}
    for t in range(3):
        tvs[f"t{t}"] = {
            "blocks.0.attn.weight": _rand(8, 6, seed=10 * t),
            "blocks.0.attn.bias": _rand(8, seed=10 * t + 1),
            "blocks.0.mlp.weight": _rand(12, 6, seed=10 * t + 2),
        }
    return tvs


def test_layer_wrappers() -> None:
    tvs = _task_vectors()
    assert dr.matrix_layers(tvs) == ["blocks.0.attn.weight", "blocks.0.mlp.weight"]
    spectra = dr.layer_energy_spectra(tvs)
    assert set(spectra) == {"t0", "t1", "t2"} and set(spectra["t0"]) == {"blocks.0.attn.weight", "blocks.0.mlp.weight"}
    mean = dr.mean_spectrum(spectra["t1"])
    layers = ("blocks.0.attn.weight", "blocks.0.mlp.weight")
    svals = [np.linalg.svd(tvs["t1"][k].numpy(), compute_uv=False) for k in layers]
    np.testing.assert_allclose(mean.numpy(), np.mean([s / s[0] for s in svals], axis=0), atol=1e-12)
    assert mean.shape == (6,)
    pair = dr.layer_pairwise_dirsim(tvs)["blocks.0.mlp.weight"]
    for i, a in enumerate(tvs.values()):
        for j, b in enumerate(tvs.values()):
            want = _np_dirsim(a["blocks.0.mlp.weight"].numpy(), b["blocks.0.mlp.weight"].numpy())
            np.testing.assert_allclose(float(pair[i, j]), want, atol=1e-9)
    cos = dr.pairwise_cossim([tv["blocks.0.attn.weight"] for tv in tvs.values()])
    np.testing.assert_allclose(
        float(cos[0, 2]), _np_cos(tvs["t0"]["blocks.0.attn.weight"].numpy(), tvs["t2"]["blocks.0.attn.weight"].numpy())
    )
    merged = {k: sum(tv[k] for tv in tvs.values()) for k in tvs["t0"]}
    proj = dr.layer_projected_dirsim(tvs, merged, rank=2)
    assert set(proj) == {"blocks.0.attn.weight", "blocks.0.mlp.weight"} and proj["blocks.0.attn.weight"].shape == (3,)
    np.testing.assert_allclose(
        float(proj["blocks.0.mlp.weight"][1]),
        _np_projected_dirsim(tvs["t1"]["blocks.0.mlp.weight"].numpy(), merged["blocks.0.mlp.weight"].numpy(), 2),
        atol=1e-9,
    )
    avg = dr.layer_average(proj)
    np.testing.assert_allclose(avg.numpy(), (proj["blocks.0.attn.weight"] + proj["blocks.0.mlp.weight"]).numpy() / 2)
    decs = dr.layer_cossim_decomposition(tvs["t0"], tvs["t1"])
    np.testing.assert_allclose(
        decs["blocks.0.attn.weight"].cossim,
        _np_cos(tvs["t0"]["blocks.0.attn.weight"].numpy(), tvs["t1"]["blocks.0.attn.weight"].numpy()),
        atol=1e-10,
    )
    as_list = dr.layer_pairwise_dirsim(list(tvs.values()), layers=["blocks.0.attn.weight"])
    assert list(as_list) == ["blocks.0.attn.weight"]
    with pytest.raises(KeyError):
        dr.layer_pairwise_dirsim(tvs, layers=["missing"])
    with pytest.raises(ValueError):
        dr.layer_pairwise_dirsim(tvs, layers=["blocks.0.attn.bias"])


def test_plots_write_png(tmp_path) -> None:
    tvs = _task_vectors()
    spectra = {t: dr.mean_spectrum(v) for t, v in dr.layer_energy_spectra(tvs).items()}
    paths = [
        dr.plot_energy_spectra(spectra, tmp_path / "spectra.png", log=True),
        dr.plot_cossim_decomposition(
            dr.cossim_decomposition(tvs["t0"]["blocks.0.mlp.weight"], tvs["t1"]["blocks.0.mlp.weight"]),
            tmp_path / "r.png",
        ),
        dr.plot_similarity_matrix(dr.layer_pairwise_dirsim(tvs)["blocks.0.mlp.weight"], list(tvs), tmp_path / "d.png"),
        dr.plot_projected_dirsim({"ta": [0.3, 0.4, 0.5], "dc": [0.5, 0.6, 0.7]}, list(tvs), tmp_path / "sub" / "p.png"),
        dr.plot_dirsim_vs_nai([0.2, 0.4, 0.6], [0.3, 0.5, 0.4], tmp_path / "s.png", labels=["a", "b", "c"]),
        dr.plot_dirsim_vs_nai([0.2, 0.2], [0.3, 0.3], tmp_path / "flat.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError):
        dr.plot_projected_dirsim({"ta": [0.1]}, list(tvs), tmp_path / "bad.png")
