"""AlignMerge diagnostics: projection coefficients, subspace cross-influence, SAI, overlap scores.

"Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging" (AlignMerge), §3, App. B.

For task updates ``ΔW_1..ΔW_K`` (m×n) and a merged update ``ΔW_merge = Σ_r σ_r u_r v_rᵀ`` from any method:

* **projection coefficient** (Eq. 3): ``Proj_B(A) = ⟨A, B⟩_F / ⟨B, B⟩_F``; for rank-one ``A = a₁a₂ᵀ``,
  ``B = b₁b₂ᵀ`` it factorises as ``(a₁·b₁/‖b₁‖²)(a₂·b₂/‖b₂‖²)`` (App. B.1);
* **component projections** ``s_i^r = u_rᵀ ΔW_i v_r``: ``P_col^r ΔW_i P_row^r = s_i^r u_r v_rᵀ`` with the rank-one
  projectors ``P_col^r = u_r u_rᵀ``, ``P_row^r = v_r v_rᵀ``; by Prop. 2 ``s_i^r`` is also the diagonal that
  minimises ``‖ΔW_i − U diag(·) Vᵀ‖_F``;
* **scaling factor** (Eq. 4): ``η^r = σ_r / Σ_i s_i^r`` (1 for a plain sum, λ for a λ-scaled sum);
* **subspace cross-influence** ``ξ_{i,j}^r`` of task j on task i (Prop. 1, Eq. 5, App. B.2, Eq. 24) — two
  successive Frobenius projections, ``α₁ = Proj_{P_col ΔW_i}(P_col ΔW_j)``, ``W_res = P_col ΔW_j − α₁ P_col ΔW_i``,
  ``α₂ = Proj_{W_i^r P_row}(W_res P_row)``, ``ξ = α₁ + α₂``. The paper never defines ``W_i^r`` (spec flag B1):

  - ``mode="exact"`` (default, Reading A): ``W_i^r = P_col^r ΔW_i``, the object of the first step. Then
    ``ξ_{i,j}^r = s_j^r / s_i^r`` exactly and Eq. 7 holds with equality;
  - ``mode="two_step_full"`` (Reading B): ``W_i^r = ΔW_i``. Then
    ``ξ_{i,j}^r = α₁ + (s_j^r − α₁ s_i^r) s_i^r / ‖ΔW_i v_r‖²`` with ``α₁ = (a_j·a_i)/(a_i·a_i)``, ``a_k = ΔW_kᵀ u_r``;
* **full coefficient** (Eq. 7): ``ξ̃_i^r = η^r (1 + Σ_{j≠i} ξ_{i,j}^r)``, ``= σ_r / s_i^r`` in Reading A;
* **Subspace-Alignment Index** (Eq. 8): ``SAI_i^r = |ξ̃_i^r − 1|``; the signed ``ξ̃_i^r − 1`` is what Fig. 3
  plots against the component index r for a merge (WA, TA, TIES, AlignMerge, …);
* **overlap heatmap** (Fig. 1b / 6): ``H[p, q] = (u_A^p·u_B^q)² + (v_A^p·v_B^q)²`` over the top-k singular
  vectors, and the rank-one alignment of Fig. 10.

Everything is computed with rank-one algebra on vectors (never m×m or n×n projectors). Guards (never NaN):
a projection onto a zero matrix is 0; ``s_i^r`` with ``|s_i^r| < eps·scale`` is replaced by ``±eps·scale``
(``scale`` = the largest of σ₁ and the ``|s|``; sign +1 at zero), which sends ``ξ̃`` to a large value as the
formula implies; ``η^r`` with a numerically zero denominator is 1 (spec §2).

Per-layer wrappers take task vectors as ``{task: {tensor name: Δ}}`` or a sequence of state dicts (as
:mod:`taskmerge.analysis.direction`) and a merged ``{tensor name: Δ}``; they compute in float64 by default.
Every ``plot_*`` helper writes a PNG with matplotlib's Agg canvas and returns the path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from taskmerge import linalg
from taskmerge.analysis.direction import TaskVectors, matrix_layers
from taskmerge.analysis.plotting import new_figure, save_figure

__all__ = [
    "XiMode",
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

XiMode = Literal["exact", "two_step_full"]

#: Relative guard of ``s_i^r`` and of η's denominator (spec §4.2: 1e-12·σ₁).
DEFAULT_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Single layer
# --------------------------------------------------------------------------------------------------


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0``."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def proj_coefficient(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``⟨A, B⟩_F / ⟨B, B⟩_F`` over the last two dimensions (batched; 0 when ``B = 0``)."""
    return _safe_div((a * b).sum(dim=(-2, -1)), (b * b).sum(dim=(-2, -1)))


