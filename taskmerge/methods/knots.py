"""KnOTS: merging LoRA models in a shared SVD basis.

Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS", ICLR 2025. Per weight
matrix, with the T task updates ΔW_t (O × I; for LoRA ΔW_t = s_t B_t A_t):

1. concatenate along the input dimension, X = [ΔW_1 … ΔW_T] (O × T·I), and take its SVD
   X = U Σ [V_1ᵀ … V_Tᵀ] (in float64, as the official code);
2. drop the singular triplets with σ ≤ 10⁻⁵ (``svd_tol``);
3. every task is now ΔW_t = U (Σ V_tᵀ): a shared basis U and a task-specific block Σ V_tᵀ (k × I);
4. merge the blocks entry-wise with an existing rule (``merge``): TIES (trim to the top ``keep`` of the
   entries per task, elect signs by mass, disjoint mean), DARE-TIES (drop-and-rescale, then TIES) or TA
   (sum), using :func:`taskmerge.methods.ties.ties_trim` / :func:`~taskmerge.methods.ties.ties_elect_sign`
   / :func:`~taskmerge.methods.ties.disjoint_mean` and :func:`taskmerge.methods.dare.dare_drop`;
5. reconstruct ΔW = U · merged; the engine applies θ₀ + λ·ΔW.

The details follow the official code (gstoica27/KnOTS, ``task_merger.SVDMerger`` with
``representation='svd-vector'``, ``s_on_V=True``, ``concat_across_output=True``, and ``masking_ops``):

* **Scope of the TIES trim.** The official code flattens the Σ V_tᵀ blocks of *all* layers into one
  vector per task and keeps its top-k % entries model-wide: ``scope="global"`` (default) does the same with
  a statistics pass (:class:`taskmerge.methods.ties.TiesGlobalThreshold` over the blocks; the SVD is done in
  both passes). ``scope="tensor"`` trims each matrix on its own. When nothing is trimmed (``keep = 1``) the
  two are identical and no statistics pass runs.
* **Zero elected signs** take the majority sign of the tensor (the official code: of the model), as in
  :mod:`taskmerge.methods.ties`.
* **Defaults** are the official ViT-B/32 rank-16 configurations: KnOTS-TIES ``keep = 0.2`` (``topK: 20``),
  α = 0.6 (the default λ); KnOTS-DARE-TIES ``p = 0.1``, no trim (``topK: 100``), α = 0.7 there; KnOTS-TA
  sums the blocks (no trim). The official code multiplies the blocks by α before the (scale-equivariant)
  merge, the same as λ here. The λ default is KnOTS-TIES's: give ``--lambda`` for the other rules.
* **KnOTS-TA is task arithmetic**: U Σ_t Σ V_tᵀ = Σ_t ΔW_t up to the dropped triplets (σ ≤ ``svd_tol``).
* **Dropped triplets and exact zeros.** Besides the official absolute threshold, singular values at the
  numerical-rank tolerance of the SVD (``σ ≤ max(O, T·I)·ε·σ₁``, ε of ``svd_dtype``) are dropped, and block
  entries at that level are set to exactly 0, as are the blocks of a task whose update is zero (an adapter
  that leaves the matrix alone). TIES's disjoint mean counts every non-zero entry, so rounding noise where
  a block is zero in exact arithmetic would otherwise divide the other tasks' entries; with these rules the
  result does not depend on whether the SVD came from the factors or from the dense concatenation. (The
  official code keeps such noise; it never merges adapters with different target modules.)
* DARE draws from ``ctx.generator`` (seeded from the run seed and the tensor name), so the statistics pass
  and the merge pass drop the same entries.

**Low-rank route.** When every task's update of a matrix comes in factored form (PEFT adapters,
``ctx.factors``), the SVD of the concatenation is computed from the factors by
:func:`taskmerge.linalg.hstack_lowrank_svd` (QR of the stacked B's and of the A's, SVD of a Σr × Σr core):
X = [B_1 … B_T] · blockdiag(A_1 … A_T) is never formed, and k ≤ Σ_t r_t. The result equals the dense
route's up to rounding (the singular pairs' signs do not matter: flipping (u_i, v_i) flips row i of every
block, which TIES/DARE/TA commute with, and column i of U). ``lowrank = false`` forces the dense route.

Tensors that are not 2-D weight matrices are averaged by the engine (``matrix_only``): with LoRA inputs
those updates are zero.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from taskmerge import linalg
from taskmerge.methods.dare import dare_drop
from taskmerge.methods.ties import (
    TiesGlobalState,
    TiesGlobalThreshold,
    TiesOptions,
    _global_trim,
    disjoint_mean,
    ties_elect_sign,
    ties_trim,
)
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["KnotsOptions", "KnotsGlobalThreshold", "knots_decompose", "knots_merge_blocks", "knots"]

logger = logging.getLogger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class KnotsOptions(MethodOptions):
    """Options of ``knots``."""

    merge: Literal["ties", "dare_ties", "ta"] = Field("ties", description=(
        "how the per-task blocks ΣV_tᵀ are merged: ties (KnOTS-TIES), dare_ties (KnOTS-DARE-TIES) or ta "
        "(KnOTS-TA, their sum)"))
    keep: float | None = Field(None, gt=0.0, le=1.0, description=(
        "fraction of each task's block entries kept by the magnitude trim; none: 0.2 for ties (the official "
        "topK: 20), 1.0 (no trim) for dare_ties and ta"))
    scope: Literal["global", "tensor"] = Field("global", description=(
        "global: the trim uses one model-wide threshold per task (the official code); tensor: one per matrix"))
    p: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "with merge=dare_ties: DARE's drop rate (the official ViT-B/32 configuration's 0.1)"))
    rescale: bool = Field(True, description="with merge=dare_ties: rescale DARE's kept entries by 1/(1 − p)")
    svd_tol: float = Field(1e-5, ge=0.0, description=(
        "singular values of the concatenation at or below this (absolute) are dropped (the official 1e-5)"))
    svd_dtype: Literal["float64", "float32"] = Field("float64", description=(
        "dtype of the SVD of the concatenated task updates (the official float64)"))
    lowrank: bool = Field(True, description=(
        "compute the SVD from the LoRA factors when the inputs are adapters (same result, no m × n SVD)"))
    svd: linalg.SvdRoute = Field("exact", description=linalg.SVD_ROUTE_DESCRIPTION + (
        "; for KnOTS every triplet of the concatenation is kept, so certified is the checked Gram route"))

    @property
    def resolved_keep(self) -> float:
        """The trim fraction after the merge rule's default is applied."""
        if self.keep is not None:
            return self.keep
        return 0.2 if self.merge == "ties" else 1.0

    @property
    def trims_globally(self) -> bool:
        """Whether a model-wide statistics pass is needed."""
        return self.scope == "global" and self.resolved_keep < 1.0


