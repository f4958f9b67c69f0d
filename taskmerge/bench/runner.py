"""The benchmark protocol end to end: fine-tune (cached), merge, choose λ on validation, report test.

:func:`run_benchmark` follows the TSV / Iso-C protocol:

1. load (or LP-FT fine-tune, see :mod:`taskmerge.bench.finetune`) one checkpoint per task;
2. evaluate the pretrained encoder with each task's linear-probe head, and every fine-tuned encoder on its
   own task (validation and test);
3. for each merging method, compute the merged task vector τ **once**
   (:func:`taskmerge.merge.merged_task_vector`), then for every λ of the grid (the method's registered
   ``lambda_grid`` unless ``lam_grid`` is given) evaluate ``θ₀ + λτ`` on every task's *validation* split and
   keep the λ with the best average normalised accuracy (merged / fine-tuned; ties go to the smaller λ);
4. report *test* accuracy at that λ per task, absolute and normalised, and their averages; tasks held out of
   the merge (:data:`~taskmerge.bench.datasets.UNSEEN_TASKS`) are evaluated with their linear-probe heads.

Results go to ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md`` (methods × tasks tables with the date
and the machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from taskmerge.bench.backbone import Backbone, load_backbone
from taskmerge.bench.datasets import SHORT_NAMES, UNSEEN_TASKS, TaskData, load_task, resolve_tasks
from taskmerge.bench.evaluate import Evaluator, normalized_accuracy
from taskmerge.bench.finetune import Recipe, configure_threads, finetune, get_recipe, linear_probe
from taskmerge.errors import OptionError

logger = logging.getLogger(__name__)

MergeAPI = tuple[Callable[..., dict[str, torch.Tensor]], Callable[..., dict[str, torch.Tensor]], Callable[[str], Any]]


def merge_api() -> MergeAPI:
    """``(merged_task_vector, apply_task_vector, get_method)`` from taskmerge's merge core."""
    from taskmerge.merge import apply_task_vector, merged_task_vector
    from taskmerge.registry import get_method

    return merged_task_vector, apply_task_vector, get_method


