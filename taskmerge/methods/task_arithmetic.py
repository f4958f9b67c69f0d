"""Task Arithmetic.

Ilharco et al., "Editing models with task arithmetic", ICLR 2023, addition of task vectors:
θ = θ₀ + λ Σ_t τ_t with τ_t = θ_t − θ₀. The paper picks λ on held-out validation data from
{0.05, 0.10, …, 1.0}; 0.3 is the usual default for CLIP ViTs (also FusionBench's).
"""

from __future__ import annotations

import torch

from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["TaskArithmeticOptions", "task_arithmetic", "TA_LAMBDA_GRID"]

#: λ ∈ {0.05, 0.10, …, 1.00}, the task-arithmetic paper's validation grid.
TA_LAMBDA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))


class TaskArithmeticOptions(MethodOptions):
    """Task arithmetic has no options besides λ (applied by the engine)."""


@register_method(
    "task_arithmetic",
    options=TaskArithmeticOptions,
    paper="Ilharco et al., ICLR 2023 (Editing models with task arithmetic), θ = θ₀ + λ Σ_t τ_t",
    summary="sum of the task updates, scaled by λ",
    default_lambda=0.3,
    lambda_grid=TA_LAMBDA_GRID,
    linear=lambda options, num_tasks: 1.0,
)
def task_arithmetic(deltas: torch.Tensor, options: TaskArithmeticOptions, ctx: LayerContext) -> torch.Tensor:
    """Return the multi-task vector ``τ_MTL = Σ_t Δ_t`` (the engine applies λ)."""
    return deltas.sum(dim=0)