def _dense_concat_svd(deltas: torch.Tensor, dtype: torch.dtype, svd: linalg.SvdRoute = "exact") -> linalg.SVD:
    """Thin SVD of [Δ_1 … Δ_T] (O × T·I): LAPACK's (``exact``) or the float64 Gram eigenpairs with every
    triplet's residuals checked (``certified``, :func:`taskmerge.linalg.certified_top_k`; else LAPACK's)."""
    t, m, n = deltas.shape
    x = deltas.to(dtype).permute(1, 0, 2).reshape(m, t * n)
    return linalg.certified_top_k(x, min(m, t * n))[0] if svd == "certified" else linalg.svd(x)


def knots_decompose(
    deltas: torch.Tensor,
    factors: Sequence[linalg.LowRank] | None = None,
    *,
    svd_tol: float = 1e-5,
    svd_dtype: torch.dtype = torch.float64,
    svd: linalg.SvdRoute = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared basis ``U`` (O, k) and the per-task blocks ``Σ V_tᵀ`` (T, k, I) of a stack (T, O, I).

    With ``factors`` (one :class:`linalg.LowRank` per task, ``factors[t].dense() == deltas[t]``) the SVD
    comes from the factors. Triplets with ``σ ≤ svd_tol`` or below the numerical-rank tolerance are
    dropped. Returned in ``deltas.dtype``.
    """
    if deltas.ndim != 3:
        raise ValueError(f"knots expects the task updates of a matrix stacked as (T, O, I), got {tuple(deltas.shape)}")
    t, m, n = deltas.shape
    if factors is not None:
        if len(factors) != t or any(f.shape != (m, n) for f in factors):
            raise ValueError(f"knots: factors {[f.shape for f in factors]} do not match updates {tuple(deltas.shape)}")
        dev = deltas.device
        parts = [linalg.LowRank(f.B.to(dev), f.A.to(dev), f.scale) for f in factors]
        dec = linalg.hstack_lowrank_svd(parts, svd_dtype)
    else:
        dec = _dense_concat_svd(deltas, svd_dtype, svd)
    s = dec.S
    floor = max(m, t * n) * torch.finfo(svd_dtype).eps * float(s.max()) if s.numel() else 0.0
    keep = (s > svd_tol) & (s > floor)
    u = dec.U[:, keep]
    blocks = (s[keep].unsqueeze(1) * dec.Vh[keep]).reshape(-1, t, n).transpose(0, 1)  # (T, k, I)
    # Exact zeros stay exact: TIES's disjoint mean counts every non-zero entry, so rounding noise where the
    # block is zero in exact arithmetic (a task that leaves the matrix alone, disjoint supports) would
    # wrongly divide the other tasks' entries.
    blocks = torch.where(blocks.abs() <= floor, 0, blocks)
    blocks[deltas.reshape(t, -1).abs().amax(dim=1) == 0] = 0
    return u.to(deltas.dtype), blocks.to(deltas.dtype).contiguous()


def _dropped(blocks: torch.Tensor, options: KnotsOptions, ctx: LayerContext) -> torch.Tensor:
    if options.merge != "dare_ties":
        return blocks
    return dare_drop(blocks, options.p, ctx.generator(blocks.device), options.rescale)


def knots_merge_blocks(blocks: torch.Tensor, options: KnotsOptions, ctx: LayerContext) -> torch.Tensor:
    """Merge the per-task blocks (T, k, I) into one (k, I) with the rule of ``options.merge``."""
    blocks = _dropped(blocks, options, ctx)
    keep = options.resolved_keep
    if options.trims_globally:
        if not isinstance(ctx.state, TiesGlobalState):
            raise RuntimeError("knots (scope=global) needs the statistics pass; ctx.state is missing")
        trimmed = _global_trim(blocks, ctx.state, ctx.name)
    else:
        trimmed = ties_trim(blocks, keep)
    if options.merge == "ta":
        return trimmed.sum(dim=0)
    return disjoint_mean(trimmed, ties_elect_sign(trimmed))


def _decompose(deltas: torch.Tensor, options: KnotsOptions, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    factors = ctx.factors if options.lowrank else None
    logger.debug("knots: %s: SVD of the concatenation from %s", ctx.name, "the LoRA factors" if factors else "dense updates")
    return knots_decompose(deltas, factors, svd_tol=options.svd_tol, svd_dtype=_DTYPES[options.svd_dtype],
                           svd=options.svd)


class KnotsGlobalThreshold:
    """The model-wide TIES threshold over every matrix's Σ V_tᵀ blocks (after DARE, for ``dare_ties``)."""

    wants_context = True

    def __init__(self) -> None:
        self._ties = TiesGlobalThreshold()

    def collect(self, name: str, deltas: torch.Tensor, options: KnotsOptions,
                ctx: LayerContext | None = None) -> torch.Tensor:
        if ctx is None:  # called without the engine: the engine's per-tensor seed for run seed 0
            ctx = LayerContext(name=name, seed=LayerContext.tensor_seed(0, name))
        _, blocks = _decompose(deltas, options, ctx)
        return self._ties.collect(name, _dropped(blocks, options, ctx), TiesOptions(keep=options.resolved_keep), ctx)

    def finalize(self, collected: Mapping[str, Any], options: KnotsOptions) -> Any:
        return self._ties.finalize(collected, TiesOptions(keep=options.resolved_keep, scope="global"))


def _knots_statistic(options: KnotsOptions) -> KnotsGlobalThreshold | None:
    return KnotsGlobalThreshold() if options.trims_globally else None


@register_method(
    "knots",
    options=KnotsOptions,
    paper=(
        "Stoica, Ramesh, Ecsedi, Choshen, Hoffman, ICLR 2025 (Model merging with SVD to tie the KnOTS): "
        "SVD of [ΔW_1 … ΔW_T], shared U, per-task ΣV_tᵀ merged by TIES / DARE-TIES / TA"
    ),
    summary="align the task updates in the shared SVD basis of their concatenation, merge the per-task blocks",
    matrix_only=True,
    default_lambda=0.6,
    global_statistic=_knots_statistic,
)
def knots(deltas: torch.Tensor, options: KnotsOptions, ctx: LayerContext) -> torch.Tensor:
    """KnOTS of one weight matrix: ``U · merge(Σ V_1ᵀ, …, Σ V_Tᵀ)``."""
    u, blocks = _decompose(deltas, options, ctx)
    return u @ knots_merge_blocks(blocks, options, ctx)
