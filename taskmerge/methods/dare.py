"""DARE: drop and rescale task updates, then combine them.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, the drop-and-rescale equations: with drop rate p, m_t ~ Bernoulli(p) entry-wise,
δ̃_t = (1 − m_t) ⊙ δ_t and δ̂_t = δ̃_t / (1 − p), so that E[δ̂_t] = δ_t. The rescaled updates are then
merged by an existing rule: task arithmetic (the paper's default) or TIES-Merging ("DARE + TIES").

Randomness comes from ``ctx.generator()``, seeded from the run seed and the tensor name, so a merge
is reproducible and independent of the order in which tensors are processed. The draws are made on the
CPU and moved to the updates' device, so a ``device="cuda"`` merge drops the same entries as a CPU one
(CUDA's generator would give another, equally valid, draw).

Choices:

* ``combine="ties"`` applies TIES's sign election and disjoint mean to the dropped-and-rescaled updates,
  with TIES's own magnitude trim set by ``ties_keep`` (default 1.0 = no further trimming: DARE already
  keeps only 1 − p of the entries, as in MergeKit's ``dare_ties``; FusionBench's DARE-TIES trims again with
  ``ties_keep=0.2``).
* λ defaults to 0.3, task arithmetic's (the default combination); the sweep grid is task arithmetic's
  0.05–1.0 extended by 1.1–3.0 so that it also covers the TIES combination's range.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from taskmerge.methods.task_arithmetic import TA_LAMBDA_GRID
from taskmerge.methods.ties import disjoint_mean, ties_elect_sign, ties_trim
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["DareOptions", "dare_drop", "dare_sum", "dare"]


def _dropped_rows(deltas: torch.Tensor, p: float, generator: torch.Generator | None,
                  rescale: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(t, δ̂_t)`` task by task: one task's random draw in memory at a time."""
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    draw_on = generator.device if generator is not None else torch.device("cpu")
    for t, d in enumerate(deltas):
        u = torch.rand(d.shape, generator=generator, device=draw_on, dtype=d.dtype)
        kept = (u >= p).to(d.device)  # P(kept) = 1 − p
        del u
        yield t, torch.where(kept, d * scale if scale != 1.0 else d, 0)


def dare_drop(deltas: torch.Tensor, p: float, generator: torch.Generator | None = None,
              rescale: bool = True) -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors by ``1 / (1 − p)`` (DARE).

    The tasks are drawn one after the other from ``generator``, on its device (default: the CPU), and the
    draws are moved to ``deltas``' device.
    ``p = 0`` returns the input unchanged.
    """
    _check_rate(p)
    if p == 0.0:
        return deltas
    out = torch.empty_like(deltas)
    for t, row in _dropped_rows(deltas, p, generator, rescale):
        out[t] = row
    return out


def dare_sum(deltas: torch.Tensor, p: float, generator: torch.Generator | None = None,
             rescale: bool = True) -> torch.Tensor:
    """``Σ_t δ̂_t``: the sum of :func:`dare_drop`'s output (same draws), without holding all T dropped updates."""
    _check_rate(p)
    if p == 0.0:
        return deltas.sum(dim=0)
    total = torch.zeros_like(deltas[0])
    for _, row in _dropped_rows(deltas, p, generator, rescale):
        total += row
    return total


def _check_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dare_drop: the drop rate p must be in [0, 1), got {p}")


class DareOptions(MethodOptions):
    """Options of ``dare``.

    Attributes:
        p: drop rate (the paper's default 0.9).
        rescale: rescale the kept entries by ``1 / (1 − p)`` (the "rescale" in DARE; false = plain random drop).
        combine: how the dropped updates are merged: ``task_arithmetic`` (sum) or ``ties``.
        ties_keep: TIES trim fraction applied after dropping when ``combine="ties"`` (1.0 = none).
    """

    p: float = Field(0.9, ge=0.0, lt=1.0)
    rescale: bool = True
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    ties_keep: float = Field(1.0, gt=0.0, le=1.0)


@register_method(
    "dare",
    options=DareOptions,
    paper="Yu et al., ICML 2024 (Language Models are Super Mario): drop with prob. p, rescale by 1/(1−p)",
    summary="randomly drop a fraction p of each update, rescale the rest, then task arithmetic or TIES",
    default_lambda=0.3,
    lambda_grid=TA_LAMBDA_GRID + tuple(round(1.0 + 0.1 * i, 1) for i in range(1, 21)),
)
def dare(deltas: torch.Tensor, options: DareOptions, ctx: LayerContext) -> torch.Tensor:
    """DARE on one tensor: drop-and-rescale every task update, then combine."""
    generator = ctx.generator()  # on the CPU whatever the device: same draws on a GPU
    if options.combine == "task_arithmetic":
        return dare_sum(deltas, options.p, generator, options.rescale)
    dropped = dare_drop(deltas, options.p, generator, options.rescale)
    trimmed = ties_trim(dropped, options.ties_keep)
    return disjoint_mean(trimmed, ties_elect_sign(trimmed))
