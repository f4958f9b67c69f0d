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

**LoRA updates: the subspace size** (option ``subspace``; the paper is not explicit, this is our reading).
The official code and the paper's full fine-tuning protocol use r = min(m, n) directions
(``subspace = "full"``, the default: today's behaviour). On LoRA updates that keeps r − rank(Δ_TA)
arbitrary null-space directions, all weighted by σ̄, and a σ̄ diluted by the zero singular values. The
paper's LoRA experiments (Table 2 of Marczak et al., KnOTS protocol) work in a subspace of size
"rank T × LoRA rank"; ``subspace = "lora"`` reads this as

* R = min(min(m, n), Σ_t rank_t), with rank_t the LoRA inner dimension of task t (``ctx.factors``, when the
  engine has the factors), else the numerical rank of the dense Δ_t (singular values above
  max(m, n)·ε·σ_max, the usual tolerance);
* Iso-C: the top-R triplets of Δ_TA, Δ = σ̄_R U_R V_Rᵀ with σ̄_R the mean of those R singular values;
* Iso-CTS: R replaces r in the split (k + T·s = R, ``iso_cts_split(R, …)``) and in σ̄ (the mean of the R
  kept singular values).

In ``lora`` mode, a kept triplet whose singular value is numerically zero (≤ max(m, n)·ε·max_t ‖Δ_t‖_F;
Δ_TA has rank < R when tasks share directions, a task's residual has rank < s when its LoRA rank is
small) counts in σ̄ as a zero but its (arbitrary) directions are left out of U*, V* (and out of the U_k
that the tasks are projected off): the result is then deterministic and the same on both routes below.
For generic LoRA updates (Σ_t rank_t independent directions) no triplet is dropped.

**Low-rank route** (``subspace = "lora"`` only). With the factors (``ctx.factors``, Δ_t = s_t B_t A_t) no
m × n matrix is decomposed: the SVD of Δ_TA comes from :func:`taskmerge.linalg.lowrank_svd` of the stacked
factors ([s_1 B_1 … s_T B_T], [A_1; …; A_T]) (:func:`taskmerge.linalg.lowrank_sum`), and each task's
residual (I − U_k U_kᵀ) s_t B_t A_t is the low-rank pair (s_t (B_t − U_k (U_kᵀ B_t)), A_t). Only the merged
update σ̄ U* V*ᵀ is formed densely. The result equals the dense route's up to rounding; ``lowrank = false``
forces the dense route (the ranks still come from the factors). ``subspace = "full"`` always takes the
dense route: it needs all r directions, beyond the span of the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import Field

from taskmerge import linalg
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = [
    "IsoCOptions",
    "IsoCtsOptions",
    "IsoBases",
    "iso_c_merge",
    "iso_lora_rank",
    "iso_cts_split",
    "iso_cts_bases",
    "iso_c",
    "iso_cts",
]

Subspace = Literal["full", "lora"]


class IsoCOptions(MethodOptions):
    """Options of ``iso_c`` (besides α, i.e. λ)."""

    subspace: Subspace = Field("full", description=(
        "full: flatten all r = min(m, n) singular directions of the summed update (the official code); lora: "
        "only its top R = min(r, Σ_t rank_t), the rank the LoRA task updates can span (the paper's LoRA protocol)"))
    lowrank: bool = Field(True, description=(
        "with subspace=lora: compute the SVD from the LoRA factors when the inputs are adapters (same result, "
        "no m × n SVD)"))


class IsoCtsOptions(MethodOptions):
    """Options of ``iso_cts``."""

    common_fraction: float = Field(0.8, ge=0.0, le=1.0, description=(
        "share of the rank r (R with subspace=lora) given to the common subspace of the summed update, before "
        "the rest is divided evenly among the tasks (the paper's 0.8)"))
    subspace: Subspace = Field("full", description=(
        "full: split r = min(m, n) directions (the official code); lora: split R = min(r, Σ_t rank_t), the rank "
        "the LoRA task updates can span (the paper's LoRA protocol)"))
    lowrank: bool = Field(True, description=(
        "with subspace=lora: compute the SVDs from the LoRA factors when the inputs are adapters (same result)"))
    svd: linalg.SvdRoute = Field("exact", description=linalg.SVD_ROUTE_DESCRIPTION)


class IsoBases(NamedTuple):
    """Isotropic-merge factors: the merged update is ``S.mean() · U Vh`` (:meth:`merged`).

    ``U`` (m, K) and ``Vh`` (K, n) have orthonormal columns / rows; ``S`` holds the kept singular values
    whose mean is σ̄ (r of them, R in ``lora`` mode). ``K = len(S)`` except in ``lora`` mode, where the
    directions of numerically zero singular values are left out (their values count in ``S`` as zeros).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def merged(self) -> torch.Tensor:
        """``σ̄ · U Vh`` (zeros when no direction is kept)."""
        if self.U.shape[1] == 0:
            return self.U.new_zeros(self.U.shape[0], self.Vh.shape[1])
        return (self.U @ self.Vh).mul_(self.S.mean())


def _tall_truncated_svd(a: torch.Tensor, k: int, svd: linalg.SvdRoute = "exact") -> linalg.SVD:
    """:func:`linalg.truncated_svd` computed on the tall orientation (LAPACK is several times slower on wide)."""
    if a.shape[0] >= a.shape[1]:
        return linalg.truncated_svd(a, k, svd)
    d = linalg.truncated_svd(a.T, k, svd)
    return linalg.SVD(d.Vh.T, d.S, d.U.T)


def _tall_polar(a: torch.Tensor) -> torch.Tensor:
    """:func:`linalg.polar` computed on the tall orientation (the polar factor commutes with transposition),
    keeping every non-zero singular pair (``rtol=0``) as the official code's ``U Vᵀ`` does: the stacked bases
    are often ill-conditioned (σ_min / σ_max ~ 1e-5 for ViT-B/32 shapes) without being rank-deficient."""
    return linalg.polar(a, rtol=0.0) if a.shape[0] >= a.shape[1] else linalg.polar(a.T, rtol=0.0).T


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


def iso_lora_rank(deltas: torch.Tensor, factors: Sequence[linalg.LowRank] | None = None) -> int:
    """R = min(min(m, n), Σ_t rank_t) of a stack (T, m, n): rank_t = ``factors[t].rank`` (the LoRA inner
    dimension) when given, else the numerical rank of ``deltas[t]``."""
    t, m, n = deltas.shape
    if factors is not None:
        ranks = [f.rank for f in factors]
    else:
        ranks = [linalg.numerical_rank(d) for d in deltas]
    return min(m, n, sum(ranks))


def _check_factors(deltas: torch.Tensor, factors: Sequence[linalg.LowRank] | None) -> None:
    t, m, n = deltas.shape
    if factors is not None and (len(factors) != t or any(f.shape != (m, n) for f in factors)):
        raise ValueError(f"iso: factors {[f.shape for f in factors]} do not match updates {tuple(deltas.shape)}")


def _nonnull(dec: linalg.SVD, tol: float | None) -> linalg.SVD:
    """``dec`` without the triplets whose singular value is at most ``tol`` (``None``: all kept)."""
    if tol is None:
        return dec
    keep = dec.S > tol
    if bool(keep.all()):
        return dec
    return linalg.SVD(dec.U[:, keep], dec.S[keep], dec.Vh[keep])


def iso_cts_bases(
    deltas: torch.Tensor,
    common_fraction: float = 0.8,
    *,
    subspace: Subspace = "full",
    factors: Sequence[linalg.LowRank] | None = None,
    lowrank: bool = True,
    svd: linalg.SvdRoute = "exact",
) -> IsoBases:
    """The Iso-CTS factors ``(U*, S, V*ᵀ)`` of a stack (T, m, n); the merged update is ``S.mean() · U* V*ᵀ``.

    ``U*`` (m, r) and ``V*ᵀ`` (r, n) are the orthogonalised bases; ``S`` (r,) the kept singular values
    (common ones first, then task by task) whose mean is σ̄. With ``subspace = "lora"`` the split is of
    R = :func:`iso_lora_rank` directions, ``S`` has R entries and the bases may have fewer columns (module
    docstring); ``factors`` (one :class:`linalg.LowRank` per task, ``factors[t].dense() == deltas[t]``) then
    give the ranks and, with ``lowrank``, the SVDs (``deltas`` is only read for its shape, dtype and device).
    ``common_fraction = 1`` gives Iso-C. ``factors`` are ignored with ``subspace = "full"``. ``svd`` picks how
    the dense top-k SVDs (the common one and the tasks') are computed (:func:`taskmerge.linalg.truncated_svd`).

    Everything between the inputs and the returned bases runs in float64 (the bases come back in the input's
    dtype): the stacked bases whose polar factors are taken are ill-conditioned (σ_min/σ_max ~ 1e-5), so
    rounding them to float32 first costs ~eps/σ_min; on the benchmark's real MiniLM task vectors that was
    2.8e-4 relative to a float64 run of the official construction, against 3.7e-7 here.
    """
    if deltas.ndim != 3:
        raise ValueError(f"iso_cts expects (T, m, n) task updates, got shape {tuple(deltas.shape)}")
    t, m, n = deltas.shape
    dt, hi = deltas.dtype, torch.float64
    parts: list[linalg.LowRank] | None = None
    tol: float | None = None
    if subspace == "lora":
        _check_factors(deltas, factors)
        r = iso_lora_rank(deltas, factors)
        if factors is not None and lowrank:
            parts = [f.to(hi, deltas.device) for f in factors]
            scale = max(p.norm() for p in parts)
        else:
            scale = float(torch.linalg.vector_norm(deltas.reshape(t, -1), dim=1).max()) if t else 0.0
        tol = max(m, n) * torch.finfo(deltas.dtype).eps * scale
    elif subspace == "full":
        r = min(m, n)
    else:
        raise ValueError(f"iso: unknown subspace {subspace!r}; expected full or lora")
    if r == 0:
        return IsoBases(deltas.new_zeros(m, 0), deltas.new_zeros(0), deltas.new_zeros(0, n))
    k, s = iso_cts_split(r, t, common_fraction)
    if parts is not None:
        common = linalg.lowrank_sum(parts).svd(k if s > 0 else r)
    else:
        total = deltas.sum(dim=0, dtype=hi)
        common = _tall_truncated_svd(total, k if s > 0 else r, svd)
        del total
    common = _nonnull(common, tol)
    if s == 0:
        return IsoBases(common.U.to(dt), _padded(common.S, r).to(dt), common.Vh.to(dt))
    u_k = common.U
    us, ss, vhs = [], [], []
    for i in range(t):
        if parts is not None:  # (I − U_k U_kᵀ) s B A = s (B − U_k U_kᵀ B) A
            p = parts[i]
            part = linalg.LowRank(linalg.project_out(u_k, p.B), p.A, p.scale).svd(s)
        else:
            part = _tall_truncated_svd(linalg.project_out(u_k, deltas[i].to(hi)), s, svd)
        part = _nonnull(part, tol)
        us.append(part.U)
        ss.append(part.S)
        vhs.append(part.Vh)
    u_ts = linalg.project_out(u_k, torch.cat(us, dim=1))  # exact arithmetic: already ⟂ U_k
    del us
    u_ts = _tall_polar(u_ts)
    eps = torch.finfo(hi).eps
    if u_k.shape[1] and u_ts.shape[1] and float((u_k.T @ u_ts).abs().max()) > eps ** 0.5:
        u_star = _tall_polar(torch.cat([u_k, linalg.project_out(u_k, u_ts)], dim=1))  # degenerate case
    else:
        u_star = torch.cat([u_k, u_ts], dim=1)
    vh_star = _tall_polar(torch.cat([common.Vh, *vhs], dim=0))
    return IsoBases(u_star.to(dt), _padded(torch.cat([common.S, *ss]), r).to(dt), vh_star.to(dt))


def _padded(values: torch.Tensor, size: int) -> torch.Tensor:
    """``values`` followed by zeros up to ``size`` entries (the dropped null singular values of ``lora`` mode)."""
    if values.numel() >= size:
        return values
    return torch.cat([values, values.new_zeros(size - values.numel())])


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
    if options.subspace == "lora":  # Iso-CTS without task-specific directions is Iso-C
        return iso_cts_bases(deltas, 1.0, subspace="lora", factors=ctx.factors, lowrank=options.lowrank).merged()
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
    bases = iso_cts_bases(deltas, options.common_fraction, subspace=options.subspace, factors=ctx.factors,
                          lowrank=options.lowrank, svd=options.svd)
    return bases.merged()
