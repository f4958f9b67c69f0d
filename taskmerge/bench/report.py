"""Small helpers shared by the benchmarks' result rows and Markdown reports (text, vision and data-based
suites): the mean of a list of scores and the table cells of a fraction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["mean", "pct", "fmt", "avg_cell", "choice_cell"]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean of ``values``; NaN for an empty sequence."""
    return sum(values) / len(values) if values else float("nan")


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or ``–`` for a missing value (``None`` or NaN)."""
    return "–" if x is None or x != x else format(x, spec)


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (``0.8754`` → ``87.5``), or ``–`` for a missing value."""
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def avg_cell(row: Mapping[str, Any], key: str) -> str:
    """``87.5 [86.9, 88.1]``: the row's average ``key`` and, when the row has it (``row["ci95"][key]``), its 95 %
    interval."""
    ci = (row.get("ci95") or {}).get(key)
    return pct(row.get(key)) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def choice_cell(row: Mapping[str, Any]) -> str:
    """A table's λ cell: λ, followed by the method's own hyper-parameter when that was swept instead."""
    chosen = ", ".join(f"{k} = {v:g}" for k, v in (row.get("chosen_option") or {}).items())
    return f"{row['lambda']:g} ({chosen})" if chosen else f"{row['lambda']:g}"


def excludes_zero(interval: Sequence[float]) -> bool:
    """Whether a ``(difference, low, high)`` interval excludes 0."""
    return interval[1] > 0 or interval[2] < 0


def diff_cell(d: Sequence[float] | None) -> str:
    """A paired difference ``(difference, low, high)`` (fractions) as ``+1.2 [+0.4, +2.0] *`` in points; ``*``
    when the interval excludes 0; ``–`` when there is none."""
    if not d:
        return "–"
    est, lo, hi = (100 * x for x in d)
    return f"{est:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if excludes_zero(d) else "")
