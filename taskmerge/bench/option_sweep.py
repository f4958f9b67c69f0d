"""Choosing a method's own hyper-parameter on validation instead of λ (e.g. AlignMerge-B's gate α).

A method registered with ``option_grid = (option, values)`` and the single-value λ grid ``(1.0,)`` is applied
with no global scale; what the benchmark tunes is then the option: one merged task vector τ per value,
each evaluated once at λ = 1, the value with the best average normalised validation accuracy kept (ties go to
the first value in grid order, as :func:`taskmerge.bench.runner.sweep_lambda`). AlignMerge (``resolved.md``
§AlignMerge 2; App. D, Fig. 4) chooses α from {1.0, 1.4, 1.8, 2.2, 3.0} this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OptionSweep", "swept_option", "sweep_option"]

TaskVector = dict[str, torch.Tensor]


def swept_option(
    spec: Any, lam_grid: Sequence[float], options: Mapping[str, Any] | None = None
) -> tuple[str, tuple[float, ...]] | None:
    """``spec.option_grid`` when the benchmark should sweep it: the λ grid is exactly ``[1.0]`` and the option
    is not fixed in ``options``; ``None`` otherwise (a plain λ sweep)."""
    grid = getattr(spec, "option_grid", None)
    if grid is None or [float(x) for x in lam_grid] != [1.0] or grid[0] in (options or {}):
        return None
    return grid


@dataclass(frozen=True)
class OptionSweep:
    """The outcome of :func:`sweep_option`.

    Attributes:
        option: the swept option's name.
        value: the chosen value.
        tau: the merged task vector at that value.
        score: its average normalised validation accuracy.
        curve: one entry per value, in grid order: ``{option: value, "avg_normalized_val": …, "val": {…},
            "merge_seconds": …}``.
    """

    option: str
    value: float
    tau: TaskVector
    score: float
    curve: list[dict[str, Any]]

    @property
    def merge_seconds(self) -> float:
        """Mean time of one merge over the grid (comparable with a λ-swept method's single merge)."""
        return sum(p["merge_seconds"] for p in self.curve) / len(self.curve)


def sweep_option(
    option: str,
    values: Sequence[float],
    merge: Callable[[float], TaskVector],
    score: Callable[[TaskVector], tuple[float, dict[str, float]]],
) -> OptionSweep:
    """Merge with ``option = v`` for every ``v`` of ``values`` (``merge(v) -> τ``), score each τ on validation
    (``score(τ) -> (average normalised accuracy, per-task accuracies)``) and keep the best (first on ties).

    Only the best τ so far is held, besides the one being scored.
    """
    if not values:
        raise ValueError(f"empty grid for option {option!r}")
    curve: list[dict[str, Any]] = []
    best: tuple[float, TaskVector, float] | None = None
    for value in values:
        t0 = time.perf_counter()
        tau = merge(value)
        seconds = time.perf_counter() - t0
        result, per_task = score(tau)
        curve.append({option: value, "avg_normalized_val": result, "val": per_task, "merge_seconds": seconds})
        if best is None or result > best[2]:
            best = (value, tau, result)
        del tau
    assert best is not None
    return OptionSweep(option, best[0], best[1], best[2], curve)
