"""AlignMerge diagnostics: SAI, overlap scores, per-layer summaries and the paper's figures.

"Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging" (AlignMerge), §3, App. B.

The algebra the method shares with these diagnostics (projection coefficients, ``s_i^r``, η, the cross-influence
ξ in its two readings and two projection orders, the full coefficient ξ̃) lives in
:mod:`taskmerge.subspace_alignment` and is re-exported here. On top of it:

* **Subspace-Alignment Index** (Eq. 8): ``SAI_i^r = |ξ̃_i^r − 1|``; the signed ``ξ̃_i^r − 1`` is what Fig. 3
  plots against the component index r for a merge (WA, TA, TIES, AlignMerge, …);
* **overlap heatmap** (Fig. 1b / 6): ``H[p, q] = (u_A^p·u_B^q)² + (v_A^p·v_B^q)²`` over the top-k singular
  vectors, and the rank-one alignment of Fig. 10.

Per-layer wrappers take task vectors as ``{task: {tensor name: Δ}}`` or a sequence of state dicts (as
:mod:`taskmerge.analysis.direction`) and a merged ``{tensor name: Δ}``; they compute in float64 by default.
Every ``plot_*`` helper writes a PNG with matplotlib's Agg canvas and returns the path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from taskmerge import linalg
from taskmerge.analysis.direction import TaskVectors, matrix_layers
from taskmerge.analysis.plotting import new_figure, save_figure
from taskmerge.subspace_alignment import (
    DEFAULT_EPS,
    MergeDecomposition,
    ProjectionOrder,
    XiMode,
    cross_influence,
    decompose_merge,
    eta,
    full_coefficient,
    proj_coefficient,
    subspace_projections,
)

__all__ = [
    "XiMode",
    "ProjectionOrder",
    "DEFAULT_EPS",
    "MergeDecomposition",
    "LayerAlignment",
    "proj_coefficient",
    "subspace_projections",
    "decompose_merge",
    "eta",
    "cross_influence",
    "full_coefficient",
    "sai",
    "sai_curves",
    "subspace_overlap",
    "rank_one_alignment",
    "layer_alignment",
    "plot_cross_influence",
    "plot_sai_curves",
    "plot_subspace_overlap",
]


# --------------------------------------------------------------------------------------------------
# Single layer
# --------------------------------------------------------------------------------------------------


def sai(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "two_step",
    order: ProjectionOrder = "column_first",
    signed: bool = False,
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 8's ``SAI[i, r] = |ξ̃_i^r − 1|`` (K, R); ``signed=True`` gives ``ξ̃_i^r − 1`` (Fig. 3)."""
    dev = full_coefficient(deltas, merged, mode=mode, order=order, dec=dec, eps=eps) - 1.0
    return dev if signed else dev.abs()


