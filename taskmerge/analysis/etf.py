"""MDA diagnostics: how far directions are from the simplex-ETF geometry, and what the ETF projection keeps.

"From Coefficients to Directions: Rethinking Model Merging with Directional Alignment" (MDA), Fig. 1 (right),
§4.1, Theorem 2.

**ETF deviation of a set of directions** (Fig. 1 right). The paper plots the gain in "ETF deviation"
``Δ_X = (1/T) Σ_t cos_F(W_X^t, W_ETF^t)`` against the accuracy gain of MDA over TSV-M, without defining
``W^t`` operationally (MDA spec flag A15). Reproducible reading (second MDA spec, §9): for task t,
``W^t`` is the Gram matrix of its C_t normalised class-mean features under the merged encoder and
``W_ETF^t`` the simplex-ETF Gram ``C_t/(C_t−1)·I − 11ᵀ/(C_t−1)`` (1 on the diagonal, −1/(C_t−1) off it).
:func:`etf_geometry` returns, for one set of directions (rows), that cosine ``cos_F(G, G_ETF)`` and the
relative deviation ``‖G − G_ETF‖_F / ‖G_ETF‖_F`` (0 iff the directions form an exact simplex ETF), plus the
mean and spread of the off-diagonal cosines. ``centre=True`` subtracts the mean direction first (the
neural-collapse convention of centring class means by the global mean); the default follows the spec and
does not centre. :func:`delta_etf` gives the per-task and mean difference of the cosine between two
merges (MDA vs TSV-M), and :func:`etf_correlation` its Pearson correlation with the accuracy gains.

**What the ETF projection keeps, per layer** (Theorem 2's quantity). For an update τ and the projector
``P_ETF = C/(C−1)·Π_S`` of :mod:`taskmerge.etf` on the chosen side (``"in"``: columns, MDA-TA's default;
``"out"``: rows): the share of the energy inside the ETF subspace ``‖Π_S τ‖²/‖τ‖²``, the energy outside
``‖(I − Π_S) τ‖²`` and Theorem 2's ``‖τ(I − Π_S)‖²/‖τ‖_F``, which the projection removes. With ``C − 1 >= d``
(SVD branch) ``Π_S = I`` and nothing is removed.

Per-layer wrappers take task vectors as ``{task: {tensor name: Δ}}`` or a sequence of state dicts (as
:mod:`taskmerge.analysis.direction`). Computation is in float64. Plot helpers write PNGs (Agg canvas).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from taskmerge.analysis.plotting import new_figure, save_figure
from taskmerge.analysis.direction import TaskVectors, matrix_layers
from taskmerge.analysis.metrics import pearson_r
from taskmerge.etf import etf_gram, etf_projector

__all__ = [
    "ETFDeviation",
    "ETFEnergy",
    "LayerETFEnergy",
    "normalized_gram",
    "etf_geometry",
    "etf_deviation",
    "etf_cosine",
    "task_etf_geometry",
    "delta_etf",
    "etf_correlation",
    "etf_subspace_energy",
    "layer_etf_energy",
    "plot_etf_gram",
    "plot_etf_correlation",
]


# --------------------------------------------------------------------------------------------------
# Directions (feature space)
# --------------------------------------------------------------------------------------------------


def normalized_gram(directions: torch.Tensor, *, centre: bool = False) -> torch.Tensor:
    """Gram matrix of the row directions after normalising each row (zero rows stay zero), float64."""
    if directions.ndim != 2:
        raise ValueError(f"expected directions as a (C, d) matrix, got shape {tuple(directions.shape)}")
    x = directions.detach().double()
    if centre:
        x = x - x.mean(dim=0, keepdim=True)
    norms = x.norm(dim=1, keepdim=True)
    x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    return x @ x.T


@dataclass(frozen=True)
class ETFDeviation:
    """How one set of C directions compares with the simplex ETF.

    ``cosine``: ``cos_F(G, G_ETF)`` (1 for an exact ETF); ``deviation``: ``‖G − G_ETF‖_F / ‖G_ETF‖_F`` (0 for
    an exact ETF); ``mean_offdiag`` / ``std_offdiag``: the pairwise cosines; ``target_offdiag``: −1/(C−1).
    """

    num_classes: int
    cosine: float
    deviation: float
    mean_offdiag: float
    std_offdiag: float

    @property
    def target_offdiag(self) -> float:
        return -1.0 / (self.num_classes - 1)


def etf_geometry(directions: torch.Tensor, *, centre: bool = False) -> ETFDeviation:
    """Compare the rows of ``directions`` (C, d), C >= 2, with the simplex-ETF geometry."""
    c = directions.shape[0]
    if c < 2:
        raise ValueError(f"the ETF geometry needs at least 2 directions, got {c}")
    gram = normalized_gram(directions, centre=centre)
    target = etf_gram(c, device=gram.device)
    gn = gram.norm()
    cosine = float((gram * target).sum() / (gn * target.norm())) if gn > 0 else 0.0
    off = gram[~torch.eye(c, dtype=torch.bool, device=gram.device)]
    return ETFDeviation(
        num_classes=c,
        cosine=cosine,
        deviation=float((gram - target).norm() / target.norm()),
        mean_offdiag=float(off.mean()),
        std_offdiag=float(off.std(unbiased=False)),
    )


def etf_deviation(directions: torch.Tensor, *, centre: bool = False) -> float:
    """``‖G − G_ETF‖_F / ‖G_ETF‖_F`` for the normalised row directions (0 iff they form a simplex ETF)."""
    return etf_geometry(directions, centre=centre).deviation


def etf_cosine(directions: torch.Tensor, *, centre: bool = False) -> float:
    """``cos_F(G, G_ETF)``, the paper's per-task "ETF deviation" cosine (Fig. 1 right)."""
    return etf_geometry(directions, centre=centre).cosine


