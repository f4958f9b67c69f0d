"""Which methods of a benchmark table are separable: paired bootstrap differences between every pair of rows.

The benchmark reports each method's paired difference to Task Arithmetic and TSV-M; this answers the question
a reader asks next, *is the best method really better than the runner-up?*, from the per-example correctness
the results JSON already holds (no model is run)::

    python -m taskmerge.bench.pairwise results/bench_minilm_v2_full_8tasks.json [--methods a,b,c] [--out F.md]

It reads the data-based tables too (``python -m taskmerge.databased.bench``): their data-free starts are rows
beside the trained ones, and since those tables keep the fine-tuned models' accuracies but not their
per-example correctness, the normalization there divides by the fine-tuned accuracy as a constant rather than
resampling it with the test examples (the intervals are then slightly narrower than the benchmark's own).

For the rows ranked by average normalized test accuracy it prints (and writes, with ``--out``) the paired
difference of each row to the best one, and the matrix of paired differences between all the rows, in points
with a 95 % paired bootstrap interval (the same resampled test examples for both rows,
:func:`~taskmerge.bench.stats.paired_bootstrap_diff_ci`), and the set of rows whose difference to the best
has an interval containing 0 ("tied with the best").
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskmerge.bench.report import diff_cell, excludes_zero
from taskmerge.bench.runner import unpack_correct
from taskmerge.bench.stats import paired_bootstrap_diff_ci

Interval = tuple[float, float, float]  # (difference, low, high), fractions


def test_counts(results: Mapping[str, Any]) -> dict[str, int]:
    """Test examples per task: the benchmark's manifests, or a data-based table's ``meta.test_counts``."""
    meta = results["meta"]
    if "manifests" in meta:
        return {t: int(meta["manifests"][t]["counts"]["test"]) for t in meta["tasks"]}
    if meta.get("test_counts"):
        return {t: int(meta["test_counts"][t]) for t in meta["tasks"]}
    raise KeyError("neither 'manifests' nor 'test_counts' in meta: the per-example correctness cannot be unpacked")


def correctness(results: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A row's per-example test correctness, ``{task: bool array}``, unpacked with the test sizes."""
    counts = test_counts(results)
    return {t: unpack_correct(row["correct_test"][t], counts[t]) for t in results["meta"]["tasks"]}


def rows(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Every row with per-example correctness: the method rows, and a data-based table's data-free starts."""
    out = {m: r for m, r in results.get("starts", {}).items() if "correct_test" in r}
    out.update(results["methods"])
    return out


def ranked_methods(results: Mapping[str, Any], methods: Sequence[str] | None = None) -> list[str]:
    """``methods`` (default: every row) by average normalized test accuracy, best first."""
    table = rows(results)
    names = list(table) if methods is None else list(methods)
    missing = [m for m in names if m not in table]
    if missing:
        raise KeyError(f"no row {missing[0]!r} in the results (rows: {', '.join(table)})")
    return sorted(names, key=lambda m: -float(table[m]["avg_normalized_test"]))


def normalizer(results: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuned models' per-example correctness, or their accuracies where only those are kept."""
    ft = results["finetuned"]
    if "correct_test" in ft:
        return correctness(results, ft)
    return {t: float(ft["test"][t]) for t in results["meta"]["tasks"]}


def pairwise_differences(
    results: Mapping[str, Any], methods: Sequence[str] | None = None, n_boot: int | None = None, seed: int = 0
) -> dict[str, dict[str, Interval]]:
    """``{a: {b: (Δ, low, high)}}``: paired difference of the average normalized test accuracy, row ``a`` minus
    row ``b``, for every ordered pair of ``methods`` (ranked best first)."""
    names = ranked_methods(results, methods)
    n_boot = int(n_boot if n_boot is not None else results["meta"].get("n_boot", 1000))
    ft = normalizer(results)
    table = rows(results)
    correct = {m: correctness(results, table[m]) for m in names}
    out: dict[str, dict[str, Interval]] = {m: {} for m in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d, lo, hi = paired_bootstrap_diff_ci(correct[a], correct[b], ft, n_boot, seed=seed)
            out[a][b] = (d, lo, hi)
            out[b][a] = (-d, -hi, -lo)
    return out


def tied_with_best(diffs: Mapping[str, Mapping[str, Interval]]) -> list[str]:
    """The best row and every row whose paired difference to it has an interval containing 0."""
    names = list(diffs)
    best = names[0]
    return [best] + [m for m in names[1:] if not excludes_zero(diffs[best][m])]


def markdown(results: Mapping[str, Any], diffs: Mapping[str, Mapping[str, Interval]]) -> str:
    """The differences to the best row and the full matrix, as Markdown."""
    names = list(diffs)
    meta = results["meta"]
    best = names[0]
    lines = [f"# Paired differences between methods: {len(meta['tasks'])} tasks, {meta['recipe']['kind']} "
             f"fine-tuning, protocol {meta.get('split_protocol', 'v1')}", "",
             "Average normalized test accuracy, row minus column, in points, with a 95 % paired bootstrap interval "
             f"({meta.get('n_boot', 1000)} replicates over test examples); * = the interval excludes 0.", "",
             f"Tied with the best ({best}): " + ", ".join(tied_with_best(diffs)) + ".", "",
             f"| Method | Avg normalized | Δ vs {best} |", "|---|---|---|"]
    table = rows(results)
    for m in names:
        avg = 100 * float(table[m]["avg_normalized_test"])
        lines.append(f"| {m} | {avg:.1f} | " + ("–" if m == best else diff_cell(diffs[m][best])) + " |")
    lines += ["", "| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join("–" if a == b else diff_cell(diffs[a][b]) for b in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m taskmerge.bench.pairwise RESULTS.json [--methods a,b] [--out F.md]``."""
    p = argparse.ArgumentParser(prog="python -m taskmerge.bench.pairwise", description=__doc__.splitlines()[0])
    p.add_argument("results", help="a results JSON written by the benchmark")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: every row)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (default: the table's)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    args = p.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        diffs = pairwise_differences(results, args.methods.split(",") if args.methods else None, args.n_boot)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {args.results}: {exc}") from None
    text = markdown(results, diffs)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
