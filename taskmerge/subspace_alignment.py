"""Subspace-alignment algebra of AlignMerge: component projections, η, cross-influence ξ, full coefficient ξ̃.

"Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging" (AlignMerge), §3, App. B. Shared by
the method (:mod:`taskmerge.methods.alignmerge`) and the diagnostics (:mod:`taskmerge.analysis.alignment`).

For task updates ``ΔW_1..ΔW_K`` (m×n) and a merged update ``ΔW_merge = Σ_r σ_r u_r v_rᵀ`` from any method:

* **projection coefficient** (Eq. 3): ``Proj_B(A) = ⟨A, B⟩_F / ⟨B, B⟩_F``; for rank-one ``A = a₁a₂ᵀ``,
  ``B = b₁b₂ᵀ`` it factorises as ``(a₁·b₁/‖b₁‖²)(a₂·b₂/‖b₂‖²)`` (App. B.1, Eq. 20);
* **component projections** ``s_i^r = u_rᵀ ΔW_i v_r``: ``P_col^r ΔW_i P_row^r = s_i^r u_r v_rᵀ`` with the rank-one
  projectors ``P_col^r = u_r u_rᵀ``, ``P_row^r = v_r v_rᵀ``; by Prop. 2 ``s_i^r`` is also the diagonal that
  minimises ``‖ΔW_i − U diag(·) Vᵀ‖_F``;
* **scaling factor** (Eq. 4): ``η^r = σ_r / Σ_i s_i^r`` (1 for a plain sum, λ for a λ-scaled sum);
* **subspace cross-influence** ``ξ_{i,j}^r`` of task j on task i (Prop. 1, Eq. 5, App. B.2 Eqs. 22–24), two
  successive Frobenius projections. ``mode="two_step"`` (default, ``resolved.md`` §AlignMerge 1) reads the
  paper's ``W_i^r P_row^r`` (Eq. 23) as ``ΔW_i P_row^r``, the row projector alone:

  - column first (the paper's order): ``α₁ = Proj_{P_col ΔW_i}(P_col ΔW_j)``,
    ``W_res = P_col ΔW_j − α₁ P_col ΔW_i``, ``α₂ = Proj_{ΔW_i P_row}(W_res P_row)``, ``ξ = α₁ + α₂``. With
    ``a_k = ΔW_kᵀ u_r`` and ``b_k = ΔW_k v_r`` (``P_col ΔW_k = u_r a_kᵀ``, ``ΔW_k P_row = b_k v_rᵀ``) Eq. 20 gives
    ``α₁ = a_j·a_i / ‖a_i‖²`` and ``α₂ = (s_j − α₁ s_i) s_i / ‖b_i‖²``;
  - row first (App. E.2, Fig. 7, ``order="row_first"``): the same with the roles of the two sides swapped,
    ``α₁ = b_j·b_i / ‖b_i‖²``, ``α₂ = (s_j − α₁ s_i) s_i / ‖a_i‖²`` — close to, not equal to, column first, as
    the paper says ("very similar");

  ``mode="ratio"`` is the earlier reading (second spec, flag B1: ``W_i^r = P_col^r ΔW_i``), in which both orders
  collapse to ``ξ_{i,j}^r = s_j^r / s_i^r``. ``resolved.md`` rejects it as the default: it gives a flat ξ over r
  where Fig. 2 shows ξ decaying, and a gate ``mean_i ξ̃_i ≥ K`` on any summed base;
* **full coefficient** (Eq. 7): ``ξ̃_i^r = η^r (1 + Σ_{j≠i} ξ_{i,j}^r)``; ``= σ_r / s_i^r`` in the ratio reading.
  **Finding:** on a (scaled) summed base, ``Σ_j a_j = σ_r v_r / η^r``, so the two-step Eq. 7 sums to the closed
  form ``ξ̃_i^r = σ_r s_i (‖a_i‖² + ‖b_i‖² − s_i²) / (‖a_i‖² ‖b_i‖²)``, symmetric in a and b: the two projection
  orders give different ξ_{i,j} but the same ξ̃ there, and so the same AlignMerge-B; they differ on other bases.

Everything is computed with rank-one algebra on vectors (never m×m or n×n projectors), in float64 for the
coefficients. Guards (never NaN): a projection onto a matrix whose squared norm is below ``(eps·scale)²`` is
0 (``scale`` = the largest of σ₁ and the ``|s|``), so a task with nothing in component r neither influences nor
is influenced there (``ξ_{i,i} = 1`` always); in the ratio reading ``s_i^r`` with ``|s_i^r| < eps·scale`` is
replaced by ``±eps·scale`` (sign +1 at zero), which sends ``ξ̃`` to a large value as the formula implies;
``η^r`` with a numerically zero denominator is 1 (spec §2). A task with only rounding-level content in a
component (far above the guard) still has ``ξ ∝ 1 / ‖a_i‖`` there: the two-step estimator is what the paper
defines, and its noise grows as a task's share of a component vanishes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from taskmerge import linalg

__all__ = [
    "XiMode",
    "ProjectionOrder",
    "DEFAULT_EPS",
    "MergeDecomposition",
    "proj_coefficient",
    "subspace_projections",
    "decompose_merge",
    "eta",
    "cross_influence",
    "full_coefficient",
]

XiMode = Literal["two_step", "ratio"]
ProjectionOrder = Literal["column_first", "row_first"]

#: Relative guard of ``s_i^r``, of the projections' denominators and of η's denominator (spec §4.2: 1e-12·σ₁).
DEFAULT_EPS = 1e-12


def _safe_div(num: torch.Tensor, den: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``num / den`` with 0 where ``|den| <= floor``."""
    zero = den.abs() <= floor
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


