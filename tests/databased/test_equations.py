"""The objectives' values and gradients against independent float64 computations written here.

AdaMerging's entropy (Yang et al. 2024 / MDA Eq. 7), MDA-AM's Eq. 6 (entropy + α ETF alignment + β Procrustes,
with Alg. 2's gradient routing: which parameters each term reaches), MOMA's Eq. 10; each on a small case, then
a one-step run of the method whose first loss (full batch) and first Adam step (−lr · sign of the gradient)
are checked against the same hand computation, so the wiring (merged weights, features, heads) is tested too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from databased_problems import Problem

from taskmerge.databased import adamerging, mda_am, moma
from taskmerge.databased.adamerging import entropy_loss
from taskmerge.databased.loop import LinearHead, tail_trend
from taskmerge.databased.mda_am import etf_targets, mda_am_loss
from taskmerge.databased.moma import moma_loss
from taskmerge.rotation import exp_rotation

D = torch.float64


def _mlp(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The toy encoder, by hand: l2(tanh(l1(x)))."""
    h = torch.tanh(x @ sd["l1.weight"].T + sd["l1.bias"])
    return h @ sd["l2.weight"].T + sd["l2.bias"]


def _entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    return -(p * torch.log(p)).sum(-1)


def _d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(D) for k, v in sd.items()}


def _heads64(p: Problem) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(h.weight.to(D), h.bias.to(D)) for h in p.heads]


# ------------------------------------------------------------------------------------------------ AdaMerging


def test_entropy_loss_is_the_sum_over_tasks_of_the_mean_shannon_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(7, c, generator=gen, dtype=D) for c in (2, 5, 3)]
    loss, parts = entropy_loss(logits, [1.0, 2.0, 0.5])
    by_hand = 0.0
    for z, s in zip(logits, (1.0, 2.0, 0.5)):
        p = np.exp(s * z.numpy())
        p /= p.sum(1, keepdims=True)
        by_hand += float(np.mean(-(p * np.log(p)).sum(1)))
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)
    assert sum(parts.values()) == pytest.approx(by_hand, rel=1e-12)


def test_adamerging_first_loss_and_step_match_the_hand_computation(toy: Problem) -> None:
    T, n, lam0, lr = len(toy.tasks), len(toy.inputs[0]), 0.3, 1e-3
    res = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs,
                     {"steps": 1, "batch_size": n, "init_lambda": lam0, "lr": lr, "progress": False}, encoder=toy.encoder)
    base, tasks, heads = _d(toy.base), [_d(t) for t in toy.tasks], _heads64(toy)
    names = list(res.info["lambdas"])  # one coefficient per task and tensor, in this order
    lam = torch.full((T, len(names)), lam0, dtype=D, requires_grad=True)
    merged = {k: base[k] + sum(lam[t, names.index(k)] * (tasks[t][k] - base[k]) for t in range(T)) for k in names}
    loss = sum(_entropy(_mlp(merged, x.data.to(D)) @ w.T + b).mean() for x, (w, b) in zip(toy.inputs, heads))
    assert res.history.loss[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, lam)
    moved = torch.tensor([res.info["lambdas"][k] for k in names], dtype=D).T - lam0  # Adam's first step: −lr·sign(g)
    big = grad.abs() > 1e-4
    assert int(big.sum()) > 4
    torch.testing.assert_close(moved[big], -lr * torch.sign(grad[big]), atol=lr * 1e-2, rtol=0)


# -------------------------------------------------------------------------------------------------- MDA-AM


