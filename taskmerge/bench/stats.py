"""Bootstrap confidence intervals for the benchmark's averages over tasks.

The benchmark reports the mean over tasks of a per-task test accuracy (optionally divided by a per-task
normaliser, e.g. the fine-tuned model's accuracy: the *normalised accuracy* of the TSV / Iso-C papers). Its
uncertainty comes from the finite test sets, so the intervals resample **test examples within each task**
(the tasks themselves are fixed): for every bootstrap replicate ``b`` and task ``t`` a resample of the
``n_t`` test indices with replacement is drawn, the statistic

    A_b = (1/T) Σ_t  acc_t(idx_{b,t}) / z_t

is recomputed, and the percentile interval of ``{A_b}`` is returned (Efron & Tibshirani 1993, ch. 13).

:func:`paired_bootstrap_diff_ci` compares two methods evaluated on the **same** examples: both are
resampled with the same indices, so the interval of ``A(a) - A(b)`` excludes the example-level noise the
two share (a method compared with itself gives exactly zero).

Normalisers: a float ``z_t`` is held fixed (the fine-tuned accuracy as a constant); an array of the
normalising model's per-example correctness on the same test examples is resampled with the same indices,
giving the ratio of the two resampled accuracies (accounts for the fine-tuned model's own test noise).

Random numbers: one ``numpy.random.default_rng(seed)``; tasks are visited in sorted name order and each
draws an ``(n_boot, n_t)`` index matrix, so results do not depend on the mapping's insertion order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Normalizer = Mapping[str, "float | np.ndarray"]


def _as_correct(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"task {name!r}: per-example correctness must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"task {name!r}: per-example correctness must hold only 0/1 or booleans")
    return arr.astype(np.float64)


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _normalizer_of(name: str, normalizer: Normalizer | None, n: int) -> float | np.ndarray:
    if normalizer is None:
        return 1.0
    if name not in normalizer:
        raise KeyError(f"normalizer has no entry for task {name!r}")
    z = normalizer[name]
    if np.ndim(z) == 0:
        if not float(z) > 0:
            raise ValueError(f"task {name!r}: normalizer must be positive, got {z}")
        return float(z)
    arr = _as_correct(f"{name} (normalizer)", z)
    if arr.size != n:
        raise ValueError(f"task {name!r}: normalizer has {arr.size} examples, correctness has {n}")
    return arr


def _point(correct: Mapping[str, np.ndarray], normalizer: Normalizer | None) -> float:
    total = 0.0
    for name, c in correct.items():
        z = _normalizer_of(name, normalizer, c.size)
        total += c.mean() / (z if isinstance(z, float) else z.mean())
    return total / len(correct)


def _replicates(
    groups: list[Mapping[str, np.ndarray]], normalizer: Normalizer | None, n_boot: int, seed: int
) -> list[np.ndarray]:
    """Bootstrap replicates ``(n_boot,)`` of the task-average of each mapping in ``groups``, all resampled
    with the same indices (the mappings share their task names and per-task sizes)."""
    rng = np.random.default_rng(seed)
    names = sorted(groups[0])
    sums = [np.zeros(n_boot) for _ in groups]
    for name in names:
        arrays = [g[name] for g in groups]
        n = arrays[0].size
        z = _normalizer_of(name, normalizer, n)
        idx = rng.integers(0, n, size=(n_boot, n))
        denom = z if isinstance(z, float) else z[idx].mean(axis=1)
        if not isinstance(z, float) and (denom <= 0).any():
            raise ValueError(f"task {name!r}: a bootstrap resample of the normalizer has zero accuracy")
        for s, arr in zip(sums, arrays):
            s += arr[idx].mean(axis=1) / denom
    return [s / len(names) for s in sums]


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _prepare(by_task: Mapping[str, object], what: str) -> dict[str, np.ndarray]:
    if not by_task:
        raise ValueError(f"{what}: no tasks")
    return {name: _as_correct(name, v) for name, v in by_task.items()}


def bootstrap_average_ci(
    correct_by_task: Mapping[str, np.ndarray],
    normalizer: Normalizer | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean over tasks of the per-task accuracy (÷ the task's normaliser when given) with its percentile
    bootstrap interval, resampling test examples within each task (module docstring).

    Args:
        correct_by_task: task name -> per-example correctness (booleans or 0/1) on its test split.
        normalizer: task name -> a positive float (held fixed) or the normalising model's per-example
            correctness on the same examples (resampled with the same indices); ``None``: no normalisation.
        n_boot: bootstrap replicates.
        seed: seed of the resampling.
        level: confidence level of the two-sided percentile interval.

    Returns:
        ``(estimate, low, high)``; the estimate is computed on the full test sets.
    """
    _check_level(level, n_boot)
    correct = _prepare(correct_by_task, "bootstrap_average_ci")
    (reps,) = _replicates([correct], normalizer, n_boot, seed)
    return (_point(correct, normalizer), *_interval(reps, level))


def paired_bootstrap_diff_ci(
    a_by_task: Mapping[str, np.ndarray],
    b_by_task: Mapping[str, np.ndarray],
    normalizer: Normalizer | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Difference ``A(a) - A(b)`` of two methods' task averages (as in :func:`bootstrap_average_ci`) with a
    paired percentile bootstrap interval: each replicate resamples the same test indices for both methods.

    ``a_by_task`` and ``b_by_task`` must hold the same tasks with the same number of examples each (the
    correctness of both methods on identical test splits). An interval that excludes 0 means the
    difference is larger than the test sets' sampling noise at this level.

    Returns:
        ``(difference, low, high)``.
    """
    _check_level(level, n_boot)
    a = _prepare(a_by_task, "paired_bootstrap_diff_ci (a)")
    b = _prepare(b_by_task, "paired_bootstrap_diff_ci (b)")
    if set(a) != set(b):
        raise ValueError(f"paired bootstrap: tasks differ: {sorted(set(a) ^ set(b))}")
    for name in a:
        if a[name].size != b[name].size:
            raise ValueError(f"paired bootstrap: task {name!r} has {a[name].size} vs {b[name].size} examples")
    reps_a, reps_b = _replicates([a, b], normalizer, n_boot, seed)
    return (_point(a, normalizer) - _point(b, normalizer), *_interval(reps_a - reps_b, level))


__all__ = ["bootstrap_average_ci", "paired_bootstrap_diff_ci"]
