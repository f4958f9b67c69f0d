"""TSV-M: Task Singular Vectors merging.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
TSV-Merge. Per weight matrix, with Δ_t = U_t Σ_t V_tᵀ:

* keep each task's top ``k = ⌊r/T⌋`` singular triplets (r = min(m, n)), the low-rank approximation that
  the paper shows retains the task's accuracy;
* concatenate U = [U_1,k … U_T,k] (m × T·k), Σ = diag(Σ_1,k, …, Σ_T,k), Vᵀ = [V_1,k … V_T,k]ᵀ;
* decorrelate the bases by their orthogonal polar factors (orthogonal Procrustes): U⊥ = P_U Q_Uᵀ where
  U = P_U S_U Q_Uᵀ, and likewise V⊥;
* the merged update is U⊥ Σ V⊥ᵀ (θ = θ₀ + α·U⊥ Σ V⊥ᵀ, α = 1.0 by default, swept on 0.1–3.0 as in the
  paper's protocol).

Implementation: the per-task top-k comes from :func:`taskmerge.linalg.truncated_svd` (no full SVD per
task when k ≪ r), and the polar factors from :func:`taskmerge.linalg.polar`. Signs of singular pairs do
not matter: flipping (u_i, v_i) → (−u_i, −v_i) multiplies U and Vᵀ by the same diagonal ±1 matrix D, and
polar(U D) Σ D polar(D Vᵀ) = polar(U) Σ polar(Vᵀ).

Choices (the official code, AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``, uses
``k = int(r / T)``):

* ``k = max(1, ⌊fraction · r / T⌋)``, at most r. When r < T the official k is 0 and the matrix's update is
  zero; here every task keeps at least its top singular triplet, so the T·k > r concatenated columns (or
  rows) are orthogonalised as far as possible (polar factor of a wide/tall matrix) and a single task's
  update is returned exactly. A ``1 × n`` matrix of T tasks thus merges to Σ_t u_t' σ_t v_t'ᵀ with
  the polar-normalised directions.
* Unused columns are not padded with zeros (the official buffers are m × r): zero columns do not change
  U⊥ Σ V⊥ᵀ, since their singular values are zero.
* Triplets whose singular value is numerically zero (``σ ≤ max(m, n) · ε · σ_1,t``, the usual rank
  tolerance, per task) are dropped before the polar step. Their singular vectors are arbitrary (whatever
  the SVD backend returns for a null space); in the official code they still enter the polar factor and
  rotate the other tasks' directions. Dropping them makes an all-zero task, or a task of rank < k (a LoRA
  update, say), change nothing, and the result independent of the backend. Generic (full-rank) updates
  never hit the tolerance, so the result is the official one there.

**Low-rank route.** When every task's update of a matrix comes in factored form (PEFT LoRA adapters,
``ctx.factors``: Δ_t = s_t B_t A_t), each task's top-k triplets come from
:func:`taskmerge.linalg.lowrank_svd` of (s_t B_t, A_t) (QR of both factors, SVD of an r_t × r_t core): the
m × n update is never decomposed, and a task of LoRA rank r_t < k yields r_t triplets, the ones the dense
route keeps after dropping its numerically zero ones. For a wide matrix (taken on its transpose, below)
the factors are transposed too, (s B A)ᵀ = s Aᵀ Bᵀ. The result equals the dense route's up to rounding;
``lowrank = false`` forces the dense route. Only the merged update U⊥ Σ V⊥ᵀ is formed as an m × n matrix.

* The polar factors keep every singular pair above the dtype's eps (relative): the concatenated bases are
  often ill-conditioned without being rank-deficient (8 × 96 random directions filling R^768 reach
  σ_min/σ_max ~ 1e-5), and the official ``U Vᵀ`` keeps those directions; the usual ``max(m, n)·eps`` rank
  tolerance would drop them (3e-2 relative difference on such a matrix, measured against a float64 run).

Tensors that are not 2-D weight matrices are averaged by the engine (``matrix_only``), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from taskmerge import linalg
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["TsvOptions", "tsv_rank", "tsv_bases", "tsv_m"]


class TsvOptions(MethodOptions):
    """Options of ``tsv_m``."""

    k: int | None = Field(None, ge=1, description=(
        "singular triplets kept per task and matrix (capped at min(m, n)); none: max(1, ⌊fraction·r/T⌋) with "
        "r = min(m, n)"))
    fraction: float = Field(1.0, gt=0.0, le=1.0, description=(
        "share of the rank r = min(m, n) divided among the T tasks when k is none (1.0: the paper's r/T each)"))
    lowrank: bool = Field(True, description=(
        "compute the per-task SVDs from the LoRA factors when the inputs are adapters (same result, no m × n SVD)"))
    svd: linalg.SvdRoute = Field("exact", description=linalg.SVD_ROUTE_DESCRIPTION)


def tsv_rank(shape: tuple[int, int], num_tasks: int, k: int | None = None, fraction: float = 1.0) -> int:
    """The number of singular triplets each task keeps (see the module docstring)."""
    r = min(shape)
    if k is None:
        k = math.floor(fraction * r / num_tasks)
    return max(1, min(k, r))


def tsv_bases(deltas: torch.Tensor, k: int, factors: Sequence[linalg.LowRank] | None = None,
              svd: linalg.SvdRoute = "exact") -> linalg.SVD:
    """The TSV-M factors ``(U⊥, Σ, V⊥ᵀ)`` of a stack of matrices ``deltas`` (T, m, n), ``k`` triplets per task.

    ``U⊥`` is (m, K) and ``V⊥ᵀ`` is (K, n), the polar factors of the concatenated per-task singular
    vectors; ``Σ`` (K,) holds the per-task singular values, task by task. ``K = T·k`` less the numerically
    zero triplets, which are dropped (see the module docstring). The merged update is ``(U⊥ * Σ) @ V⊥ᵀ``.

    With ``factors`` (one :class:`linalg.LowRank` per task, ``factors[t].dense() == deltas[t]``) the
    per-task triplets come from the factors and ``deltas`` is only read for its shape, dtype and device;
    otherwise ``svd`` picks how the dense top-k is computed (:func:`taskmerge.linalg.truncated_svd`).
    """
    if deltas.ndim != 3:
        raise ValueError(f"tsv_bases expects (T, m, n) task updates, got shape {tuple(deltas.shape)}")
    t, m, n = deltas.shape
    if factors is not None and (len(factors) != t or any(f.shape != (m, n) for f in factors)):
        raise ValueError(f"tsv_bases: factors {[f.shape for f in factors]} do not match updates {tuple(deltas.shape)}")
    eps = torch.finfo(deltas.dtype).eps * max(m, n)
    us, ss, vhs = [], [], []
    for i in range(t):
        if factors is not None:
            part = factors[i].to(deltas.dtype, deltas.device).svd(k)
        else:
            part = linalg.truncated_svd(deltas[i], k, svd)
        if part.S.numel() == 0:
            continue
        keep = part.S > eps * part.S[0]  # drop numerically-zero triplets (arbitrary directions)
        if not bool(keep.all()):
            part = linalg.SVD(part.U[:, keep], part.S[keep], part.Vh[keep])
        us.append(part.U)
        ss.append(part.S)
        vhs.append(part.Vh)
    if not ss or sum(s.numel() for s in ss) == 0:
        return linalg.SVD(deltas.new_zeros(m, 0), deltas.new_zeros(0), deltas.new_zeros(0, n))
    u = torch.cat(us, dim=1)
    vh = torch.cat(vhs, dim=0)
    del us, vhs
    # rtol = the dtype's eps: the concatenated bases are often ill-conditioned (σ_min/σ_max ~ 1e-5 for
    # 8 × 96 directions filling R^768) without being rank-deficient; the official U Vᵀ keeps those directions.
    rtol = torch.finfo(deltas.dtype).eps
    return linalg.SVD(linalg.polar(u, rtol), torch.cat(ss), linalg.polar(vh, rtol))


@register_method(
    "tsv_m",
    options=TsvOptions,
    paper=(
        "Gargiulo et al., CVPR 2025 (Task Singular Vectors), TSV-M: U⊥ Σ V⊥ᵀ from per-task top-r/T SVD, "
        "polar-orthogonalised"
    ),
    summary="per-task low-rank SVD, concatenated and decorrelated by the orthogonal polar factor of both bases",
    matrix_only=True,
    default_lambda=1.0,
)
def tsv_m(deltas: torch.Tensor, options: TsvOptions, ctx: LayerContext) -> torch.Tensor:
    """TSV-M of one weight matrix: ``U⊥ Σ V⊥ᵀ`` from each task's top-k singular triplets."""
    k = tsv_rank(tuple(deltas.shape[1:]), deltas.shape[0], options.k, options.fraction)
    factors = ctx.factors if options.lowrank else None
    if deltas.shape[1] < deltas.shape[2]:
        # TSV-M commutes with transposition (the roles of U and V swap); LAPACK's SVD of a wide matrix is
        # several times slower than of its transpose, so the polar factors are taken on the tall side.
        if factors is not None:
            factors = tuple(f.transpose() for f in factors)  # (s B A)ᵀ = s Aᵀ Bᵀ
        return tsv_bases(deltas.transpose(1, 2), k, factors, options.svd).reconstruct().T
    return tsv_bases(deltas, k, factors, options.svd).reconstruct()