def _mda_case(seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    d, classes = 4, (3, 2)
    feats = [torch.randn(6, d, generator=gen, dtype=D) for _ in classes]
    heads = [LinearHead(torch.randn(c, d, generator=gen, dtype=D), torch.randn(c, generator=gen, dtype=D)) for c in classes]
    targets = [torch.nn.functional.normalize(torch.randn(c, d, generator=gen, dtype=D), dim=-1) for c in classes]
    r_proc = [exp_rotation(torch.randn(d, d, generator=gen, dtype=D)) for _ in classes]
    skew = torch.randn(len(classes), d, d, generator=gen, dtype=D)
    return {"feats": feats, "heads": heads, "targets": targets, "r_proc": r_proc, "skew": skew}


def _mda_terms(feats, heads, rotations, targets, r_proc):
    """Eq. 7, Eq. 8, Eq. 9 by hand (no stop-gradient anywhere)."""
    ent = align = rot = 0.0
    for t, h in enumerate(feats):
        rh = h @ rotations[t].T
        z = rh @ heads[t].weight.T + heads[t].bias
        ent = ent + _entropy(z).mean()
        y = z.detach().argmax(-1)
        unit = rh / rh.norm(dim=-1, keepdim=True)
        align = align + ((unit - targets[t][y]) ** 2).sum(-1).mean()
        rot = rot + ((rotations[t] - r_proc[t]) ** 2).sum()
    return ent, align, rot


def test_mda_am_loss_value_is_eq6() -> None:
    c = _mda_case()
    rotations = exp_rotation(c["skew"])
    loss, parts, preds = mda_am_loss(c["feats"], c["heads"], rotations, c["targets"], c["r_proc"], alpha=0.8, beta=0.2)
    ent, align, rot = _mda_terms(c["feats"], c["heads"], rotations, c["targets"], c["r_proc"])
    assert parts["entropy"] == pytest.approx(float(ent), rel=1e-12)
    assert parts["align"] == pytest.approx(float(align), rel=1e-12)
    assert parts["rotation"] == pytest.approx(float(rot), rel=1e-12)
    assert float(loss) == pytest.approx(float(ent + 0.8 * align + 0.2 * rot), rel=1e-12)
    for t, h in enumerate(c["feats"]):  # predictions: the rotated logits' arg-max
        assert torch.equal(preds[t], (h @ rotations[t].T @ c["heads"][t].weight.T + c["heads"][t].bias).argmax(-1))


@pytest.mark.parametrize("routing", ["split", "joint"])
def test_mda_am_terms_reach_the_parameters_alg2_says(routing: str) -> None:
    """split (Alg. 2 lines 10–11): the features — hence λ — get the gradient of L_entropy only, the rotations
    that of α L_align + β L_rotation only; joint: each term reaches everything it depends on."""
    c = _mda_case(1)
    alpha, beta = 0.8, 0.2
    feats = [f.clone().requires_grad_(True) for f in c["feats"]]
    skew = c["skew"].clone().requires_grad_(True)
    loss, _, _ = mda_am_loss(feats, c["heads"], exp_rotation(skew), c["targets"], c["r_proc"], alpha=alpha, beta=beta,
                             routing=routing)
    got = torch.autograd.grad(loss, [*feats, skew])
    ent, align, rot = _mda_terms(feats, c["heads"], exp_rotation(skew), c["targets"], c["r_proc"])
    g_ent = torch.autograd.grad(ent, [*feats, skew], retain_graph=True)
    g_align = torch.autograd.grad(alpha * align, [*feats, skew], retain_graph=True)
    g_rot = torch.autograd.grad(beta * rot, [*feats, skew], allow_unused=True)
    g_rot = [torch.zeros_like(x) if g is None else g for g, x in zip(g_rot, [*feats, skew])]
    n = len(feats)
    for i in range(n):  # features (λ's only path)
        expect = g_ent[i] if routing == "split" else g_ent[i] + g_align[i]
        torch.testing.assert_close(got[i], expect, atol=1e-12, rtol=1e-10)
        assert float(g_align[i].abs().max()) > 1e-3  # L_align does depend on the features: the split is real
    expect = g_align[n] + g_rot[n] if routing == "split" else g_ent[n] + g_align[n] + g_rot[n]
    torch.testing.assert_close(got[n], expect, atol=1e-12, rtol=1e-10)
    assert float(g_ent[n].abs().max()) > 1e-3  # L_entropy does depend on R


def test_mda_am_first_loss_matches_the_hand_computation(toy: Problem) -> None:
    T, n = len(toy.tasks), len(toy.inputs[0])
    opts = {"steps": 1, "batch_size": n, "init_lambda": 0.3, "parameter_alignment": False, "alpha": 0.8, "beta": 0.2,
            "progress": False}
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, opts, encoder=toy.encoder)
    base, tasks, heads = _d(toy.base), [_d(t) for t in toy.tasks], _heads64(toy)
    merged = {k: base[k] + 0.3 * sum(tasks[t][k] - base[k] for t in range(T)) for k in base}
    targets = [m.to(D) for m in etf_targets(toy.heads)]
    eye = torch.eye(5, dtype=D)
    r_proc = res.info["procrustes_rotations"].to(D)  # the step-0 refresh (next one at step 25)
    feats = [_mlp(merged, x.data.to(D)) for x in toy.inputs]
    ent, align, rot = _mda_terms(feats, [LinearHead(w, b) for w, b in heads], torch.stack([eye] * T), targets, r_proc)
    assert res.history.parts["entropy"][0] == pytest.approx(float(ent), rel=1e-5)
    assert res.history.parts["align"][0] == pytest.approx(float(align), rel=1e-5)
    assert res.history.parts["rotation"][0] == pytest.approx(float(rot), rel=1e-5)
    assert res.history.loss[0] == pytest.approx(float(ent + 0.8 * align + 0.2 * rot), rel=1e-5)
    assert float(rot) > 1e-3  # R_proc is not the identity: the term is exercised


# ---------------------------------------------------------------------------------------------------- MOMA


