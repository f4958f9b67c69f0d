"""Weight averaging (uniform model soup).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, the uniform soup
θ = (1/T) Σ_t θ_t. Written over task updates, θ = θ₀ + λ·(1/T) Σ_t Δ_t with λ = 1.
"""

from __future__ import annotations

import torch

from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["WeightAveragingOptions", "weight_averaging"]


class WeightAveragingOptions(MethodOptions):
    """Weight averaging has no options."""


@register_method(
    "weight_averaging",
    options=WeightAveragingOptions,
    paper="Wortsman et al., ICML 2022 (model soups), uniform soup θ = (1/T) Σ_t θ_t",
    summary="mean of the task updates (uniform model soup)",
    default_lambda=1.0,
    lambda_grid=(1.0,),
    linear=lambda options, num_tasks: float(num_tasks),
)
def weight_averaging(deltas: torch.Tensor, options: WeightAveragingOptions, ctx: LayerContext) -> torch.Tensor:
    """Return ``(1/T) Σ_t Δ_t``; with λ = 1 this is the uniform soup ``(1/T) Σ_t θ_t``."""
    return deltas.mean(dim=0)
