"""Figure: normalized accuracy against the number of merged tasks (8 / 14 / 20), from the benchmark's JSONs.

    python scripts/plot_tasks_curve.py [--results results] [--pattern bench_minilm_v2_full_{n}tasks]
                                       [--sizes 8,14,20] [--out results/bench_minilm_v2_tasks_curve.png]

One line per method (TA, TIES, TSV-M, Iso-CTS, DC-Merge, AlignMerge-B / -O, MDA-TA by default) through the
average normalized test accuracy of each setting, with its 95 % bootstrap interval as error bars, and the
pretrained encoder's zero-shot row for reference (as in the TSV / Iso-C papers' task-count figures). Settings
whose JSON is missing are skipped.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

DEFAULT_METHODS: tuple[str, ...] = (
    "task_arithmetic", "ties", "tsv_m", "iso_cts", "dc_merge", "alignmerge_b", "alignmerge_o", "mda_ta",
)
LABELS: dict[str, str] = {
    "pretrained": "Pretrained (zero-shot)", "task_arithmetic": "TA", "ties": "TIES", "tsv_m": "TSV-M",
    "iso_cts": "Iso-CTS", "dc_merge": "DC-Merge", "alignmerge_b": "AlignMerge-B", "alignmerge_o": "AlignMerge-O",
    "mda_ta": "MDA-TA",
}

Point = tuple[int, float, float, float]  # (number of tasks, estimate, low, high)


def load_curves(paths: Sequence[Path], methods: Sequence[str] = DEFAULT_METHODS) -> dict[str, list[Point]]:
    """``{row: [(T, avg normalized test, CI low, CI high), ...]}`` from result JSONs (rows: ``"pretrained"``
    and ``methods``), ordered by T; a row absent from a JSON is left out of that setting."""
    curves: dict[str, list[Point]] = {}
    for path in paths:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
        t = len(res["meta"]["tasks"])
        rows = {"pretrained": res["pretrained"], **{m: res["methods"][m] for m in methods if m in res["methods"]}}
        for name, row in rows.items():
            est = float(row["avg_normalized_test"])
            lo, hi = (row.get("ci95") or {}).get("avg_normalized_test", (est, est))
            curves.setdefault(name, []).append((t, est, float(lo), float(hi)))
    return {k: sorted(v) for k, v in curves.items()}


def plot(curves: dict[str, list[Point]], out: Path, title: str = "") -> Path:
    """Write the figure (PNG) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    for name, pts in curves.items():
        ts = [p[0] for p in pts]
        est = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        style = {"linestyle": "--", "color": "black"} if name == "pretrained" else {"marker": "o"}
        ax.errorbar(ts, est, yerr=err, capsize=3, label=LABELS.get(name, name), **style)
    all_t = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xticks(all_t)
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized accuracy (%), 95 % bootstrap interval")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder of the result JSONs (default results/)")
    p.add_argument("--pattern", default="bench_minilm_v2_full_{n}tasks", help="JSON stem with {n} for the task count")
    p.add_argument("--sizes", default="8,14,20", help="task counts (default 8,14,20)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method rows")
    p.add_argument("--out", default="results/bench_minilm_v2_tasks_curve.png", help="PNG to write")
    args = p.parse_args(argv)
    paths = [Path(args.results) / f"{args.pattern.format(n=int(n))}.json" for n in args.sizes.split(",")]
    found = [q for q in paths if q.exists()]
    if not found:
        raise SystemExit(f"none of {', '.join(map(str, paths))} exists; run the benchmark first")
    curves = load_curves(found, args.methods.split(","))
    print(plot(curves, Path(args.out), "MiniLM-L6, full fine-tuning, protocol v2"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