def test_moma_loss_is_eq10() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = [torch.randn(5, 3, generator=gen, dtype=D) for _ in range(2)]
    teach = [torch.randn(5, 3, generator=gen, dtype=D) for _ in range(2)]
    a = torch.eye(3, dtype=D) + 0.3 * torch.randn(2, 3, 3, generator=gen, dtype=D)
    pen = torch.tensor(7.5, dtype=D)
    loss, parts = moma_loss(feats, teach, a, alpha=0.7, mask_penalty=pen, beta=1e-3)
    align = sum(np.mean(np.sqrt(((f.numpy() @ m.numpy().T - y.numpy()) ** 2).sum(1))) for f, y, m in zip(feats, teach, a))
    ortho = sum(np.sqrt(((m.numpy().T @ m.numpy() - np.eye(3)) ** 2).sum()) for m in a)
    assert parts["align"] == pytest.approx(align, rel=1e-12)
    assert parts["ortho"] == pytest.approx(ortho, rel=1e-12)
    assert float(loss) == pytest.approx(align + 0.7 * ortho + 1e-3 * 7.5, rel=1e-12)
    loss, parts = moma_loss(feats, teach, a, alpha=0.0, distance="squared")
    squared = sum(np.mean(((f.numpy() @ m.numpy().T - y.numpy()) ** 2).sum(1)) for f, y, m in zip(feats, teach, a))
    assert float(loss) == pytest.approx(squared, rel=1e-12) and parts["ortho"] == 0.0


def test_moma_first_loss_and_step_match_eq10_by_hand(toy: Problem) -> None:
    T, n, lam, init = len(toy.tasks), len(toy.inputs[0]), 0.5, 3.0
    res = moma(toy.base, toy.tasks, toy.heads, toy.inputs,
               {"steps": 1, "batch_size": n, "lam": lam, "mask_init": init, "beta": 1e-3, "progress": False},
               encoder=toy.encoder)
    base, tasks = _d(toy.base), [_d(t) for t in toy.tasks]
    tau = {k: sum(tasks[t][k] - base[k] for t in range(T)) for k in base}  # Task Arithmetic's τ_agg: the sum
    s = {k: torch.full_like(v, init, requires_grad=True) for k, v in base.items()}
    a = torch.eye(5, dtype=D).repeat(T, 1, 1).requires_grad_(True)
    merged = {k: base[k] + lam * torch.sigmoid(s[k]) * tau[k] for k in base}
    align = sum(torch.sqrt(((_mlp(merged, x.data.to(D)) @ a[t].T - _mlp(tasks[t], x.data.to(D))) ** 2).sum(1)).mean()
                for t, x in enumerate(toy.inputs))
    ortho = sum(torch.sqrt(((a[t].T @ a[t] - torch.eye(5, dtype=D)) ** 2).sum() + 1e-300) for t in range(T))
    mask_l2 = sum((torch.sigmoid(v) ** 2).sum() for v in s.values())
    loss = align + 1.0 * ortho + 1e-3 * mask_l2
    assert res.history.loss[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert res.history.parts["mask_l2"][0] == pytest.approx(float(mask_l2.detach()), rel=1e-6)
    g_a, *g_s = torch.autograd.grad(loss, [a, *s.values()])
    moved = res.info["matrices"].to(D) - torch.eye(5, dtype=D)  # first Adam step: −lr·sign(g), lr 5e-4 (NLP)
    big = g_a.abs() > 1e-4
    torch.testing.assert_close(moved[big], -5e-4 * torch.sign(g_a[big]), atol=5e-6, rtol=0)
    # the mask moved by −0.1·sign(∂L/∂S): compare through the deployed (soft-masked) weights
    for k, g in zip(s, g_s):
        step = init - 0.1 * torch.sign(g)
        expect = base[k] + lam * torch.sigmoid(step) * tau[k]
        keep = g.abs() > 1e-7
        torch.testing.assert_close(res.state_dict[k].to(D)[keep], expect[keep], atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- convergence flag


def test_tail_trend_slope_and_flag() -> None:
    gen = np.random.default_rng(0)
    steps = np.arange(1000)
    falling = 10 - 0.01 * steps + 0.05 * gen.standard_normal(1000)
    out = tail_trend(falling.tolist())
    window = falling[-100:]
    slope, _ = np.polyfit(np.arange(100), window, 1)
    resid = window - np.polyval(np.polyfit(np.arange(100), window, 1), np.arange(100))
    se = math.sqrt((resid ** 2).sum() / 98) / math.sqrt(((np.arange(100) - 49.5) ** 2).sum())
    assert out["window"] == 100
    assert out["slope"] == pytest.approx(slope, rel=1e-9) and out["slope_se"] == pytest.approx(se, rel=1e-9)
    assert out["still_falling"] is True and out["tail_change"] == pytest.approx(99 * slope, rel=1e-9)
    assert out["total_change"] == pytest.approx(window.mean() - falling[:100].mean(), rel=1e-9)
    flat = (5 + 0.05 * gen.standard_normal(1000)).tolist()
    assert tail_trend(flat)["still_falling"] is False
    assert tail_trend([3.0, 2.0, 1.0])["still_falling"] is None
