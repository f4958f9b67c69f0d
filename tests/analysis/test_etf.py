"""MDA diagnostics against closed forms: exact simplex ETFs built by hand (deviation 0, cosine 1, invariant
to rotation and scale), orthonormal directions (deviation 1/√C, cosine √((C−1)/C)), the ETF-subspace
energy from an explicit projector, and the Pearson correlation against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.analysis.etf import (
    delta_etf,
    etf_correlation,
    etf_cosine,
    etf_deviation,
    etf_geometry,
    etf_subspace_energy,
    layer_etf_energy,
    normalized_gram,
    plot_etf_correlation,
    plot_etf_gram,
    task_etf_geometry,
)
from taskmerge.etf import simplex_etf

PNG = b"\x89PNG\r\n\x1a\n"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hand_etf(c: int, d: int, seed: int) -> torch.Tensor:
    """Rows e_i − 1/C in R^C (a simplex ETF up to scale), embedded in R^d by a random isometry."""
    rows = torch.eye(c, dtype=torch.float64) - 1.0 / c
    iso = torch.linalg.qr(_rand(d, c, seed=seed))[0]  # d×C, orthonormal columns
    return rows @ iso.T


@settings(max_examples=30, deadline=None)
@given(c=st.integers(2, 12), extra=st.integers(0, 6), seed=st.integers(0, 100))
def test_an_exact_simplex_etf_has_zero_deviation_whatever_its_rotation_and_scale(c, extra, seed):
    d = c + extra
    scale = torch.rand(c, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    w = _hand_etf(c, d, seed) * scale
    geo = etf_geometry(w)
    assert geo.deviation == pytest.approx(0.0, abs=1e-10)
    assert geo.cosine == pytest.approx(1.0, abs=1e-10)
    assert geo.mean_offdiag == pytest.approx(-1.0 / (c - 1), abs=1e-10)
    assert geo.std_offdiag == pytest.approx(0.0, abs=1e-7)
    assert geo.target_offdiag == pytest.approx(-1.0 / (c - 1))


@pytest.mark.parametrize("c", [2, 3, 7])
def test_orthonormal_directions_have_the_closed_form_deviation(c):
    """G = I against G* = (C I − 11ᵀ)/(C−1): ‖I − G*‖/‖G*‖ = 1/√C and cos_F(I, G*) = √((C−1)/C)."""
    w = torch.linalg.qr(_rand(c + 3, c, seed=c))[0].T
    assert etf_deviation(w) == pytest.approx(1 / math.sqrt(c), rel=1e-10)
    assert etf_cosine(w) == pytest.approx(math.sqrt((c - 1) / c), rel=1e-10)
    gains = delta_etf({"a": _hand_etf(c, c + 1, 0), "b": _hand_etf(c, c, 1)}, {"a": w, "b": w})
    assert gains["a"] == pytest.approx(1 - math.sqrt((c - 1) / c), rel=1e-9)
    assert gains["mean"] == pytest.approx(1 - math.sqrt((c - 1) / c), rel=1e-9)


def test_gram_centring_and_per_task_geometry():
    x = _rand(5, 8, seed=1)
    gram = normalized_gram(x)
    unit = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(gram, unit @ unit.T)
    shifted = _hand_etf(4, 6, 2) + _rand(1, 6, seed=3)  # an ETF translated away from the origin
    assert etf_deviation(shifted) > 1e-3
    assert etf_deviation(shifted, centre=True) == pytest.approx(0.0, abs=1e-10)
    per_task = task_etf_geometry([_hand_etf(3, 5, 4), x])
    assert set(per_task) == {"task0", "task1"} and per_task["task0"].deviation < per_task["task1"].deviation
    with pytest.raises(ValueError):
        etf_geometry(x[:1])
    with pytest.raises(ValueError):
        delta_etf({"a": x}, {"b": x})


def test_simplex_etf_of_the_method_passes_the_diagnostic():
    assert etf_deviation(simplex_etf(6, 9, seed=2)) == pytest.approx(0.0, abs=1e-10)
    assert etf_deviation(simplex_etf(6, 5)) == pytest.approx(0.0, abs=1e-10)  # d = C − 1 (SVD branch)


def test_correlation_matches_numpy():
    x = [0.1, 0.3, -0.2, 0.5, 0.0]
    y = [1.0, 2.5, -1.0, 3.0, 0.2]
    assert etf_correlation(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), rel=1e-12)


@pytest.mark.parametrize("side", ["out", "in"])
def test_etf_subspace_energy_against_an_explicit_projector(side):
    c, tau = 4, _rand(9, 7, seed=5)
    d = 9 if side == "out" else 7
    w = simplex_etf(c, d, seed=3)
    pi = w.T @ w * (c - 1) / c  # Π_S = (C−1)/C · P_ETF
    inside = pi @ tau if side == "out" else tau @ pi
    outside = tau - inside
    energy = etf_subspace_energy(tau, c, side=side, seed=3)
    total = float(tau.norm() ** 2)
    assert energy.retained == pytest.approx(float(inside.norm() ** 2) / total, rel=1e-10)
    assert energy.outside == pytest.approx(float(outside.norm() ** 2), rel=1e-10)
    assert energy.theorem2 == pytest.approx(float(outside.norm() ** 2) / math.sqrt(total), rel=1e-10)
    assert not energy.scalar
    scalar = etf_subspace_energy(tau, 50, side=side)  # C − 1 >= d: P_ETF = C/(C−1)·I keeps everything
    assert scalar.scalar and scalar.retained == pytest.approx(1.0) and scalar.outside == pytest.approx(0.0, abs=1e-20)
    zero = etf_subspace_energy(torch.zeros(9, 7), c, side=side)
    assert zero.retained == 0.0 and zero.theorem2 == 0.0


def test_layer_etf_energy_and_plots(tmp_path):
    tasks = {t: {"w": _rand(6, 5, seed=s), "b": _rand(5, seed=s)} for t, s in (("A", 6), ("B", 7))}
    merged = {"w": tasks["A"]["w"] + tasks["B"]["w"], "b": torch.zeros(5)}
    report = layer_etf_energy(tasks, merged, num_classes=3)
    assert set(report) == {"w"} and set(report["w"].tasks) == {"A", "B"}
    assert report["w"].merged == etf_subspace_energy(merged["w"], 3)
    assert report["w"].tasks["A"] == etf_subspace_energy(tasks["A"]["w"], 3)
    assert layer_etf_energy([tasks["A"]], num_classes=3)["w"].merged is None
    paths = [
        plot_etf_gram(_rand(5, 8, seed=8), tmp_path / "gram.png"),
        plot_etf_correlation([0.1, 0.2, 0.4], [0.5, 0.7, 1.4], tmp_path / "f1" / "c.png", labels=["8", "14", "20"]),
        plot_etf_correlation([0.1], [0.5], tmp_path / "single.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
