"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025.

**Iso-C**: with Δ_TA = Σ_t Δ_t = U Σ Vᵀ (r = min(m, n) singular values), replace the
spectrum by its mean, Δ_Iso-C = σ̄ U Vᵀ with σ̄ = (1/r) Σ_i σ_i. Default α = 1.3 (the paper's
optimum for ViT-B/32, 8 tasks).

**Iso-CTS**:

1. common subspace: the top-k singular triplets (U_k, σ_1..k, V_k) of Δ_TA, k = ⌊r · 0.8⌋ adjusted so that
   r − k = T·s (below);
2. task-specific subspaces: for each task, the residual Δ̄_t = Δ_t − U_k U_kᵀ Δ_t (the projection of Δ_t
   out of the common left subspace) and its top-s singular triplets (Ū_t,s, σ̄_t, V̄_t,s). The right factor
   is the residual's own right singular vectors V̄_t,s (as in the official code: the SVD of the projected
   update; V̄_t,s is *not* projected out of V_k);
3. U* = polar([U_k | Ū_1,s | … | Ū_T,s]), V*ᵀ = polar([V_k | V̄_1,s | … | V̄_T,s]ᵀ) (orthogonal polar factors,
   as in TSV-M), σ̄ = mean of all r kept singular values (σ_1..k of Δ_TA and every σ̄_t), and
   Δ_Iso-CTS = σ̄ U* V*ᵀ. Default α = 1.5 (the paper's optimum for ViT-B/32, 8 tasks).

The split follows the official code (danielm1405/iso-merging ``iso_cts``, identical in FusionBench):
``k₀ = ⌊r · f⌋``, ``s = round((r − k₀) / T)`` (Python's round), ``k = r − T·s``; e.g. r = 768, T = 8:
k = 616, s = 19. When ``T·s`` would exceed r (only for f < T/(2r)), s falls back to ⌊(r − k₀)/T⌋.
With s = 0 (r small against T) Iso-CTS is Iso-C.

Implementation notes: the common triplets come from one SVD of Δ_TA, the per-task top-s triplets from
:func:`taskmerge.linalg.truncated_svd` (s ≪ r). The left task directions Ū_t,s lie in the orthogonal
complement of span(U_k), so polar([U_k | Ū]) = [U_k | polar(Ū)]: only the m × T·s block is
orthogonalised (after projecting Ū out of U_k once more to remove rounding), with a check that falls back
to the full polar factor when the directions are degenerate. Decompositions of wide matrices are taken
on their transposes (LAPACK's SVD of a 768 × 3072 matrix is several times slower than of 3072 × 768; the
factors are the same). Both methods follow the official code in
keeping all r directions, also when Δ_TA is rank-deficient (e.g. LoRA updates), where the trailing
directions are whatever the SVD returns for its null space and σ̄ includes the zero singular values.
"""

from __future__ import annotations

import torch
from pydantic import Field

from taskmerge import linalg
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["IsoCOptions", "IsoCtsOptions", "iso_c_merge", "iso_cts_split", "iso_cts_bases", "iso_c", "iso_cts"]


class IsoCOptions(MethodOptions):
    """Iso-C has no options besides α (λ)."""


class IsoCtsOptions(MethodOptions):
    """Options of ``iso_cts``.

    Attributes:
        common_fraction: share of the rank r given to the common subspace before the divisibility
            adjustment (the paper's 0.8).
    """

    common_fraction: float = Field(0.8, ge=0.0, le=1.0)


def _tall_truncated_svd(a: torch.Tensor, k: int) -> linalg.SVD:
    """:func:`linalg.truncated_svd` computed on the tall orientation (LAPACK is several times slower on wide)."""
    if a.shape[0] >= a.shape[1]:
        return linalg.truncated_svd(a, k)
    d = linalg.truncated_svd(a.T, k)
    return linalg.SVD(d.Vh.T, d.S, d.U.T)


def _tall_polar(a: torch.Tensor) -> torch.Tensor:
    """:func:`linalg.polar` computed on the tall orientation (the polar factor commutes with transposition)."""
    return linalg.polar(a) if a.shape[0] >= a.shape[1] else linalg.polar(a.T).T


def iso_c_merge(total: torch.Tensor) -> torch.Tensor:
    """Iso-C of a summed update Δ_TA (m, n): ``σ̄ U Vᵀ`` with σ̄ the mean singular value."""
    if total.shape[0] < total.shape[1]:
        return iso_c_merge(total.T).T  # Iso-C commutes with transposition; LAPACK prefers tall matrices
    dec = linalg.svd(total)
    return (dec.U @ dec.Vh).mul_(dec.S.mean())


def iso_cts_split(r: int, num_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """``(k, s)``: common-subspace size and per-task size, with ``k + num_tasks · s = r`` (official rule)."""
    k0 = int(r * common_fraction)
    s = round((r - k0) / num_tasks)
    if s * num_tasks > r:
        s = (r - k0) // num_tasks
    return r - s * num_tasks, s


def iso_cts_bases(deltas: torch.Tensor, common_fraction: float = 0.8) -> linalg.SVD:
    """The Iso-CTS factors ``(U*, S, V*ᵀ)`` of a stack (T, m, n); the merged update is ``S.mean() · U* V*ᵀ``.

    ``U*`` (m, r) and ``V*ᵀ`` (r, n) are the orthogonalised bases; ``S`` (r,) the kept singular values
    (common ones first, then task by task) whose mean is σ̄.
    """
    if deltas.ndim != 3:
        raise ValueError(f"iso_cts expects (T, m, n) task updates, got shape {tuple(deltas.shape)}")
    t, m, n = deltas.shape
    r = min(m, n)
    k, s = iso_cts_split(r, t, common_fraction)
    total = deltas.sum(dim=0)
    common = _tall_truncated_svd(total, k if s > 0 else r)
    del total
    if s == 0:
        return common
    u_k = common.U
    us, ss, vhs = [], [], []
    for d in deltas:
        part = _tall_truncated_svd(linalg.project_out(u_k, d), s)
        us.append(part.U)
        ss.append(part.S)
        vhs.append(part.Vh)
    u_ts = linalg.project_out(u_k, torch.cat(us, dim=1))  # exact arithmetic: already ⟂ U_k
    del us
    u_ts = linalg.polar(u_ts)
    eps = torch.finfo(deltas.dtype).eps
    if u_k.shape[1] and float((u_k.T @ u_ts).abs().max()) > eps ** 0.5:
        u_star = linalg.polar(torch.cat([u_k, linalg.project_out(u_k, u_ts)], dim=1))  # degenerate case
    else:
        u_star = torch.cat([u_k, u_ts], dim=1)
    vh_star = _tall_polar(torch.cat([common.Vh, *vhs], dim=0))
    return linalg.SVD(u_star, torch.cat([common.S, *ss]), vh_star)


@register_method(
    "iso_c",
    options=IsoCOptions,
    paper="Marczak et al., ICML 2025 (No Task Left Behind: Isotropic Model Merging), Iso-C: σ̄·U Vᵀ of Σ_t Δ_t",
    summary="task arithmetic with a flat spectrum: every singular value of the sum replaced by their mean",
    matrix_only=True,
    default_lambda=1.3,
)
def iso_c(deltas: torch.Tensor, options: IsoCOptions, ctx: LayerContext) -> torch.Tensor:
    """Iso-C of one weight matrix."""
    return iso_c_merge(deltas.sum(dim=0))


@register_method(
    "iso_cts",
    options=IsoCtsOptions,
    paper=(
        "Marczak et al., ICML 2025 (No Task Left Behind), Iso-CTS: σ̄ U* V*ᵀ, common + task-specific "
        "subspaces, flat spectrum"
    ),
    summary="common top subspace of the sum plus per-task residual directions, polar-orthogonalised, flat spectrum",
    matrix_only=True,
    default_lambda=1.5,
)
def iso_cts(deltas: torch.Tensor, options: IsoCtsOptions, ctx: LayerContext) -> torch.Tensor:
    """Iso-CTS of one weight matrix: ``σ̄ U* V*ᵀ``."""
    bases = iso_cts_bases(deltas, options.common_fraction)
    return (bases.U @ bases.Vh).mul_(bases.S.mean())