def _named(values: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(values, Mapping):
        return {str(k): v for k, v in values.items()}
    return {f"task{i}": v for i, v in enumerate(values)}


def task_etf_geometry(
    class_means: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], *, centre: bool = False
) -> dict[str, ETFDeviation]:
    """``{task: ETFDeviation}`` for each task's (C_t, d) class-mean features."""
    return {task: etf_geometry(means, centre=centre) for task, means in _named(class_means).items()}


def delta_etf(
    merged_means: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    reference_means: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    centre: bool = False,
) -> dict[str, float]:
    """Fig. 1 (right): per task ``cos_F(W_merged^t, W_ETF^t) − cos_F(W_ref^t, W_ETF^t)``, and their mean under
    the key ``"mean"`` (``Δ_etf = Δ_Ours − Δ_TSV`` with MDA as ``merged`` and TSV-M as ``reference``)."""
    merged = _named(merged_means)
    reference = _named(reference_means)
    if set(merged) != set(reference):
        raise ValueError(f"the two merges cover different tasks: {sorted(merged)} vs {sorted(reference)}")
    out = {t: etf_cosine(merged[t], centre=centre) - etf_cosine(reference[t], centre=centre) for t in merged}
    out["mean"] = sum(out.values()) / len(merged) if merged else 0.0
    return out


def etf_correlation(delta_etf_values: Sequence[float], delta_accuracy: Sequence[float]) -> float:
    """Pearson correlation between ETF-deviation gains and accuracy gains (Fig. 1 right)."""
    return pearson_r(list(delta_etf_values), list(delta_accuracy))


# --------------------------------------------------------------------------------------------------
# Updates (parameter space)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ETFEnergy:
    """Energy of an update relative to the ETF subspace S of one side.

    ``retained``: ``‖Π_S τ‖²/‖τ‖²`` (1 when ``Π_S = I``; 0 for a zero update); ``outside``: ``‖(I − Π_S) τ‖²``;
    ``theorem2``: ``‖(I − Π_S) τ‖² / ‖τ‖_F`` (MDA Theorem 2); ``scalar``: whether ``P_ETF`` is ``C/(C−1)·I``.
    """

    retained: float
    outside: float
    theorem2: float
    scalar: bool


