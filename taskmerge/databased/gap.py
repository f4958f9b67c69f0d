"""How much of the merge-to-fine-tuned gap each data-based row closes, next to what exact alignment reaches.

A data-based row starts from a data-free merge at accuracy ``a_start`` (the test average over tasks) and ends at
``a_row``; the individual fine-tuned models reach ``a_ft``. The share of the gap it closes is

    (a_row − a_start) / (a_ft − a_start),

with the 95 % interval of the paired difference ``a_row − a_start`` (``delta_ci95``, over the test examples)
divided by the same gap. MOMA's ceiling check (paper §3.3, Eq. 8, :mod:`taskmerge.databased.ceiling`) gives, for
the WA / TA / TIES merges at the same λ, the accuracy of the exact orthogonal (Procrustes) and least-squares
feature maps absorbed into the heads: the share of the gap a rotation (resp. any linear map) of the merged
features closes. A MOMA row's *share of the ceiling* is its own gain over the orthogonal map's gain; MOMA also
learns a mask over the task vector, so it can exceed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["attach_ceiling", "gap_closed", "gap_section"]


def gap_closed(start: float, value: float, finetuned: float) -> float:
    """``(value − start) / (finetuned − start)``; NaN when the fine-tuned models are not above the start."""
    gap = finetuned - start
    return (value - start) / gap if gap > 0 else float("nan")


def attach_ceiling(results: dict[str, Any], ceiling: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Attach a ceiling-check JSON (``scripts/moma_ceiling.py``) to data-based results of the same benchmark.

    Raises ``ValueError`` when the tasks differ, or when a merge present in both was taken at another λ (the
    ceiling would then describe another merge).
    """
    if list(ceiling["meta"]["tasks"]) != list(results["meta"]["tasks"]):
        raise ValueError(f"ceiling {source or ''}: its tasks {ceiling['meta']['tasks']} differ from the results' "
                         f"{results['meta']['tasks']}")
    for base, c in ceiling["methods"].items():
        start = results["starts"].get(base)
        if start is not None and float(start["lambda"]) != float(c["lambda"]):
            raise ValueError(f"ceiling {source or ''}: {base} at λ={c['lambda']:g}, the results' start at "
                             f"λ={start['lambda']:g}")
    results["ceiling"] = {"source": source, "fit_split": ceiling["meta"].get("fit_split"),
                          "methods": {b: {"lambda": c["lambda"], **c["average"]} for b, c in ceiling["methods"].items()}}
    return results


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.0f} %"


def _share(ceiling: Mapping[str, Any] | None, kind: str) -> float:
    """The ceiling check's own share of the gap closed by map ``kind`` (NaN when absent or undefined)."""
    value = (ceiling or {}).get(kind, {}).get("gap_closed")
    return float("nan") if value is None else float(value)


def gap_section(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines: per data-based row, its start, its gain, the share of the gap it closes (with the
    interval), and, for rows whose start has a ceiling, the orthogonal and linear maps' shares."""
    ceiling = (results.get("ceiling") or {}).get("methods", {})
    ft = results["finetuned"]["avg_test"]
    fit = (results.get("ceiling") or {}).get("fit_split")
    lines = ["", "## Gap to the fine-tuned models closed, against MOMA's ceiling", "",
             "*gap closed*: (row − start) / (fine-tuned − start) on the average test accuracy, with the paired 95 % "
             "interval of the row's Δ divided by the same gap. *orthogonal* / *linear ceiling*: the same share for "
             "the exact Procrustes / least-squares feature map of the start's merge absorbed into the heads (no "
             "training; `scripts/moma_ceiling.py`" + (f", maps fitted on the `{fit}` split" if fit else "") + "). "
             "*share of the orthogonal ceiling*: the row's gain over the orthogonal map's. The ceiling columns use the "
             "ceiling check's own evaluation of the start and of the fine-tuned models.", "",
             f"Fine-tuned average: {100 * ft:.1f} %.", "",
             "| Method | start | start acc | row acc | gap closed [95 %] | orthogonal ceiling | linear ceiling | "
             "share of the orthogonal ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        s = results["starts"][r["start_method"]]["avg_test"]
        closed = gap_closed(s, r["avg_test"], ft)
        ci = (r.get("delta_ci95") or {}).get("avg_test")
        cell = _pct(closed)
        if ci and ft > s:
            cell += f" [{_pct(ci[1] / (ft - s))}, {_pct(ci[2] / (ft - s))}]"
        c = ceiling.get(r["start_method"])  # shares as the ceiling check computed them, on its own evaluations
        orth = _share(c, "orthogonal")
        lin = _share(c, "linear")
        gain = c["orthogonal"]["accuracy"] - c["identity"]["accuracy"] if c else 0.0
        share = (r["avg_test"] - s) / gain if gain > 0 else float("nan")
        lines.append(f"| {name} | {r['start_method']} ({r['start_lambda']:g}) | {100 * s:.1f} | {100 * r['avg_test']:.1f} "
                     f"| {cell} | {_pct(orth)} | {_pct(lin)} | {_pct(share)} |")
    return lines