def default_methods() -> list[str]:
    """Every registered data-free method."""
    from taskmerge.registry import list_methods

    return [m.name for m in list_methods() if getattr(m, "data_free", True)]


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and count, torch threads and library versions."""
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _evaluate_all(
    ev: Evaluator, state_dict: Mapping[str, torch.Tensor], heads: Mapping[str, Any], data: Mapping[str, TaskData],
    split: str,
) -> dict[str, float]:
    ev.load(state_dict)
    return {name: ev.accuracy(heads[name], data[name].split(split)) for name in heads}


def sweep_lambda(
    grid: Sequence[float], score: Callable[[float], tuple[float, dict[str, float]]], patience: int | None = None
) -> tuple[float, float, list[dict[str, Any]]]:
    """Evaluate ``score(λ) -> (average normalised validation accuracy, per-task accuracies)`` over ``grid`` in
    order; return the best λ (the first one on ties), its score and the curve. With ``patience``, stop after
    that many consecutive points without a new best."""
    if not grid:
        raise ValueError("empty λ grid")
    curve: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    since_best = 0
    for lam in grid:
        value, per_task = score(lam)
        curve.append({"lambda": lam, "avg_normalized_val": value, "val": per_task})
        if best is None or value > best[1]:
            best, since_best = (lam, value), 0
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    assert best is not None
    return best[0], best[1], curve


def run_benchmark(
    methods: Sequence[str] | None = None,
    tasks: int | str | Sequence[str] = 8,
    recipe: str | Recipe = "full",
    lam_grid: Sequence[float] | None = None,
    out_dir: str | Path | None = "results",
    *,
    backbone: str | Backbone = "minilm",
    seed: int = 0,
    steps: int | None = None,
    unseen: Sequence[str] | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    cache: Path | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    stem: str | None = None,
    patience: int | None = None,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark and return (and, if ``out_dir``, write) its results.

    Args:
        methods: merge method names (default: every registered data-free method).
        tasks: merged tasks: an int (first n of ``MAIN_TASKS``: 4, 8), ``"all"`` or a list of names.
        recipe: ``"full"``, ``"lora"`` or a :class:`~taskmerge.bench.finetune.Recipe`.
        lam_grid: λ values to sweep for every method (default: each method's registered grid).
        out_dir: where to write ``<stem>.json`` and ``<stem>.md``; ``None`` writes nothing.
        backbone: ``"minilm"``, ``"tiny"`` or a loaded :class:`~taskmerge.bench.backbone.Backbone`.
        seed: data-split seed (the recipe carries the training seed).
        steps: override the recipe's number of fine-tuning steps.
        unseen: held-out tasks evaluated with linear-probe heads (default: ``UNSEEN_TASKS`` not merged,
            only for the MiniLM backbone).
        method_options: per-method option dicts passed to ``merged_task_vector``.
        cache: checkpoint cache directory (default ``$TASKMERGE_CACHE`` or ``~/.cache/taskmerge``).
        num_threads: torch threads (default ``$TASKMERGE_THREADS`` or torch's default).
        progress: show progress bars.
        stem: output file name stem (default ``bench_<backbone>_<recipe>_<n>tasks``).
        patience: stop a method's λ sweep after this many consecutive grid points (in grid order) without a
            new best validation score; ``None`` (default) sweeps the whole grid, as the papers do. The
            validation curves are unimodal in practice, so 3-5 saves most of the sweep's cost.
        variants: extra rows, label → (method, options), e.g. ``{"dc_merge_linear": ("dc_merge",
            {"smoothing": "linear"})}``; each runs after ``methods`` under its label (see :func:`parse_variant`).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    configure_threads(num_threads)
    merged_task_vector, apply_task_vector, get_method = merge_api()
    methods = list(default_methods() if methods is None else methods)
    task_names = resolve_tasks(tasks)
    recipe = get_recipe(recipe, **({"steps": steps} if steps is not None else {}))
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    if unseen is None:
        unseen = [t for t in UNSEEN_TASKS if t not in task_names] if bb.name == "minilm" else []
    unseen = [t for t in unseen if t not in task_names]
    method_options = dict(method_options or {})
    variants = dict(variants or {})
    methods += [label for label in variants if label not in methods]

    data = {name: load_task(name, seed) for name in task_names}
    unseen_data = {name: load_task(name, seed) for name in unseen}

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checkpoints = {name: finetune(bb, data[name], recipe, cache=cache, progress=progress) for name in task_names}
    timings["finetune_or_load"] = time.perf_counter() - t0
    heads = {name: ck.head for name, ck in checkpoints.items()}
    unseen_heads = {name: linear_probe(bb, unseen_data[name], recipe, cache=cache) for name in unseen}

    ev = Evaluator(bb.model, bb.tokenizer, max_length=recipe.max_length)
    base_sd = bb.state_dict()
    task_sds = [checkpoints[name].state_dict() for name in task_names]

    t0 = time.perf_counter()
    pre_val = _evaluate_all(ev, base_sd, heads, data, "val")
    pre_test = _evaluate_all(ev, base_sd, heads, data, "test")
    pre_unseen = _evaluate_all(ev, base_sd, unseen_heads, unseen_data, "test") if unseen else {}
    ft_val: dict[str, float] = {}
    ft_test: dict[str, float] = {}
    for name, sd in zip(task_names, task_sds):
        ev.load(sd)
        ft_val[name] = ev.accuracy(heads[name], data[name].val)
        ft_test[name] = ev.accuracy(heads[name], data[name].test)
    timings["reference_eval"] = time.perf_counter() - t0

    def summary(test: Mapping[str, float]) -> dict[str, Any]:
        norm = {n: normalized_accuracy(test[n], ft_test[n]) for n in task_names}
        return {"test": dict(test), "normalized_test": norm, "avg_test": _mean(list(test.values())),
                "avg_normalized_test": _mean(list(norm.values()))}

    results: dict[str, Any] = {
        "pretrained": {**summary(pre_test), "val": pre_val, "unseen_test": pre_unseen},
        "finetuned": {"test": ft_test, "val": ft_val, "avg_test": _mean(list(ft_test.values())),
                      "avg_val": _mean(list(ft_val.values()))},
        "methods": {},
    }

    for method in methods:
        name, variant_options = variants.get(method, (method, {}))
        spec = get_method(name)
        method_options[method] = {**(method_options.get(method) or {}), **variant_options}
        if "num_classes" in getattr(spec.options, "model_fields", {}) and "num_classes" not in method_options[method]:
            # MDA's ETF size C comes from the merged tasks' class counts.
            method_options[method]["num_classes"] = [len(data[n].labels) for n in task_names]
        grid = [float(x) for x in (lam_grid if lam_grid is not None else spec.lambda_grid or (spec.default_lambda,))]

        def score_at(tau_: Mapping[str, torch.Tensor], lam: float) -> tuple[float, dict[str, float]]:
            val = _evaluate_all(ev, apply_task_vector(base_sd, tau_, lam), heads, data, "val")
            return _mean([normalized_accuracy(val[n], ft_val[n]) for n in task_names]), val

        from taskmerge.bench.option_sweep import sweep_option, swept_option

        swept = swept_option(spec, grid, method_options[method])
        option_record: dict[str, Any] = {}
        t0 = time.perf_counter()
        if swept is None:
            tau = merged_task_vector(base_sd, task_sds, name, method_options[method])
            merge_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            bar = tqdm(grid, desc=f"λ sweep {method}", disable=not progress, leave=False)
            lam, best_score, curve = sweep_lambda(list(bar), lambda x: score_at(tau, x), patience)
            bar.close()
        else:  # the method's own hyper-parameter chosen on validation at λ = 1 (sweep_seconds includes the merges)
            key, values = swept
            opts = method_options[method]
            bar = tqdm(values, desc=f"{key} sweep {method}", disable=not progress, leave=False)
            found = sweep_option(key, list(bar),
                                 lambda v: merged_task_vector(base_sd, task_sds, name, {**opts, key: v}),
                                 lambda t: score_at(t, 1.0))
            bar.close()
            tau, lam, best_score, merge_seconds = found.tau, 1.0, found.score, found.merge_seconds
            curve = [{"lambda": 1.0, **point} for point in found.curve]
            method_options[method] = {**opts, key: found.value}
            option_record = {"chosen_option": {key: found.value}, "option_grid": {key: list(values)}}
        chosen_sd = apply_task_vector(base_sd, tau, lam)
        test = _evaluate_all(ev, chosen_sd, heads, data, "test")
        unseen_test = _evaluate_all(ev, chosen_sd, unseen_heads, unseen_data, "test") if unseen else {}
        results["methods"][method] = {
            **summary(test),
            **option_record,
            "method": name,
            "lambda": lam,
            "avg_normalized_val": best_score,
            "grid": grid,
            "grid_points_evaluated": len(curve),
            "val_curve": curve,
            "unseen_test": unseen_test,
            "options": dict(method_options[method]),
            "merge_seconds": merge_seconds,
            "sweep_seconds": time.perf_counter() - t0,
        }
        logger.info("%s: λ=%.2f, test avg %.4f (normalized %.4f)", method, lam,
                    results["methods"][method]["avg_test"], results["methods"][method]["avg_normalized_test"])
        del tau, chosen_sd

    timings["total"] = time.perf_counter() - t_start
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "backbone": {"name": bb.name, "identity": bb.identity, "source": bb.source},
        "recipe": recipe.to_dict(),
        "seed": seed,
        "tasks": task_names,
        "unseen_tasks": list(unseen),
        "methods": methods,
        "protocol": "lambda chosen per method by average normalized accuracy on validation; test reported"
        + (f" (sweep stopped after {patience} grid points without improvement)" if patience else ""),
        "manifests": {n: {"counts": d.manifest["counts"], "sha256": d.manifest["sha256"]}
                      for n, d in {**data, **unseen_data}.items()},
        "checkpoints": {n: str(ck.path) for n, ck in checkpoints.items()},
        "finetune_metrics": {n: ck.info.get("metrics", {}) for n, ck in checkpoints.items()},
        "timings_seconds": timings,
    }
    if out_dir is not None:
        stem = stem or f"bench_{bb.name}_{recipe.kind}_{len(task_names)}tasks"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown_report(results), encoding="utf-8")
        results["meta"]["outputs"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
        logger.info("wrote %s/%s.{json,md}", out, stem)
    return results


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def markdown_report(results: Mapping[str, Any]) -> str:
    """Methods × tasks tables (absolute and normalised test accuracy, averages, chosen λ) as Markdown."""
    meta = results["meta"]
    tasks: list[str] = meta["tasks"]
    unseen: list[str] = meta.get("unseen_tasks", [])
    m = meta["machine"]
    r = meta["recipe"]
    cols = [SHORT_NAMES.get(t, t) for t in tasks]
    lines = [
        f"# taskmerge benchmark: {meta['backbone']['name']}, {len(tasks)} tasks, {r['kind']} fine-tuning",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['platform']}; CPU {m['cpu']} ({m['cpu_count']} logical CPUs, {m['torch_threads']} torch "
        f"threads); torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}",
        f"- Backbone: {meta['backbone']['source']} (sha256 {meta['backbone']['identity'][:16]}…)",
        f"- Recipe: LP-FT, {r['kind']}, {r['steps']} steps, batch {r['batch_size']}, lr {r['lr']}, "
        f"max length {r['max_length']}, training seed {r['seed']}; data seed {meta['seed']}",
        f"- Protocol: {meta['protocol']}.",
        f"- Wall time: {meta['timings_seconds']['total']:.0f} s",
        "",
        "## Absolute test accuracy (%)",
        "",
        "| Method | " + " | ".join(cols) + " | Avg | λ |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    pre, ft = results["pretrained"], results["finetuned"]
    lines.append("| Pretrained (LP heads) | " + " | ".join(_pct(pre["test"][t]) for t in tasks)
                 + f" | {_pct(pre['avg_test'])} | – |")
    lines.append("| Fine-tuned (individual) | " + " | ".join(_pct(ft["test"][t]) for t in tasks)
                 + f" | {_pct(ft['avg_test'])} | – |")
    for name, res in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(res["test"][t]) for t in tasks)
                     + f" | {_pct(res['avg_test'])} | {res['lambda']:g} |")
    lines += ["", "## Normalized test accuracy (% of the fine-tuned model's accuracy)", "",
              "| Method | " + " | ".join(cols) + " | Avg |", "|---|" + "---|" * (len(cols) + 1)]
    lines.append("| Pretrained (LP heads) | " + " | ".join(_pct(pre["normalized_test"][t]) for t in tasks)
                 + f" | {_pct(pre['avg_normalized_test'])} |")
    for name, res in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(res["normalized_test"][t]) for t in tasks)
                     + f" | {_pct(res['avg_normalized_test'])} |")
    if unseen:
        ucols = [SHORT_NAMES.get(t, t) for t in unseen]
        lines += ["", "## Unseen tasks (held out of the merge; linear-probe heads), absolute test accuracy (%)", "",
                  "| Method | " + " | ".join(ucols) + " | Avg |", "|---|" + "---|" * (len(ucols) + 1)]
        rows = [("Pretrained (LP heads)", pre["unseen_test"])]
        rows += [(name, res["unseen_test"]) for name, res in results["methods"].items()]
        for name, accs in rows:
            lines.append(f"| {name} | " + " | ".join(_pct(accs[t]) for t in unseen)
                         + f" | {_pct(_mean([accs[t] for t in unseen]))} |")
    lines += ["", "Task columns: " + "; ".join(f"{SHORT_NAMES.get(t, t)} = `{t}`" for t in tasks + unseen) + "."]
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``"LABEL=METHOD:key=value,key=value"`` → ``(LABEL, (METHOD, options))``; values are parsed as YAML
    (``METHOD`` defaults to ``LABEL``; a value with commas is not supported)."""
    import yaml

    label, _, rest = text.partition("=")
    method, _, opts = rest.partition(":")
    if not label.strip():
        raise OptionError(f"option variant: expected LABEL=METHOD:key=value,..., got {text!r}")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"option variant {label!r}: expected key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return label.strip(), ((method or label).strip(), options)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of the benchmark command (reusable as a ``taskmerge bench`` subcommand)."""
    p = parser or argparse.ArgumentParser(prog="python -m taskmerge.bench", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all data-free methods)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD:key=value,...",
                   help="an extra row: METHOD with these options under LABEL, e.g. "
                        "'dc_merge_linear=dc_merge:setting=lora,smoothing=linear' (repeatable)")
    p.add_argument("--tasks", default="8", help="4, 8, all, or comma-separated task names (default 8)")
    p.add_argument("--recipe", default="full", choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default: the recipe's)")
    p.add_argument("--lam-grid", default=None, help="comma-separated λ values (default: each method's grid)")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--backbone", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--patience", type=int, default=None,
                   help="stop each λ sweep after this many grid points without improvement (default: full grid)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`build_parser` arguments and print the Markdown report."""
    import sys

    results = run_benchmark(
        methods=args.methods.split(",") if args.methods else None,
        tasks=args.tasks,
        recipe=args.recipe,
        lam_grid=[float(x) for x in args.lam_grid.split(",")] if args.lam_grid else None,
        out_dir=args.out,
        backbone=args.backbone,
        seed=args.seed,
        steps=args.steps,
        num_threads=args.threads,
        progress=not args.no_progress,
        patience=args.patience,
        variants=dict(parse_variant(v) for v in args.variant),
    )
    sys.stdout.write(markdown_report(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m taskmerge.bench``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)
