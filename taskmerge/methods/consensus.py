"""Consensus Merging with TALL masks.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.

* TALL masks: m_t = 1{|τ_t| ≥ λ_t · |τ_MTL − τ_t|}, with τ_MTL the merged multi-task
  vector (task arithmetic Σ_t τ_t, or TIES). An entry is "used" by task t when τ_t dominates what the
  other tasks add there.
* Consensus Merging: m_consensus = 1{Σ_t m_t ≥ k} and τ = m_consensus ⊙ τ_MTL. k = 2
  removes both "catastrophic" weights (used by no task) and "selfish" ones (used by one task only); k = 0
  gives back τ_MTL.

Choices, compared with the official code (nik-dim/tall_masks, ``generate_task_masks``,
``construct_consensus_mask``, ``aggregation.py``):

* The mask uses a strict ``>`` as the official code does (the paper writes ``≥``); they differ only where
  both sides are 0, where ``>`` says an all-zero update does not use the entry.
* ``tall_lambda`` is one value for all tasks, default 0.4, the middle of the official per-task search range
  {0.2, …, 0.6} (that search needs each task's validation data, which a data-free merge does not have).
* ``base="ties"`` builds τ_MTL as the official consensus-TIES does: TIES with trim ``ties_keep`` (20 %) and
  the *disjoint sum* (``dis-sum``) aggregation, used both for the masks and as the merged vector; the
  official code trims over the flattened model, here per tensor (see :mod:`taskmerge.methods.ties`).
* λ: default 0.3 with task arithmetic's grid 0.05–1.0; τ_MTL has task arithmetic's scale in both bases.

``tall_masks`` itself (the TALL-mask *compression* method of the same paper, θ_t = θ₀ + m_t ⊙ τ_MTL) is not
registered: it reconstructs one model per task and needs the task identity at inference, so it does not
produce the single merged model this registry returns. The masks are available as :func:`tall_masks`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from taskmerge.methods.task_arithmetic import TA_LAMBDA_GRID
from taskmerge.methods.ties import disjoint_sum, ties_elect_sign, ties_trim
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["ConsensusOptions", "tall_masks", "consensus_count", "consensus"]


def tall_masks(deltas: torch.Tensor, tall_lambda: float, tau: torch.Tensor | None = None) -> torch.Tensor:
    """TALL masks ``m_t = |Δ_t| > λ·|τ − Δ_t|`` as a bool tensor (T, *shape); ``τ`` defaults to ``Σ_t Δ_t``."""
    if tau is None:
        tau = deltas.sum(dim=0)
    return deltas.abs() > tall_lambda * (tau - deltas).abs()


def consensus_count(deltas: torch.Tensor, tall_lambda: float, tau: torch.Tensor) -> torch.Tensor:
    """``Σ_t m_t``: the number of tasks whose TALL mask selects each entry (int32, shape ``deltas.shape[1:]``).

    Loops over tasks so that only one (*shape) temporary is alive at a time.
    """
    count = torch.zeros(deltas.shape[1:], dtype=torch.int32, device=deltas.device)
    for d in deltas:
        count += d.abs() > tall_lambda * (tau - d).abs()
    return count


class ConsensusOptions(MethodOptions):
    """Options of ``consensus``."""

    tall_lambda: float = Field(0.4, ge=0.0, description=(
        "λ of the TALL masks m_t = 1{|τ_t| ≥ λ·|τ_MTL − τ_t|}, the same for every task"))
    k: int = Field(2, ge=0, description=(
        "an entry is kept when the TALL masks of at least k tasks select it (k = 2 removes 'selfish' and "
        "'catastrophic' weights; k = 0 keeps everything)"))
    base: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description=(
        "the multi-task vector that is masked: task_arithmetic (Σ_t Δ_t, Consensus TA) or ties (TIES with "
        "its disjoint sum, Consensus TIES)"))
    ties_keep: float = Field(0.2, gt=0.0, le=1.0, description="with base=ties: TIES's trim fraction (the paper's 20 %)")


@register_method(
    "consensus",
    options=ConsensusOptions,
    paper=(
        "Wang et al., ICML 2024 (TALL masks / Consensus Merging): m_t = 1{|τ_t| ≥ λ|τ_MTL − τ_t|}, "
        "τ = 1{Σ_t m_t ≥ k} ⊙ τ_MTL"
    ),
    summary="task arithmetic (or TIES) restricted to entries that the TALL masks of at least k tasks select",
    default_lambda=0.3,
    lambda_grid=TA_LAMBDA_GRID,
)
def consensus(deltas: torch.Tensor, options: ConsensusOptions, ctx: LayerContext) -> torch.Tensor:
    """Consensus merge of one tensor: ``1{Σ_t m_t ≥ k} ⊙ τ_MTL``."""
    if options.base == "task_arithmetic":
        tau = deltas.sum(dim=0)
    else:
        trimmed = ties_trim(deltas, options.ties_keep)
        tau = disjoint_sum(trimmed, ties_elect_sign(trimmed))
    if options.k == 0:
        return tau
    keep = consensus_count(deltas, options.tall_lambda, tau) >= options.k
    return torch.where(keep, tau, 0)