def _check_mode(mode: str, order: str) -> None:
    if mode not in ("two_step", "ratio"):
        raise ValueError(f"unknown ξ mode {mode!r}; expected 'two_step' or 'ratio'")
    if order not in ("column_first", "row_first"):
        raise ValueError(f"unknown projection order {order!r}; expected 'column_first' or 'row_first'")


def cross_influence(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "two_step",
    order: ProjectionOrder = "column_first",
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Subspace cross-influence ``xi[i, j, r] = ξ_{i,j}^r`` (K, K, R), float64 (Eq. 5 / Eqs. 22–24).

    ``ξ_{i,i}^r = 1``. ``mode`` and ``order`` as in the module docstring (``order`` is moot for ``"ratio"``).
    """
    _check_mode(mode, order)
    dec = _decomposition(deltas, merged, dec)
    s = dec.s.double()
    floor = eps * dec.scale.double()
    if mode == "ratio":
        return s[None, :, :] / _guarded(s, floor)[:, None, :]
    work = deltas.to(dec.U.dtype)
    a = dec.U.T @ work  # (K, R, n): a_k^r = ΔW_kᵀ u_r as rows
    b = work @ dec.Vh.T  # (K, m, R): b_k^r = ΔW_k v_r as columns
    if order == "column_first":
        first = torch.einsum("irn,jrn->ijr", a, a).double()  # a_i · a_j
        second = (b.double() ** 2).sum(dim=-2)  # (K, R): ‖b_i‖²
    else:
        first = torch.einsum("imr,jmr->ijr", b, b).double()  # b_i · b_j
        second = (a.double() ** 2).sum(dim=-1)  # (K, R): ‖a_i‖²
    floor2 = floor**2
    norms = torch.diagonal(first, dim1=0, dim2=1).T  # (K, R): ‖a_i‖² (or ‖b_i‖²)
    alpha1 = _safe_div(first, norms[:, None, :].expand_as(first), floor2)
    resid = s[None, :, :] - alpha1 * s[:, None, :]  # the residual's component along u_r v_rᵀ
    alpha2 = _safe_div(resid * s[:, None, :], second[:, None, :].expand_as(resid), floor2)
    xi = alpha1 + alpha2
    idx = torch.arange(xi.shape[0])
    xi[idx, idx] = 1.0
    return xi


def full_coefficient(
    deltas: torch.Tensor,
    merged: torch.Tensor | None = None,
    *,
    mode: XiMode = "two_step",
    order: ProjectionOrder = "column_first",
    dec: MergeDecomposition | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 7's full coefficient ``ξ̃[i, r] = η^r (1 + Σ_{j≠i} ξ_{i,j}^r)`` (K, R), float64.

    ``mode="ratio"`` uses the closed form ``σ_r / s_i^r`` (equal to Eq. 7 under that reading whenever η is
    defined); ``"two_step"`` evaluates Eq. 7 with the two-step ξ and the guarded η.
    """
    _check_mode(mode, order)
    dec = _decomposition(deltas, merged, dec)
    if mode == "ratio":
        floor = eps * dec.scale.double()
        return dec.sigma.double()[None, :] / _guarded(dec.s.double(), floor)
    xi = cross_influence(deltas, mode=mode, order=order, dec=dec, eps=eps)
    return eta(dec, eps=eps)[None, :] * xi.sum(dim=1)
