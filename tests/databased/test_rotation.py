"""SO(d) parametrisations and the closed-form orthogonal Procrustes solution (taskmerge.rotation)."""

from __future__ import annotations

import math

import pytest
import torch

from taskmerge.rotation import (
    Rotation,
    is_rotation,
    nearest_rotation,
    procrustes,
    procrustes_objective,
)


def _random_rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("parametrization", ["exp", "cayley"])
def test_rotation_stays_in_so_d_during_and_after_training(parametrization: str) -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    target = _random_rotation(d, gen).float()
    x = torch.randn(40, d, generator=gen)
    y = x @ target.T
    rot = Rotation(d, parametrization)
    assert torch.equal(rot.matrix(), torch.eye(d))
    opt = torch.optim.Adam(rot.parameters(), lr=0.05)
    first = None
    for step in range(300):
        loss = procrustes_objective(rot(), x, y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            assert is_rotation(rot.matrix(), 1e-5)
    r = rot.matrix()
    assert is_rotation(r, 1e-5)  # RᵀR = I and det R = +1 to 1e-5
    assert float(procrustes_objective(r, x, y)) < 1e-2 * first


def test_stacked_rotations() -> None:
    rot = Rotation(4, count=3)
    with torch.no_grad():
        rot.weight.normal_()
    r = rot.matrix()
    assert r.shape == (3, 4, 4) and is_rotation(r, 1e-5)


def test_procrustes_over_o_d_matches_scipy() -> None:
    from scipy.linalg import orthogonal_procrustes  # scipy: a test dependency (pyproject's test extra)
    gen = torch.Generator().manual_seed(1)
    for d in (2, 3, 7):
        x = torch.randn(30, d, generator=gen, dtype=torch.float64)
        y = torch.randn(30, d, generator=gen, dtype=torch.float64)
        ours = procrustes(x, y, proper=False)
        ref, _ = orthogonal_procrustes(x.numpy(), y.numpy())  # argmin ‖X Q − Y‖: our row-side solution Rᵀ
        torch.testing.assert_close(ours.T, torch.from_numpy(ref), atol=1e-8, rtol=0)


def test_procrustes_recovers_a_rotation_exactly() -> None:
    gen = torch.Generator().manual_seed(2)
    r = _random_rotation(5, gen)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(procrustes(x, x @ r.T), r, atol=1e-10, rtol=0)


def test_procrustes_so2_matches_a_dense_angle_search() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(12, 2, generator=gen, dtype=torch.float64)
        y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
        r = procrustes(x, y)
        angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
        c, s = torch.cos(angles), torch.sin(angles)
        # ‖X Rᵀ − Y‖² for every angle at once
        rx0 = x[:, 0:1] * c - x[:, 1:2] * s
        rx1 = x[:, 0:1] * s + x[:, 1:2] * c
        obj = ((rx0 - y[:, 0:1]) ** 2 + (rx1 - y[:, 1:2]) ** 2).sum(0)
        best = int(obj.argmin())
        assert is_rotation(r, 1e-10)
        assert float(procrustes_objective(r, x, y)) <= float(obj[best]) + 1e-9
        assert abs(math.atan2(float(r[1, 0]), float(r[0, 0])) % (2 * math.pi) - float(angles[best])) < 1e-3


def test_procrustes_so3_beats_random_search_and_local_optimisation() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(15, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)) + 0.3 * torch.randn(15, 3, generator=gen, dtype=torch.float64)
    r = procrustes(x, y)
    assert is_rotation(r, 1e-10)
    ours = float(procrustes_objective(r, x, y))
    # dense random search over SO(3) (uniform quaternions) ...
    q = torch.randn(50_000, 4, generator=gen, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, i, j, k = q.unbind(1)
    rs = torch.stack([
        torch.stack([1 - 2 * (j * j + k * k), 2 * (i * j - k * w), 2 * (i * k + j * w)], -1),
        torch.stack([2 * (i * j + k * w), 1 - 2 * (i * i + k * k), 2 * (j * k - i * w)], -1),
        torch.stack([2 * (i * k - j * w), 2 * (j * k + i * w), 1 - 2 * (i * i + j * j)], -1),
    ], -2)
    objs = ((torch.einsum("nij,pj->npi", rs, x) - y) ** 2).sum((1, 2))
    assert ours <= float(objs.min()) + 1e-9
    # ... refined by gradient descent on the exp parametrisation from the best sample
    best = rs[int(objs.argmin())]
    rot = Rotation(3, dtype=torch.float64)
    opt = torch.optim.Adam(rot.parameters(), lr=0.01)
    for _ in range(400):
        loss = procrustes_objective(rot() @ best, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ours <= float(procrustes_objective(rot.matrix() @ best, x, y)) + 1e-7
    assert float(procrustes_objective(rot.matrix() @ best, x, y)) - ours < 1e-4  # the search finds the same optimum


def test_proper_and_improper_solutions_differ_on_a_reflection() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    improper = procrustes(x, y, proper=False)
    assert float(torch.linalg.det(improper)) == pytest.approx(-1.0)
    assert float(procrustes_objective(improper, x, y)) < 1e-18
    proper = procrustes(x, y)
    assert is_rotation(proper, 1e-10)


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_rank_deficient_procrustes_picks_the_optimum_closest_to_identity(n: int) -> None:
    gen = torch.Generator().manual_seed(6 + n)
    d = 6
    x = torch.randn(max(n, 1), d, generator=gen, dtype=torch.float64)[:n]
    y = torch.randn(max(n, 1), d, generator=gen, dtype=torch.float64)[:n]
    r_id = procrustes(x, y, completion="identity")
    r_svd = procrustes(x, y, completion="svd")
    assert is_rotation(r_id, 1e-10) and is_rotation(r_svd, 1e-10)
    f_id, f_svd = float(procrustes_objective(r_id, x, y)), float(procrustes_objective(r_svd, x, y))
    assert f_id == pytest.approx(f_svd, abs=1e-9)  # both optimal
    eye = torch.eye(d, dtype=torch.float64)
    assert float((r_id - eye).norm()) <= float((r_svd - eye).norm()) + 1e-9
    if n == 0:
        torch.testing.assert_close(r_id, eye)
    # any other optimum: compose with a rotation of the orthogonal complement of span(X)
    if 0 < n < d - 1:
        q, _ = torch.linalg.qr(torch.cat([x.T, torch.randn(d, d - n, generator=gen, dtype=torch.float64)], 1))
        comp = q[:, n:]
        for _ in range(5):
            k = _random_rotation(d - n, gen)
            other = r_id @ (eye - comp @ comp.T + comp @ k @ comp.T)
            assert float(procrustes_objective(other, x, y)) == pytest.approx(f_id, abs=1e-9)
            assert float((r_id - eye).norm()) <= float((other - eye).norm()) + 1e-9


def test_nearest_rotation_beats_random_rotations() -> None:
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    r = nearest_rotation(m)
    assert is_rotation(r, 1e-10)
    for _ in range(200):
        q = _random_rotation(4, gen)
        assert float((r - m).norm()) <= float((q - m).norm()) + 1e-12