def etf_subspace_energy(
    update: torch.Tensor,
    num_classes: int,
    *,
    side: Literal["in", "out"] = "in",
    seed: int = 0,
) -> ETFEnergy:
    """:class:`ETFEnergy` of a 2-D update for the ETF of ``num_classes`` classes on ``side`` (seed as MDA-TA)."""
    if update.ndim != 2:
        raise ValueError(f"expected a 2-D update, got shape {tuple(update.shape)}")
    x = update.detach().double()
    dim = x.shape[0] if side == "out" else x.shape[1]
    proj = etf_projector(dim, num_classes, seed=seed, device=x.device)
    total = float((x * x).sum())
    outside = float((proj.residual(x, side) ** 2).sum())
    retained = (total - outside) / total if total > 0 else 0.0
    return ETFEnergy(
        retained=retained,
        outside=outside,
        theorem2=outside / math.sqrt(total) if total > 0 else 0.0,
        scalar=proj.is_scalar,
    )


@dataclass(frozen=True)
class LayerETFEnergy:
    """Per-layer :class:`ETFEnergy` of every task vector and, if given, of the merged update."""

    tasks: dict[str, ETFEnergy]
    merged: ETFEnergy | None


def layer_etf_energy(
    task_vectors: TaskVectors,
    merged: Mapping[str, torch.Tensor] | None = None,
    *,
    num_classes: int,
    side: Literal["in", "out"] = "in",
    seed: int = 0,
    layers: Iterable[str] | None = None,
) -> dict[str, LayerETFEnergy]:
    """``{layer: LayerETFEnergy}`` for every 2-D tensor the tasks have (and the merge, when given)."""
    if isinstance(task_vectors, Mapping):
        named = dict(task_vectors)
    else:
        named = {f"task{i}": tv for i, tv in enumerate(task_vectors)}
    out: dict[str, LayerETFEnergy] = {}
    for name in matrix_layers(named, layers):
        tasks = {str(t): etf_subspace_energy(tv[name], num_classes, side=side, seed=seed) for t, tv in named.items()}
        m = None
        if merged is not None:
            if name not in merged:
                raise KeyError(f"the merged update has no tensor {name!r}")
            m = etf_subspace_energy(merged[name], num_classes, side=side, seed=seed)
        out[name] = LayerETFEnergy(tasks, m)
    return out


# --------------------------------------------------------------------------------------------------
# Plots (PNG, Agg canvas)
# --------------------------------------------------------------------------------------------------


def plot_etf_gram(
    directions: torch.Tensor, path: str | Path, *, centre: bool = False, title: str | None = None
) -> Path:
    """Side by side: the normalised Gram of the directions and the simplex-ETF Gram, with the deviation."""
    gram = normalized_gram(directions, centre=centre).cpu()
    target = etf_gram(gram.shape[0])
    geo = etf_geometry(directions, centre=centre)
    fig = new_figure(9.0, 4.0)
    for k, (mat, label) in enumerate([(gram, "measured Gram"), (target, "simplex ETF Gram")]):
        ax = fig.add_subplot(1, 2, k + 1)
        image = ax.imshow(mat.numpy(), cmap="coolwarm", vmin=-1.0, vmax=1.0)
        ax.set_title(label)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title or f"cos_F = {geo.cosine:.3f}, relative deviation = {geo.deviation:.3f}")
    return save_figure(fig, path)


def plot_etf_correlation(
    delta_etf_values: Sequence[float],
    delta_accuracy: Sequence[float],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Fig. 1 (right): accuracy gain against ETF-deviation gain, with the least-squares line and Pearson r."""
    x = torch.tensor(list(delta_etf_values), dtype=torch.float64)
    y = torch.tensor(list(delta_accuracy), dtype=torch.float64)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x.numpy(), y.numpy())
    for i, label in enumerate(labels or []):
        ax.annotate(str(label), (float(x[i]), float(y[i])), fontsize=7)
    heading = title or "accuracy gain vs ETF-deviation gain"
    if x.numel() >= 2 and float(x.var()) > 0 and float(y.var()) > 0:
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        xs = torch.linspace(float(x.min()), float(x.max()), 2, dtype=torch.float64)
        ax.plot(xs.numpy(), (float(y.mean()) + slope * (xs - x.mean())).numpy(), color="grey", lw=1)
        heading += f" (r = {etf_correlation(x.tolist(), y.tolist()):.2f})"
    ax.set_xlabel("Δ_etf")
    ax.set_ylabel("Δ accuracy")
    ax.set_title(heading)
    return save_figure(fig, path)
