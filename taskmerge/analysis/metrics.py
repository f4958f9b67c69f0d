"""Accuracy metrics of merged models: normalized accuracy and NAI (DC-Merge Eqs. 29–30).

Plain functions over per-task accuracies, given either as mappings ``{task: accuracy}`` (the tasks of
every argument must match) or as equally long sequences in one task order. Accuracies may be fractions
or percentages, as long as all arguments use the same scale: the results are ratios (1.0 = the
fine-tuned model's accuracy), multiply by 100 for the percentages the papers print.

* normalized accuracy of task i (Eq. 29, per term): ``acc(θ_M, i) / acc(θ_i, i)``;
* average normalized accuracy (Eq. 29): the mean of those over the tasks;
* NAI, normalized accuracy improvement (Eq. 30, from Iso-C): ``(acc(θ_M,i) − acc(θ₀,i)) / (acc(θ_i,i) −
  acc(θ₀,i))`` with ``θ₀`` the zero-shot model.

A ratio whose denominator is zero (a fine-tuned accuracy of 0, or a fine-tuned model no better than
zero-shot for NAI) is undefined: the functions raise :class:`ValueError` naming the task, never return
NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "normalized_accuracies",
    "normalized_accuracy",
    "nai",
    "mean_nai",
    "pearson_r",
]

Accuracies = Mapping[str, float] | Sequence[float]


def _aligned(**named: Accuracies) -> tuple[list[str], dict[str, list[float]]]:
    """Align several per-task accuracy collections on one task order."""
    kinds = {isinstance(v, Mapping) for v in named.values()}
    if len(kinds) > 1:
        raise ValueError("give every accuracy collection as a mapping, or every one as a sequence")
    first_name, first = next(iter(named.items()))
    if isinstance(first, Mapping):
        tasks = list(first)
        for name, values in named.items():
            if set(values) != set(tasks):
                missing = sorted(set(tasks) ^ set(values))
                raise ValueError(f"{name} and {first_name} cover different tasks: {missing}")
        columns = {name: [float(values[t]) for t in tasks] for name, values in named.items()}
    else:
        length = len(first)
        for name, values in named.items():
            if len(values) != length:
                raise ValueError(f"{name} has {len(values)} tasks, {first_name} has {length}")
        tasks = [str(i) for i in range(length)]
        columns = {name: [float(v) for v in values] for name, values in named.items()}
    if not tasks:
        raise ValueError("no tasks given")
    for name, values in columns.items():
        for task, v in zip(tasks, values, strict=True):
            if not math.isfinite(v):
                raise ValueError(f"{name}: accuracy of task {task} is not finite ({v})")
    return tasks, columns


def normalized_accuracies(merged: Accuracies, finetuned: Accuracies) -> dict[str, float]:
    """Per-task ``acc(θ_M, i) / acc(θ_i, i)`` (the terms of Eq. 29), keyed by task."""
    tasks, cols = _aligned(merged=merged, finetuned=finetuned)
    out = {}
    for task, m, f in zip(tasks, cols["merged"], cols["finetuned"], strict=True):
        if f == 0:
            raise ValueError(f"task {task}: the fine-tuned accuracy is 0, normalized accuracy is undefined")
        out[task] = m / f
    return out


def normalized_accuracy(merged: Accuracies, finetuned: Accuracies) -> float:
    """Eq. 29: average normalized accuracy ``(1/T) Σ_i acc(θ_M, i) / acc(θ_i, i)``."""
    values = normalized_accuracies(merged, finetuned)
    return sum(values.values()) / len(values)


def nai(merged: Accuracies, finetuned: Accuracies, zeroshot: Accuracies) -> dict[str, float]:
    """Eq. 30 per task: ``(acc(θ_M,i) − acc(θ₀,i)) / (acc(θ_i,i) − acc(θ₀,i))``, keyed by task."""
    tasks, cols = _aligned(merged=merged, finetuned=finetuned, zeroshot=zeroshot)
    out = {}
    for task, m, f, z in zip(tasks, cols["merged"], cols["finetuned"], cols["zeroshot"], strict=True):
        if f == z:
            raise ValueError(
                f"task {task}: fine-tuned and zero-shot accuracies are equal ({f}), NAI is undefined"
            )
        out[task] = (m - z) / (f - z)
    return out


def mean_nai(merged: Accuracies, finetuned: Accuracies, zeroshot: Accuracies) -> float:
    """Average of :func:`nai` over the tasks."""
    values = nai(merged, finetuned, zeroshot)
    return sum(values.values()) / len(values)


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient (Fig. 3c reports R = 0.64 for projected DirSim vs NAI)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        raise ValueError("Pearson R needs at least two points")
    mx = sum(x) / len(x)
    my = sum(y) / len(y)
    dx = [a - mx for a in x]
    dy = [b - my for b in y]
    sxx = sum(a * a for a in dx)
    syy = sum(b * b for b in dy)
    if sxx == 0 or syy == 0:
        raise ValueError("Pearson R is undefined for a constant sequence")
    return sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
