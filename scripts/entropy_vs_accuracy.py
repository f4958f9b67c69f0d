"""Is prediction entropy a usable proxy for accuracy on the benchmark? (AdaMerging's premise.)

AdaMerging learns merging coefficients by minimising the entropy of each task's predictions on unlabeled
inputs; it works when lower entropy goes with higher accuracy along the coefficient path. This script
walks Task Arithmetic's λ (one coefficient for every task and layer, the path AdaMerging starts on) and
prints, per task and on average, the mean prediction entropy and the accuracy on the validation split,
with the rank correlation between the two over λ. Labels are used only to score, never to choose.

    python scripts/entropy_vs_accuracy.py --out results/adamerging_entropy_diagnostic
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (no ties expected on these continuous values)."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main() -> None:
    from taskmerge.bench.backbone import load_backbone
    from taskmerge.bench.datasets import load_task, resolve_tasks
    from taskmerge.bench.evaluate import Evaluator, accuracy_of_logits
    from taskmerge.bench.finetune import configure_threads, finetune, get_recipe
    from taskmerge.databased.loop import entropy
    from taskmerge.merge import apply_task_vector, merged_task_vector

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="8")
    p.add_argument("--recipe", default="full")
    p.add_argument("--lambdas", default="0.0,0.1,0.2,0.3,0.4,0.6,0.8,1.0")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_threads(args.threads)

    bb = load_backbone("minilm")
    recipe = get_recipe(args.recipe)
    names = resolve_tasks(args.tasks)
    data = {n: load_task(n, 0) for n in names}
    cks = {n: finetune(bb, data[n], recipe, progress=False) for n in names}
    base = bb.state_dict()
    tau = merged_task_vector(base, [cks[n].state_dict() for n in names], "task_arithmetic")
    ev = Evaluator(bb.model, bb.tokenizer, max_length=recipe.max_length)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    rows = []
    for lam in lambdas:
        ev.load(apply_task_vector(base, tau, lam))
        row: dict[str, dict[str, float]] = {"entropy": {}, "accuracy": {}}
        for n in names:
            head = cks[n].head
            split = data[n].val
            logits = head.logits(ev.features([t for t, _ in split], head.normalize))
            row["entropy"][n] = float(entropy(logits).mean())
            row["accuracy"][n] = accuracy_of_logits(logits, [y for _, y in split])
        rows.append({"lambda": lam, **row})
        logging.info("λ=%.2f: mean entropy %.4f, mean val accuracy %.4f", lam,
                     sum(row["entropy"].values()) / len(names), sum(row["accuracy"].values()) / len(names))
    corr = {n: spearman([r["entropy"][n] for r in rows], [r["accuracy"][n] for r in rows]) for n in names}
    mean_h = [sum(r["entropy"].values()) / len(names) for r in rows]
    mean_a = [sum(r["accuracy"].values()) / len(names) for r in rows]
    result = {"tasks": names, "recipe": args.recipe, "split": "val", "rows": rows, "spearman_entropy_accuracy": corr,
              "spearman_mean": spearman(mean_h, mean_a),
              "argmin_entropy_lambda": lambdas[mean_h.index(min(mean_h))],
              "argmax_accuracy_lambda": lambdas[mean_a.index(max(mean_a))]}
    lines = ["# Entropy vs accuracy along Task Arithmetic's λ (validation split)", "",
             "| λ | " + " | ".join(f"H {n}" for n in names) + " | mean H | mean acc |",
             "|---|" + "---|" * (len(names) + 2)]
    for r, h, a in zip(rows, mean_h, mean_a):
        lines.append(f"| {r['lambda']:g} | " + " | ".join(f"{r['entropy'][n]:.3f}" for n in names)
                     + f" | {h:.3f} | {100 * a:.1f} |")
    lines += ["", "Spearman(entropy, accuracy) over λ per task (negative = lower entropy goes with higher accuracy, "
              "AdaMerging's premise): " + ", ".join(f"{n} {c:+.2f}" for n, c in corr.items())
              + f"; averaged curves {result['spearman_mean']:+.2f}.", "",
              f"Mean entropy is lowest at λ = {result['argmin_entropy_lambda']:g}; "
              f"mean validation accuracy is highest at λ = {result['argmax_accuracy_lambda']:g}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