def sai_curves(
    deltas: torch.Tensor,
    merges: Mapping[str, torch.Tensor],
    *,
    mode: XiMode = "two_step",
    order: ProjectionOrder = "column_first",
    reduce: Literal["mean", "median", "none"] = "mean",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Signed SAI over the singular index for several merges of the same tasks (Fig. 3).

    Returns ``{merge name: (R,)}`` (the mean or median over tasks) or ``(K, R)`` with ``reduce="none"``.
    """
    work = deltas.to(dtype)
    out: dict[str, torch.Tensor] = {}
    for name, merged in merges.items():
        signed = sai(work, merged.to(dtype), mode=mode, order=order, signed=True)
        if reduce == "mean":
            signed = signed.mean(dim=0)
        elif reduce == "median":
            signed = signed.median(dim=0).values
        out[name] = signed
    return out


def subspace_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 32) -> torch.Tensor:
    """Fig. 1(b)/6 heatmap ``H[p, q] = (u_A^p·u_B^q)² + (v_A^p·v_B^q)²`` over the top-k singular vectors
    (k×k, clipped to the rank). ``H.sum() = ‖U_AᵀU_B‖_F² + ‖V_AᵀV_B‖_F²``, the paper's score S."""
    da = linalg.truncated_svd(a, k)
    db = linalg.truncated_svd(b, k)
    return (da.U.T @ db.U) ** 2 + (da.Vh @ db.Vh.T) ** 2


def rank_one_alignment(a: torch.Tensor, b: torch.Tensor, k: int = 4) -> dict[str, torch.Tensor]:
    """Fig. 10: alignment of the r-th rank-one components of two updates, r = 1..k.

    ``"left"`` is ``‖M_Aᵀ M_B‖_F``-style ``|u_A^r·u_B^r|`` (what the paper's formula measures for unit rank-one
    M, spec flag B2); ``"both"`` is ``|⟨M_A^r, M_B^r⟩_F| = |u_A^r·u_B^r| |v_A^r·v_B^r|``.
    """
    da = linalg.truncated_svd(a, k)
    db = linalg.truncated_svd(b, k)
    r = min(da.S.numel(), db.S.numel())
    left = (da.U[:, :r] * db.U[:, :r]).sum(0).abs()
    right = (da.Vh[:r] * db.Vh[:r]).sum(1).abs()
    return {"left": left, "both": left * right}


# --------------------------------------------------------------------------------------------------
# Per layer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerAlignment:
    """AlignMerge quantities of one layer for one merge (float64).

    ``sigma`` (R,) merged singular values; ``s`` (K, R) projections; ``eta`` (R,); ``full_coefficient``
    (K, R) ξ̃; ``signed_sai`` (K, R) ξ̃ − 1.
    """

    sigma: torch.Tensor
    s: torch.Tensor
    eta: torch.Tensor
    full_coefficient: torch.Tensor
    signed_sai: torch.Tensor

    @property
    def mean_abs_sai(self) -> float:
        """Mean of ``|SAI|`` over tasks and components."""
        return float(self.signed_sai.abs().mean()) if self.signed_sai.numel() else 0.0


def layer_alignment(
    task_vectors: TaskVectors,
    merged: Mapping[str, torch.Tensor],
    *,
    layers: Iterable[str] | None = None,
    mode: XiMode = "two_step",
    order: ProjectionOrder = "column_first",
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerAlignment]:
    """``{layer: LayerAlignment}`` for every 2-D tensor the tasks (and the merge) have."""
    named = dict(task_vectors) if isinstance(task_vectors, Mapping) else {i: tv for i, tv in enumerate(task_vectors)}
    out: dict[str, LayerAlignment] = {}
    for name in matrix_layers(named, layers):
        if name not in merged:
            raise KeyError(f"the merged update has no tensor {name!r}")
        deltas = torch.stack([tv[name].detach().to(dtype) for tv in named.values()])
        dec = decompose_merge(deltas, merged[name].detach().to(dtype))
        coeff = full_coefficient(deltas, mode=mode, order=order, dec=dec)
        out[name] = LayerAlignment(dec.sigma.double(), dec.s.double(), eta(dec), coeff, coeff - 1.0)
    return out


# --------------------------------------------------------------------------------------------------
# Plots (PNG, Agg canvas)
# --------------------------------------------------------------------------------------------------


def _as_curves(values: torch.Tensor | Mapping[str, torch.Tensor], default: str) -> dict[str, torch.Tensor]:
    if isinstance(values, Mapping):
        return {str(k): torch.as_tensor(v).detach().double().cpu() for k, v in values.items()}
    return {default: torch.as_tensor(values).detach().double().cpu()}


def plot_cross_influence(
    xi: torch.Tensor | Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    title: str | None = None,
    max_components: int | None = None,
) -> Path:
    """Fig. 2: ``ξ_{i,j}^r`` against the component index r (one curve, or one per label)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in _as_curves(xi, "ξ").items():
        curve = curve.reshape(-1)[:max_components]
        ax.plot(torch.arange(1, curve.numel() + 1).numpy(), curve.numpy(), marker=".", lw=1, label=label)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("singular component r")
    ax.set_ylabel("subspace cross-influence ξ")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_sai_curves(
    curves: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    title: str | None = None,
    max_components: int | None = None,
) -> Path:
    """Fig. 3: signed SAI (ξ̃ − 1) against the singular index, one curve per merge (from :func:`sai_curves`).

    A (K, R) entry is averaged over tasks first.
    """
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in _as_curves(curves, "merge").items():
        if curve.ndim == 2:
            curve = curve.mean(dim=0)
        curve = curve[:max_components]
        ax.plot(torch.arange(1, curve.numel() + 1).numpy(), curve.numpy(), lw=1, label=label)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("singular index r")
    ax.set_ylabel("signed SAI  (ξ̃ − 1)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_subspace_overlap(overlap: torch.Tensor, path: str | Path, *, title: str | None = None) -> Path:
    """Fig. 1(b)/6: the overlap heatmap of :func:`subspace_overlap`."""
    fig = new_figure(5.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(overlap.detach().double().cpu().numpy(), cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("singular index of B")
    ax.set_ylabel("singular index of A")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