def subspace_projections(deltas: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """``s[i, r] = u_rᵀ ΔW_i v_r`` for ``deltas`` (K, m, n), ``U`` (m, R), ``Vh`` (R, n): a (K, R) tensor.

    One batched product through the smaller side (memory ``K·R·min(m, n)``).
    """
    m, n = deltas.shape[-2:]
    if n <= m:
        return ((U.T @ deltas) * Vh).sum(dim=-1)
    return ((deltas @ Vh.T) * U).sum(dim=-2)


class MergeDecomposition(NamedTuple):
    """The SVD of a merged update and the tasks' projections on its components (Eq. 4).

    ``U`` (m, R), ``sigma`` (R,), ``Vh`` (R, n) with ``merged = U diag(sigma) Vh``; ``s`` (K, R) with
    ``s[i, r] = u_rᵀ ΔW_i v_r``.
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vh: torch.Tensor
    s: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:
        """The reference magnitude of the guards: max(σ₁, max |s|), or 1 if everything is zero."""
        ref = torch.zeros((), dtype=self.sigma.dtype, device=self.sigma.device)
        if self.sigma.numel():
            ref = torch.maximum(ref, self.sigma.max())
        if self.s.numel():
            ref = torch.maximum(ref, self.s.abs().max().to(ref.dtype))
        return torch.where(ref > 0, ref, torch.ones_like(ref))


def decompose_merge(deltas: torch.Tensor, merged: torch.Tensor) -> MergeDecomposition:
    """Thin SVD of ``merged`` and the projections ``s_i^r`` of every task update on its components."""
    if deltas.ndim != 3 or merged.shape != deltas.shape[1:]:
        raise ValueError(
            f"expected deltas (K, m, n) and merged (m, n), got {tuple(deltas.shape)} and {tuple(merged.shape)}"
        )
    dec = linalg.svd(merged)
    return MergeDecomposition(dec.U, dec.S, dec.Vh, subspace_projections(deltas.to(merged.dtype), dec.U, dec.Vh))


def _guarded(s: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    return torch.where(s.abs() < floor, sign * floor, s)


def eta(dec: MergeDecomposition, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Eq. 4's ``η^r = σ_r / Σ_i s_i^r`` (R,), float64; 1 where the denominator is numerically zero."""
    total = dec.s.double().sum(dim=0)
    floor = eps * dec.scale.double()
    small = total.abs() < floor
    safe = torch.where(small, torch.ones_like(total), total)
    return torch.where(small, torch.ones_like(total), dec.sigma.double() / safe)


def _decomposition(
    deltas: torch.Tensor, merged: torch.Tensor | None, dec: MergeDecomposition | None
) -> MergeDecomposition:
    if dec is not None:
        return dec
    if merged is None:
        raise ValueError("pass the merged update or its decomposition")
    return decompose_merge(deltas, merged)


def cross_influence(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "exact",
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Subspace cross-influence ``xi[i, j, r] = ξ_{i,j}^r`` (K, K, R), float64 (Eq. 5 / Eq. 24).

    ``ξ_{i,i}^r = 1``. See the module docstring for the two readings (``mode``).
    """
    dec = _decomposition(deltas, merged, dec)
    s = dec.s.double()
    if mode == "exact":
        floor = eps * dec.scale.double()
        return s[None, :, :] / _guarded(s, floor)[:, None, :]
    if mode != "two_step_full":
        raise ValueError(f"unknown ξ mode {mode!r}; expected 'exact' or 'two_step_full'")
    work = deltas.to(dec.U.dtype)
    a = dec.U.T @ work  # (K, R, n): a_k^r = ΔW_kᵀ u_r as rows
    gram = torch.einsum("irn,jrn->ijr", a, a).double()  # a_i · a_j per component
    b2 = ((work @ dec.Vh.T) ** 2).sum(dim=-2).double()  # (K, R): ‖ΔW_i v_r‖²
    diag = torch.diagonal(gram, dim1=0, dim2=1).T  # (K, R): ‖a_i‖²
    alpha1 = _safe_div(gram, diag[:, None, :].expand_as(gram))
    resid = s[None, :, :] - alpha1 * s[:, None, :]
    alpha2 = _safe_div(resid * s[:, None, :], b2[:, None, :].expand_as(resid))
    xi = alpha1 + alpha2
    idx = torch.arange(xi.shape[0])
    xi[idx, idx] = 1.0
    return xi


def full_coefficient(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "exact",
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 7's full coefficient ``ξ̃[i, r] = η^r (1 + Σ_{j≠i} ξ_{i,j}^r)`` (K, R), float64.

    ``mode="exact"`` uses the closed form ``σ_r / s_i^r`` (equal to Eq. 7 under Reading A whenever η is
    defined); ``"two_step_full"`` evaluates Eq. 7 with Reading B's ξ and the guarded η.
    """
    dec = _decomposition(deltas, merged, dec)
    if mode == "exact":
        floor = eps * dec.scale.double()
        return dec.sigma.double()[None, :] / _guarded(dec.s.double(), floor)
    xi = cross_influence(deltas, mode=mode, dec=dec, eps=eps)
    return eta(dec, eps=eps)[None, :] * xi.sum(dim=1)


def sai(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "exact",
    signed: bool = False,
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 8's ``SAI[i, r] = |ξ̃_i^r − 1|`` (K, R); ``signed=True`` gives ``ξ̃_i^r − 1`` (Fig. 3)."""
    dev = full_coefficient(deltas, merged, mode=mode, dec=dec, eps=eps) - 1.0
    return dev if signed else dev.abs()


def sai_curves(
    deltas: torch.Tensor,
    merges: Mapping[str, torch.Tensor],
    *,
    mode: XiMode = "exact",
    reduce: Literal["mean", "median", "none"] = "mean",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Signed SAI over the singular index for several merges of the same tasks (Fig. 3).

    Returns ``{merge name: (R,)}`` (the mean or median over tasks) or ``(K, R)`` with ``reduce="none"``.
    """
    work = deltas.to(dtype)
    out: dict[str, torch.Tensor] = {}
    for name, merged in merges.items():
        signed = sai(work, merged.to(dtype), mode=mode, signed=True)
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
    mode: XiMode = "exact",
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
        coeff = full_coefficient(deltas, mode=mode, dec=dec)
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
