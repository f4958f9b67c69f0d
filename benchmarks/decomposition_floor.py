"""Where TSV-M's time goes on CLIP ViT-B/32 shapes: the dense decompositions alone, ours and FusionBench's.

TSV-M needs, per matrix, each task's top ``k = r / T`` singular triplets and the polar factors of the
two stacked bases. This script times exactly those decompositions on the benchmark's task vectors,
one matrix shape at a time, and multiplies by how often each shape occurs in the model:

* ``fusionbench``: what FusionBench 0.2.33 runs (a float32 ``torch.linalg.svd`` per task and per stack);
* ``taskmerge``: :func:`taskmerge.linalg.truncated_svd` per task and :func:`taskmerge.linalg.polar` per
  stack (float64 Gram eigendecompositions, exact to float32 rounding);
* ``float32 eigh``: the float32 Gram eigendecompositions alone, the fastest dense route (1e-3 off, so
  not used), a floor for any Gram-based implementation on this CPU.

The sum over the model is a lower bound on a whole merge's time for each route (every other step is
matrix products); ``fusionbench_total / floor`` bounds the speed-up any implementation of that route can
reach against FusionBench's whole merge (``--fusionbench-seconds``, measured by ``merge_speed.py``).

    python benchmarks/decomposition_floor.py --fusionbench-seconds 89.03 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_scale import cpu_model  # noqa: E402
from vit_shapes import task_vectors, vit_b32_shapes  # noqa: E402

from taskmerge.linalg import polar, truncated_svd  # noqa: E402


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _stacks(mats: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    decs = [truncated_svd(m, k) for m in mats]
    return torch.cat([d.U for d in decs], dim=1), torch.cat([d.Vh.T for d in decs], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fusionbench-seconds", type=float, help="FusionBench's whole TSV-M merge, for the bound")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()

    counts = Counter(shape for shape in vit_b32_shapes().values() if len(shape) == 2)
    tvs = task_vectors(args.tasks, layers=1)
    examples = {}
    for name, shape in vit_b32_shapes(1).items():
        if len(shape) == 2 and shape not in examples:
            examples[shape] = [tv[name] for tv in tvs]

    rows = []
    for shape, mats in examples.items():
        k = max(1, min(shape) // args.tasks)
        u_stack, v_stack = _stacks(mats, k)

        def fusionbench() -> None:
            for m in mats:
                torch.linalg.svd(m, full_matrices=False)
            for s in (u_stack, v_stack):
                torch.linalg.svd(s, full_matrices=False)

        def ours() -> None:
            for m in mats:
                truncated_svd(m, k)
            polar(u_stack)
            polar(v_stack)

        def eigh32() -> None:
            for m in [*mats, u_stack, v_stack]:
                torch.linalg.eigh(m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T)

        row = {"shape": list(shape), "count": counts[shape], "k": k}
        for label, fn in (("fusionbench", fusionbench), ("taskmerge", ours), ("float32_eigh", eigh32)):
            row[label + "_s"] = _best_of(fn, args.repeats)
        rows.append(row)
        print(f"  {shape}: {row}", file=sys.stderr)

    totals = {label: sum(r[label + "_s"] * r["count"] for r in rows)
              for label in ("fusionbench", "taskmerge", "float32_eigh")}
    report = {"benchmark": "decomposition_floor", "tasks": args.tasks, "rows": rows, "model_totals_s": totals,
              "machine": {"platform": platform.platform(), "cpu": cpu_model(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    if args.fusionbench_seconds:
        report["fusionbench_merge_s"] = args.fusionbench_seconds
        report["max_speedup"] = {label: args.fusionbench_seconds / t for label, t in totals.items()}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, args.repeats)
    print("\n" + table)
    if args.md:
        args.md.write_text(table)


def markdown(report: dict, repeats: int) -> str:
    """The report as a Markdown table with the machine and the bound."""
    m, totals = report["machine"], report["model_totals_s"]
    lines = [f"CLIP ViT-B/32 matrix shapes, {report['tasks']} tasks; {m['cpu']}, torch {m['torch']} ({m['threads']} "
             f"threads); best of {repeats}. Seconds for one matrix's decompositions (T per-task + 2 polar), "
             "then for the whole model (× count).", "",
             "| shape | count | FusionBench's SVDs s | ours s | float32 eigh s |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['count']} | {r['fusionbench_s']:.3f} | "
                     f"{r['taskmerge_s']:.3f} | {r['float32_eigh_s']:.3f} |")
    lines.append(f"| whole model | | {totals['fusionbench']:.1f} | {totals['taskmerge']:.1f} | "
                 f"{totals['float32_eigh']:.1f} |")
    if "max_speedup" in report:
        ms = report["max_speedup"]
        lines += ["", f"FusionBench's whole merge: {report['fusionbench_merge_s']:.1f} s; the largest speed-up over it "
                  f"that the decompositions allow: ours {ms['taskmerge']:.1f}×, float32 eigh {ms['float32_eigh']:.1f}×."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
