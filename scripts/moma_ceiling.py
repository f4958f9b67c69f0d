"""MOMA's ceiling on the benchmark (paper §3.3, Eq. 8, Fig. 4): how much of each merge's gap is a rotation.

    python scripts/moma_ceiling.py --reference results/bench_minilm_full_8tasks.json
    python scripts/moma_ceiling.py --backbone tiny --tasks toy_letters,toy_length --lambda task_arithmetic=0.5

No training. For every merge (Weight Averaging, Task Arithmetic, TIES at the λ each chose on validation, read
from the reference results JSON or given with ``--lambda``) and every task, the features of the merged encoder
and of the task's fine-tuned encoder on the unlabeled inputs of ``--fit-split`` (default ``test``: MOMA adapts
on the unlabeled test inputs) give the exact orthogonal map (Procrustes) and the least-squares linear map
(:mod:`taskmerge.databased.ceiling`); the task's head absorbs each, and the test accuracy is scored. The
orthogonal row is what MOMA's ``A_t`` can reach at the merge's own weights (its mask can add more); the
share of the gap closed, ``(acc_A − acc_merge) / (acc_fine-tuned − acc_merge)``, says how much of the gap is
a rotation. Writes ``<out>/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from taskmerge.databased.ceiling import MAPS, average_ceiling, task_ceiling

logger = logging.getLogger("moma_ceiling")

METHODS = ("weight_averaging", "task_arithmetic", "ties")


def _reference(path: str | None) -> dict[str, Any] | None:
    return None if path is None else json.loads(Path(path).read_text(encoding="utf-8"))


def run(backbone: str = "minilm", tasks: str | None = None, recipe: Any = None, reference: str | None = None,
        lambdas: Mapping[str, float] | None = None, methods: Sequence[str] = METHODS, fit_split: str = "test",
        protocol: str | None = None, seed: int | None = None, cache: Path | None = None,
        threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Compute the ceiling table (module docstring); λ from ``lambdas`` first, else from ``reference``."""
    from taskmerge.bench.backbone import load_backbone
    from taskmerge.bench.datasets import load_task, resolve_tasks
    from taskmerge.bench.evaluate import Evaluator
    from taskmerge.bench.finetune import configure_threads, finetune, get_recipe
    from taskmerge.bench.runner import machine_info
    from taskmerge.merge import apply_task_vector, merged_task_vector

    t0 = time.perf_counter()
    configure_threads(threads)
    ref = _reference(reference)
    meta = (ref or {}).get("meta", {})
    names = resolve_tasks(tasks) if tasks else list(meta.get("tasks") or resolve_tasks(8))
    protocol = protocol or meta.get("split_protocol", "v1" if ref else "v2")
    seed = int(meta.get("seed", 0)) if seed is None else seed
    recipe = get_recipe(recipe if recipe is not None else meta.get("recipe", "full"))
    if ref is not None and list(meta.get("tasks", [])) != names:
        raise ValueError(f"{reference}: tasks {meta.get('tasks')} differ from {names}")
    lam = dict(lambdas or {})
    for m in methods:
        if m not in lam:
            if ref is None or m not in ref.get("methods", {}):
                raise ValueError(f"no λ for {m}: give --lambda {m}=λ or a reference results JSON holding it")
            lam[m] = float(ref["methods"][m]["lambda"])
    bb = load_backbone(backbone)
    data = {n: load_task(n, seed, protocol) for n in names}
    cks = {n: finetune(bb, data[n], recipe, cache=cache, progress=progress) for n in names}
    if meta.get("checkpoints"):
        for n in names:
            if meta["checkpoints"].get(n) != str(cks[n].path):
                raise ValueError(f"{reference}: task {n} was run on {meta['checkpoints'].get(n)}, found {cks[n].path}")
    heads = {n: cks[n].head for n in names}
    base = bb.state_dict()
    task_sds = [cks[n].state_dict() for n in names]
    ev = Evaluator(bb.model, bb.tokenizer, max_length=recipe.max_length)

    def features(n: str, split: str) -> torch.Tensor:
        """Task n's features of ``split`` under the state dict loaded in the evaluator."""
        return ev.features([t for t, _ in data[n].split(split)], heads[n].normalize)

    finetuned: dict[str, dict[str, torch.Tensor]] = {}
    for n, sd in zip(names, task_sds):
        ev.load(sd)
        finetuned[n] = {s: features(n, s) for s in {fit_split, "test"}}
    rows: dict[str, Any] = {}
    for m in methods:
        state = apply_task_vector(base, merged_task_vector(base, task_sds, m), lam[m])
        ev.load(state)
        per_task = {}
        for n in names:
            merged = {s: features(n, s) for s in {fit_split, "test"}}
            labels = torch.tensor([y for _, y in data[n].test])
            per_task[n] = task_ceiling(merged[fit_split], finetuned[n][fit_split], merged["test"],
                                       finetuned[n]["test"], labels, heads[n])
        rows[m] = {"lambda": lam[m], "tasks": per_task, "average": average_ceiling(per_task)}
        logger.info("%s (λ=%g): merge %.4f, orthogonal %.4f, linear %.4f, fine-tuned %.4f", m, lam[m],
                    *(rows[m]["average"][k]["accuracy"] for k in MAPS), rows[m]["average"]["finetuned"])
    return {"meta": {"backbone": {"name": bb.name, "identity": bb.identity}, "tasks": names, "recipe": recipe.to_dict(),
                     "split_protocol": protocol, "seed": seed, "fit_split": fit_split,
                     "reference": reference, "checkpoints": {n: str(cks[n].path) for n in names},
                     "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "seconds": time.perf_counter() - t0},
            "methods": rows}


def markdown(res: Mapping[str, Any]) -> str:
    """The ceiling table as Markdown."""
    from taskmerge.bench.datasets import SHORT_NAMES

    meta = res["meta"]
    tasks = meta["tasks"]
    fit = meta["fit_split"]
    lines = [
        f"# MOMA's ceiling: exact feature alignment of each merge ({meta['backbone']['name']}, {len(tasks)} tasks)",
        "",
        f"- {meta['date']}; split protocol {meta['split_protocol']}; maps fitted on the unlabeled `{fit}` inputs "
        f"({'transductive, as MOMA adapts' if fit == 'test' else 'inductive'}), accuracy on `test`; "
        f"λ of each merge {'from ' + str(meta['reference']) if meta['reference'] else 'given'}; "
        f"wall time {meta['seconds']:.0f} s.",
        "- *orthogonal*: `A_t = polar(G_tᵀ G_m)` (Procrustes; Eq. 8 at α → ∞, squared error), *linear*: least "
        "squares; absorbed into the task's head (Eq. 9). *gap closed*: (acc_map − acc_merge) / "
        "(acc_fine-tuned − acc_merge), on the task averages. *residual*: ‖G_m Aᵀ − G_t‖ / ‖G_t‖ on test.",
        "",
        "| Merge (λ) | merge | orthogonal | linear | fine-tuned | gap closed: orthogonal | gap closed: linear | "
        "residual merge / orth. / linear |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        a = r["average"]

        def gap(k: str) -> str:
            g = a[k]["gap_closed"]
            return "–" if g is None else f"{100 * g:.0f} %"

        lines.append(f"| {m} ({r['lambda']:g}) | {100 * a['identity']['accuracy']:.1f} | "
                     f"{100 * a['orthogonal']['accuracy']:.1f} | {100 * a['linear']['accuracy']:.1f} | "
                     f"{100 * a['finetuned']:.1f} | {gap('orthogonal')} | {gap('linear')} | "
                     + " / ".join(f"{a[k]['residual_eval']:.3f}" for k in MAPS) + " |")
    cols = [SHORT_NAMES.get(t, t) for t in tasks]
    lines += ["", "## Test accuracy per task (%): merge → orthogonal → linear (fine-tuned)", "",
              "| Merge | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m, r in res["methods"].items():
        cells = [f"{100 * r['tasks'][t]['identity']['accuracy']:.1f} → {100 * r['tasks'][t]['orthogonal']['accuracy']:.1f}"
                 f" → {100 * r['tasks'][t]['linear']['accuracy']:.1f} ({100 * r['tasks'][t]['finetuned']:.1f})"
                 for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Task columns: " + "; ".join(f"{SHORT_NAMES.get(t, t)} = `{t}`" for t in tasks) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--tasks", default=None, help="task count or names (default: the reference's)")
    p.add_argument("--recipe", default=None, help="recipe name (default: the reference's)")
    p.add_argument("--reference", default=None, help="results JSON of `taskmerge bench` holding each merge's λ")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="METHOD=λ")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--fit-split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default=None, choices=["v1", "v2"], help="default: the reference's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results")
    p.add_argument("--stem", default=None, help="default: moma_ceiling_<backbone>_<n>tasks")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lambdas = {k: float(v) for k, v in (s.split("=", 1) for s in args.lambdas)}
    res = run(args.backbone, args.tasks, args.recipe, args.reference, lambdas,
              [m for m in args.methods.split(",") if m], args.fit_split, args.protocol, threads=args.threads,
              progress=not args.no_progress)
    stem = args.stem or f"moma_ceiling_{res['meta']['backbone']['name']}_{len(res['meta']['tasks'])}tasks"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    text = markdown(res)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
