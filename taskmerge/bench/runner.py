"""The benchmark protocol end to end: fine-tune (cached), merge, choose λ on validation, report test.

:func:`run_benchmark` follows the TSV / Iso-C protocol:

1. load (or fine-tune through the task's frozen head, see :mod:`taskmerge.bench.finetune`) one checkpoint per
   task and fine-tuning seed;
2. evaluate the pretrained encoder with each task's head (protocol v2: the frozen zero-shot heads, so this row
   is the pretrained model's zero-shot accuracy), and every fine-tuned encoder on its own task (validation
   and test);
3. for each merging method, compute the merged task vector τ **once**
   (:func:`taskmerge.merge.merged_task_vector`), then for every λ of the grid (the method's registered
   ``lambda_grid`` unless ``lam_grid`` is given) evaluate ``θ₀ + λτ`` on every task's *validation* split and
   keep the λ with the best average normalised accuracy (merged / fine-tuned; ties go to the smaller λ);
4. report *test* accuracy at that λ per task, absolute and normalised, and their averages, each average with
   a 95 % bootstrap interval over test examples (:mod:`taskmerge.bench.stats`), and every method's paired
   difference to Task Arithmetic and to TSV-M; tasks held out of the merge
   (:data:`~taskmerge.bench.datasets.UNSEEN_TASKS`) are evaluated with their own heads;
5. with several fine-tuning seeds, repeat 1-4 per seed and add the mean ± sd of every average across seeds.

``protocol="v2"`` (default) uses the v2 splits (large test sets) and zero-shot heads; ``protocol="v1"`` the
first benchmark's splits and 16-shot linear-probe heads, whose cached checkpoints it reuses unchanged.

Results go to ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md`` (methods × tasks tables with the date,
the machine and its 2048 × 2048 float32 matmul rate). The JSON keeps every row's per-example test
correctness (``correct_test``: hex of ``numpy.packbits``, see :func:`unpack_correct`), so any other paired
comparison can be recomputed from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskmerge.bench.backbone import Backbone, load_backbone
from taskmerge.bench.datasets import PROTOCOLS, SHORT_NAMES, UNSEEN_TASKS, TaskData, load_task, resolve_tasks
from taskmerge.bench.evaluate import Evaluator, normalized_accuracy
from taskmerge.bench.finetune import HEADS, Recipe, configure_threads, finetune, get_recipe, task_head
from taskmerge.bench.report import avg_cell, choice_cell, diff_cell, mean, pct
from taskmerge.bench.stats import bootstrap_average_ci, paired_bootstrap_diff_ci
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


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 ``n × n`` matmul rate of this machine in GFLOPS (``2 n³`` flops over the best of ``repeats``
    timed products, after one warm-up), with torch's current thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def pack_correct(correct: np.ndarray) -> str:
    """Per-example correctness as the hex of ``numpy.packbits`` (big bit order, zero-padded to a byte)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_correct` for ``n`` examples."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8), count=n).astype(bool)


def _evaluate_all(
    ev: Evaluator, state_dict: Mapping[str, torch.Tensor], heads: Mapping[str, Any], data: Mapping[str, TaskData],
    split: str,
) -> dict[str, float]:
    return {name: float(c.mean()) for name, c in _correct_all(ev, state_dict, heads, data, split).items()}


def _correct_all(
    ev: Evaluator, state_dict: Mapping[str, torch.Tensor], heads: Mapping[str, Any], data: Mapping[str, TaskData],
    split: str,
) -> dict[str, np.ndarray]:
    ev.load(state_dict)
    return {name: ev.correct(heads[name], data[name].split(split)) for name in heads}


def sweep_lambda(
    grid: Sequence[float],
    score: Callable[[float], tuple[float, dict[str, float]]],
    patience: int | None = None,
    stride: int = 1,
) -> tuple[float, float, list[dict[str, Any]]]:
    """Evaluate ``score(λ) -> (average normalised validation accuracy, per-task accuracies)`` over ``grid`` in
    order; return the best λ (the first one in grid order on ties), its score and the curve (in evaluation
    order). With ``patience``, stop after that many consecutive points without a new best.

    With ``stride`` s > 1 (coarse to fine) the pass visits every s-th grid point (``patience`` counts those),
    then evaluates the grid points within s − 1 places of the best one; on a unimodal validation curve this
    finds the full grid's maximiser with about 1/s of its evaluations, and in any case a point that beats its
    grid neighbours.
    """
    if not grid:
        raise ValueError("empty λ grid")
    if stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride}")
    curve: list[dict[str, Any]] = []
    values: dict[int, float] = {}

    def visit(i: int) -> float:
        value, per_task = score(grid[i])
        curve.append({"lambda": grid[i], "avg_normalized_val": value, "val": per_task})
        values[i] = value
        return value

    best_i: int | None = None
    since_best = 0
    for i in range(0, len(grid), stride):
        value = visit(i)
        if best_i is None or value > values[best_i]:
            best_i, since_best = i, 0
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    assert best_i is not None
    for i in range(max(0, best_i - stride + 1), min(len(grid), best_i + stride)):
        if i not in values:
            visit(i)
    best_i = max(sorted(values), key=lambda i: values[i])  # max keeps the first (lowest index) of equal values
    return grid[best_i], values[best_i], curve


REFERENCE_METHODS: tuple[str, ...] = ("task_arithmetic", "tsv_m")
"""Every method's paired difference is reported against these (when they are part of the run)."""


def _ci_summary(
    correct: Mapping[str, np.ndarray], ft_correct: Mapping[str, np.ndarray], n_boot: int
) -> dict[str, Any]:
    """A row's test accuracies (per task, normalised, averages), their 95 % bootstrap intervals and its packed
    per-example correctness; normalised accuracy divides by the fine-tuned model's accuracy on the same
    examples, resampled with them (:func:`~taskmerge.bench.stats.bootstrap_average_ci`)."""
    test = {n: float(c.mean()) for n, c in correct.items()}
    norm = {n: normalized_accuracy(test[n], float(ft_correct[n].mean())) for n in correct}
    _, lo, hi = bootstrap_average_ci(correct, None, n_boot)
    _, nlo, nhi = bootstrap_average_ci(correct, ft_correct, n_boot)
    return {"test": test, "normalized_test": norm, "avg_test": mean(list(test.values())),
            "avg_normalized_test": mean(list(norm.values())),
            "ci95": {"avg_test": [lo, hi], "avg_normalized_test": [nlo, nhi]},
            "correct_test": {n: pack_correct(c) for n, c in correct.items()}}


def _paired_differences(
    correct: Mapping[str, Mapping[str, np.ndarray]], ft_correct: Mapping[str, np.ndarray],
    references: Sequence[str], n_boot: int,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {reference: {"avg_test" | "avg_normalized_test": [difference, low, high]}}}``: paired
    bootstrap intervals (same resampled test examples for both rows) of every method against each reference."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method, c in correct.items():
        out[method] = {}
        for ref in references:
            if ref not in correct or ref == method:
                continue
            out[method][ref] = {
                "avg_test": list(paired_bootstrap_diff_ci(c, correct[ref], None, n_boot)),
                "avg_normalized_test": list(paired_bootstrap_diff_ci(c, correct[ref], ft_correct, n_boot)),
            }
    return out


def _across_seeds(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation across fine-tuning seeds of every row's averages (the method rows
    present in every seed's run)."""
    first = next(iter(runs.values()))
    common = [m for m in first["methods"] if all(m in r["methods"] for r in runs.values())]
    rows = {"pretrained": lambda r: r["pretrained"], "finetuned": lambda r: r["finetuned"]}
    rows.update({m: (lambda r, m=m: r["methods"][m]) for m in common})
    out: dict[str, Any] = {}
    for label, get in rows.items():
        out[label] = {}
        for key in ("avg_test", "avg_normalized_test"):
            values = [float(get(r)[key]) for r in runs.values() if key in get(r)]
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
                out[label][key] = {"mean": float(np.mean(values)), "sd": sd, "values": values}
    return out


def seed_results(runs: Mapping[int, Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """The rows of a results dict: the first seed's at the top level and, with several seeds, every seed's rows
    under ``seed_runs`` and their mean ± sd under ``across_seeds``."""
    results: dict[str, Any] = {k: runs[seeds[0]][k] for k in ("pretrained", "finetuned", "methods")}
    if len(seeds) > 1:
        ordered = {s: runs[s] for s in seeds}
        results["seed_runs"] = {str(s): {k: r[k] for k in ("pretrained", "finetuned", "methods", "checkpoints")}
                                for s, r in ordered.items()}
        results["across_seeds"] = _across_seeds(ordered)
    return results


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
    stride: int = 1,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    protocol: str = "v2",
    head: str | None = None,
    seeds: Sequence[int] | None = None,
    n_boot: int = 1000,
    references: Sequence[str] = REFERENCE_METHODS,
) -> dict[str, Any]:
    """Run the whole benchmark and return (and, if ``out_dir``, write) its results.

    Args:
        methods: merge method names (default: every registered data-free method).
        tasks: merged tasks: an int (first n of ``MAIN_TASKS``: 8, 14, 20), ``"all"`` or a list of names.
        recipe: ``"full"``, ``"lora"`` or a :class:`~taskmerge.bench.finetune.Recipe`.
        lam_grid: λ values to sweep for every method (default: each method's registered grid).
        out_dir: where to write ``<stem>.json`` and ``<stem>.md``; ``None`` writes nothing.
        backbone: ``"minilm"``, ``"tiny"`` or a loaded :class:`~taskmerge.bench.backbone.Backbone`.
        seed: data-split seed.
        steps: override the recipe's number of fine-tuning steps.
        unseen: held-out tasks evaluated with their own heads (default: ``UNSEEN_TASKS`` not merged, only for
            the MiniLM backbone).
        method_options: per-method option dicts passed to ``merged_task_vector``.
        cache: checkpoint cache directory (default ``$TASKMERGE_CACHE`` or ``~/.cache/taskmerge``).
        num_threads: torch threads (default ``$TASKMERGE_THREADS`` or torch's default).
        progress: show progress bars.
        stem: output file name stem (default ``bench_<backbone>_v2_<recipe>_<n>tasks``; protocol v1:
            ``bench_<backbone>_<recipe>_<n>tasks``, the first benchmark's names).
        patience: stop a method's λ sweep after this many consecutive grid points (in grid order) without a
            new best validation score; ``None`` (default) sweeps the whole grid, as the papers do. The
            validation curves are unimodal in practice, so 3-5 saves most of the sweep's cost.
        stride: coarse-to-fine λ sweep: every ``stride``-th grid point, then the best one's neighbours
            (:func:`sweep_lambda`); 1 (default) sweeps every point.
        variants: extra rows, label → (method, options), e.g. ``{"dc_merge_linear": ("dc_merge",
            {"smoothing": "linear"})}``; each runs after ``methods`` under its label (see :func:`parse_variant`).
        protocol: ``"v2"`` (large test splits, zero-shot heads) or ``"v1"`` (the first benchmark's splits
            and linear-probe heads; reuses its cached checkpoints).
        head: ``"zeroshot"`` or ``"probe"``; default: the protocol's head for a named recipe (v2 zero-shot, v1
            probe), the recipe's own head for a :class:`~taskmerge.bench.finetune.Recipe`.
        seeds: fine-tuning seeds (default: the recipe's seed, 0); each is a separate set of checkpoints
            (seed 0 keeps its cache keys) and a separate merge run; the top-level rows are the first seed's.
        n_boot: bootstrap replicates of the intervals.
        references: methods every other method's paired difference is computed against.
    """
    t_start = time.perf_counter()
    configure_threads(num_threads)
    if protocol not in PROTOCOLS:
        raise OptionError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    machine = {**machine_info(), "matmul_gflops_2048": matmul_gflops()}
    methods = list(default_methods() if methods is None else methods)
    task_names = resolve_tasks(tasks)
    if head is None and isinstance(recipe, str):  # a named recipe takes the protocol's head
        head = "zeroshot" if protocol == "v2" else "probe"
    overrides: dict[str, Any] = {"head": head} if head is not None else {}
    if steps is not None:
        overrides["steps"] = steps
    recipe = get_recipe(recipe, **overrides)
    if int(stride) < 1:
        raise OptionError(f"stride: expected a positive integer, got {stride}")
    seeds = [recipe.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise OptionError(f"seeds: expected distinct fine-tuning seeds, got {seeds}")
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    if unseen is None:
        unseen = [t for t in UNSEEN_TASKS if t not in task_names] if bb.name == "minilm" else []
    unseen = [t for t in unseen if t not in task_names]
    variants = dict(variants or {})
    methods += [label for label in variants if label not in methods]

    data = {name: load_task(name, seed, protocol) for name in task_names}
    unseen_data = {name: load_task(name, seed, protocol) for name in unseen}

    runs: dict[int, dict[str, Any]] = {}
    for s in seeds:
        runs[s] = _run_seed(
            bb, replace(recipe, seed=s), data, unseen_data, methods, lam_grid, method_options or {}, variants,
            cache=cache, progress=progress, patience=patience, stride=stride, n_boot=n_boot,
            references=references,
        )
    first = runs[seeds[0]]
    results = seed_results(runs, seeds)

    timings = {**first["timings"], "total": time.perf_counter() - t_start}
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "backbone": {"name": bb.name, "identity": bb.identity, "source": bb.source},
        "recipe": replace(recipe, seed=seeds[0]).to_dict(),
        "split_protocol": protocol,
        "head": recipe.head,
        "seed": seed,
        "finetune_seeds": seeds,
        "n_boot": n_boot,
        "references": [r for r in references if r in methods],
        "tasks": task_names,
        "unseen_tasks": list(unseen),
        "methods": methods,
        "protocol": "lambda chosen per method by average normalized accuracy on validation; test reported"
        + (f" (sweep stopped after {patience} grid points without improvement)" if patience else "")
        + (f" (coarse to fine: every {stride}th grid point, then the best one's neighbours)" if stride > 1 else ""),
        "manifests": {n: {"counts": d.manifest["counts"], "sha256": d.manifest["sha256"],
                          "test_target": d.manifest.get("test_target")}
                      for n, d in {**data, **unseen_data}.items()},
        "checkpoints": first["checkpoints"],
        "finetune_metrics": first["finetune_metrics"],
        "timings_seconds": timings,
        "seed_timings_seconds": {str(s): r["timings"] for s, r in runs.items()},
    }
    if out_dir is not None:
        default = f"bench_{bb.name}_{recipe.kind}_{len(task_names)}tasks" if protocol == "v1" else \
            f"bench_{bb.name}_{protocol}_{recipe.kind}_{len(task_names)}tasks"
        stem = stem or default
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown_report(results), encoding="utf-8")
        results["meta"]["outputs"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
        logger.info("wrote %s/%s.{json,md}", out, stem)
    return results


def _run_seed(
    bb: Backbone,
    recipe: Recipe,
    data: Mapping[str, TaskData],
    unseen_data: Mapping[str, TaskData],
    methods: Sequence[str],
    lam_grid: Sequence[float] | None,
    method_options: Mapping[str, Mapping[str, Any]],
    variants: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    cache: Path | None,
    progress: bool,
    patience: int | None,
    stride: int,
    n_boot: int,
    references: Sequence[str],
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring for one fine-tuning seed (``recipe.seed``)."""
    from tqdm.auto import tqdm

    merged_task_vector, apply_task_vector, get_method = merge_api()
    task_names = list(data)
    unseen = list(unseen_data)
    method_options = {k: dict(v) for k, v in method_options.items()}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checkpoints = {name: finetune(bb, data[name], recipe, cache=cache, progress=progress) for name in task_names}
    timings["finetune_or_load"] = time.perf_counter() - t0
    heads = {name: ck.head for name, ck in checkpoints.items()}
    unseen_heads = {name: task_head(bb, unseen_data[name], recipe, cache=cache) for name in unseen}

    ev = Evaluator(bb.model, bb.tokenizer, max_length=recipe.max_length)
    base_sd = bb.state_dict()
    task_sds = [checkpoints[name].state_dict() for name in task_names]

    t0 = time.perf_counter()
    pre_val = _evaluate_all(ev, base_sd, heads, data, "val")
    pre_correct = _correct_all(ev, base_sd, heads, data, "test")
    pre_unseen = _evaluate_all(ev, base_sd, unseen_heads, unseen_data, "test") if unseen else {}
    ft_val: dict[str, float] = {}
    ft_correct: dict[str, np.ndarray] = {}
    for name, sd in zip(task_names, task_sds):
        ev.load(sd)
        ft_val[name] = ev.accuracy(heads[name], data[name].val)
        ft_correct[name] = ev.correct(heads[name], data[name].test)
    timings["reference_eval"] = time.perf_counter() - t0

    ft_test = {n: float(c.mean()) for n, c in ft_correct.items()}
    _, ft_lo, ft_hi = bootstrap_average_ci(ft_correct, None, n_boot)
    results: dict[str, Any] = {
        "pretrained": {**_ci_summary(pre_correct, ft_correct, n_boot), "val": pre_val, "unseen_test": pre_unseen},
        "finetuned": {"test": ft_test, "val": ft_val, "avg_test": mean(list(ft_test.values())),
                      "avg_val": mean(list(ft_val.values())), "ci95": {"avg_test": [ft_lo, ft_hi]},
                      "correct_test": {n: pack_correct(c) for n, c in ft_correct.items()}},
        "methods": {},
    }
    method_correct: dict[str, dict[str, np.ndarray]] = {}

    t_methods = time.perf_counter()
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
            return mean([normalized_accuracy(val[n], ft_val[n]) for n in task_names]), val

        from taskmerge.bench.option_sweep import sweep_option, swept_option

        swept = swept_option(spec, grid, method_options[method])
        option_record: dict[str, Any] = {}
        t0 = time.perf_counter()
        if swept is None:
            tau = merged_task_vector(base_sd, task_sds, name, method_options[method])
            merge_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            bar = tqdm(grid, desc=f"λ sweep {method}", disable=not progress, leave=False)
            lam, best_score, curve = sweep_lambda(list(bar), functools.partial(score_at, tau), patience, stride)
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
        method_correct[method] = _correct_all(ev, chosen_sd, heads, data, "test")
        unseen_test = _evaluate_all(ev, chosen_sd, unseen_heads, unseen_data, "test") if unseen else {}
        results["methods"][method] = {
            **_ci_summary(method_correct[method], ft_correct, n_boot),
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
        logger.info("%s (seed %d): λ=%.2f, test avg %.4f (normalized %.4f)", method, recipe.seed, lam,
                    results["methods"][method]["avg_test"], results["methods"][method]["avg_normalized_test"])
        del tau, chosen_sd
    timings["methods"] = time.perf_counter() - t_methods

    for method, paired in _paired_differences(method_correct, ft_correct, references, n_boot).items():
        results["methods"][method]["paired"] = paired
    results["checkpoints"] = {n: str(ck.path) for n, ck in checkpoints.items()}
    results["finetune_metrics"] = {n: ck.info.get("metrics", {}) for n, ck in checkpoints.items()}
    results["timings"] = timings
    return results


def _head_label(meta: Mapping[str, Any]) -> str:
    return "zero-shot heads" if meta.get("head", "probe") == "zeroshot" else "LP heads"


def markdown_report(results: Mapping[str, Any]) -> str:
    """Methods × tasks tables (absolute and normalised test accuracy with 95 % intervals, chosen λ), paired
    differences to the reference methods and, with several seeds, mean ± sd across seeds, as Markdown."""
    meta = results["meta"]
    tasks: list[str] = meta["tasks"]
    unseen: list[str] = meta.get("unseen_tasks", [])
    m = meta["machine"]
    r = meta["recipe"]
    cols = [SHORT_NAMES.get(t, t) for t in tasks]
    heads = _head_label(meta)
    protocol = meta.get("split_protocol", "v1")
    head_text = (f"frozen zero-shot heads (class-name prompts, logit scale {r.get('logit_scale')})"
                 if meta.get("head") == "zeroshot" else f"frozen {r.get('lp_shots')}-shot linear-probe heads")
    rate = m.get("matmul_gflops_2048")
    seeds = meta.get("finetune_seeds", [r["seed"]])
    lines = [
        f"# taskmerge benchmark: {meta['backbone']['name']}, {len(tasks)} tasks, {r['kind']} fine-tuning, "
        f"protocol {protocol}",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['platform']}; CPU {m['cpu']} ({m['cpu_count']} logical CPUs, {m['torch_threads']} torch "
        f"threads); torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}"
        + (f"; 2048 × 2048 float32 matmul: {rate:.0f} GFLOPS" if rate else ""),
        f"- Backbone: {meta['backbone']['source']} (sha256 {meta['backbone']['identity'][:16]}…)",
        f"- Recipe: {r['kind']} fine-tuning through {head_text}, {r['steps']} steps, batch {r['batch_size']}, "
        f"lr {r['lr']}, max length {r['max_length']}; fine-tuning seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; data seed {meta['seed']}",
        f"- Protocol: {meta['protocol']}.",
    ]
    if "n_boot" in meta:
        lines.append(f"- Intervals: 95 % percentile bootstrap over test examples ({meta['n_boot']} replicates, "
                     "examples resampled within each task; normalized accuracy resamples the fine-tuned model's "
                     "correctness on the same examples). Tables show the first fine-tuning seed.")
    combined = meta.get("combined_from")
    if combined:
        lines.append("- Combined from separate runs (`python -m taskmerge.bench.combine`): " + "; ".join(
            f"seed{'s' if len(c['finetune_seeds']) > 1 else ''} {', '.join(map(str, c['finetune_seeds']))} "
            f"run {c['date']} ({c['wall_seconds']:.0f} s)" for c in combined))
    lines += [f"- Wall time: {meta['timings_seconds']['total']:.0f} s" + (" (sum of the runs)" if combined else ""),
              ""]
    pre, ft = results["pretrained"], results["finetuned"]
    counts = {t: meta.get("manifests", {}).get(t, {}).get("counts", {}).get("test") for t in tasks}
    lines += ["## Absolute test accuracy (%)", "",
              "| Method | " + " | ".join(cols) + " | Avg [95 % CI] | λ |", "|---|" + "---|" * (len(cols) + 2)]
    if all(counts.values()):
        lines.append("| *test examples* | " + " | ".join(str(counts[t]) for t in tasks)
                     + f" | {sum(counts.values())} | – |")
    lines.append(f"| Pretrained ({heads}) | " + " | ".join(pct(pre["test"][t]) for t in tasks)
                 + f" | {avg_cell(pre, 'avg_test')} | – |")
    lines.append("| Fine-tuned (individual) | " + " | ".join(pct(ft["test"][t]) for t in tasks)
                 + f" | {avg_cell(ft, 'avg_test')} | – |")
    for name, res in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(pct(res["test"][t]) for t in tasks)
                     + f" | {avg_cell(res, 'avg_test')} | {choice_cell(res)} |")
    lines += ["", "## Normalized test accuracy (% of the fine-tuned model's accuracy)", "",
              "| Method | " + " | ".join(cols) + " | Avg [95 % CI] |", "|---|" + "---|" * (len(cols) + 1)]
    lines.append(f"| Pretrained ({heads}) | " + " | ".join(pct(pre["normalized_test"][t]) for t in tasks)
                 + f" | {avg_cell(pre, 'avg_normalized_test')} |")
    for name, res in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(pct(res["normalized_test"][t]) for t in tasks)
                     + f" | {avg_cell(res, 'avg_normalized_test')} |")
    refs = [x for x in meta.get("references", []) if x in results["methods"]]
    if refs:
        lines += ["", "## Paired differences to " + " and ".join(refs) + " (points, 95 % paired bootstrap interval)",
                  "", "Same resampled test examples for both rows; * = the interval excludes 0.", "",
                  "| Method | " + " | ".join(f"Δ normalized vs {x}" for x in refs) + " | "
                  + " | ".join(f"Δ absolute vs {x}" for x in refs) + " |",
                  "|---|" + "---|" * (2 * len(refs))]
        for name, res in results["methods"].items():
            paired = res.get("paired", {})
            cells = [diff_cell(paired.get(x, {}).get("avg_normalized_test")) for x in refs]
            cells += [diff_cell(paired.get(x, {}).get("avg_test")) for x in refs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    across = results.get("across_seeds")
    if across:
        lines += ["", f"## Across fine-tuning seeds {', '.join(map(str, seeds))} (mean ± sd of the averages, %)", "",
                  "| Method | Avg absolute | Avg normalized | Normalized per seed |", "|---|---|---|---|"]
        labels = {"pretrained": f"Pretrained ({heads})", "finetuned": "Fine-tuned (individual)"}
        for key, row in across.items():
            def ms(k: str, row: Mapping[str, Any] = row) -> str:
                v = row.get(k)
                return f"{100 * v['mean']:.1f} ± {100 * v['sd']:.1f}" if v else "–"

            per_seed = " / ".join(pct(x) for x in row.get("avg_normalized_test", {}).get("values", [])) or "–"
            lines.append(f"| {labels.get(key, key)} | {ms('avg_test')} | {ms('avg_normalized_test')} | {per_seed} |")
        first_only = [m for m in results["methods"] if m not in across]
        if first_only:
            lines += ["", f"Rows run with fine-tuning seed {seeds[0]} only: {', '.join(first_only)}."]
    if unseen:
        ucols = [SHORT_NAMES.get(t, t) for t in unseen]
        lines += ["", f"## Unseen tasks (held out of the merge; {heads}), absolute test accuracy (%)", "",
                  "| Method | " + " | ".join(ucols) + " | Avg |", "|---|" + "---|" * (len(ucols) + 1)]
        rows = [(f"Pretrained ({heads})", pre["unseen_test"])]
        rows += [(name, res["unseen_test"]) for name, res in results["methods"].items()]
        for name, accs in rows:
            lines.append(f"| {name} | " + " | ".join(pct(accs[t]) for t in unseen)
                         + f" | {pct(mean([accs[t] for t in unseen]))} |")
    lines += ["", "Task columns: " + "; ".join(f"{SHORT_NAMES.get(t, t)} = `{t}`" for t in tasks + unseen) + "."]
    manifests = meta.get("manifests", {})
    small = [f"{SHORT_NAMES.get(t, t)} ({manifests[t]['counts']['test']} of {manifests[t]['test_target']})"
             for t in tasks + unseen
             if t in manifests and (manifests[t].get("test_target") or 0) > manifests[t]["counts"]["test"]]
    if small:
        lines.append("Test sets below the target size (the source is smaller): " + ", ".join(small) + ".")
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
    p.add_argument("--tasks", default="8", help="8, 14, 20 (prefixes of the suite), all, or comma-separated task "
                                                "names (default 8)")
    p.add_argument("--recipe", default="full", choices=["full", "lora"])
    p.add_argument("--protocol", default="v2", choices=list(PROTOCOLS),
                   help="v2: large test splits and zero-shot heads (default); v1: the first benchmark's splits and "
                        "16-shot linear-probe heads (reuses its cached checkpoints)")
    p.add_argument("--head", default=None, choices=list(HEADS), help="override the protocol's head")
    p.add_argument("--logit-scale", type=float, default=None, help="zero-shot head logit scale (default 20)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default: the recipe's)")
    p.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the intervals (default 1000)")
    p.add_argument("--lam-grid", default=None, help="comma-separated λ values (default: each method's grid)")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--stem", default=None, help="output file stem (default bench_<backbone>_v2_<recipe>_<n>tasks)")
    p.add_argument("--backbone", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--patience", type=int, default=None,
                   help="stop each λ sweep after this many grid points without improvement (default: full grid)")
    p.add_argument("--stride", type=int, default=1,
                   help="coarse-to-fine λ sweep: every STRIDE-th grid point, then the best one's neighbours "
                        "(default 1: every point)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`build_parser` arguments and print the Markdown report."""
    import sys

    head = args.head or ("zeroshot" if args.protocol == "v2" else "probe")
    recipe = get_recipe(args.recipe, head=head,
                        **({"logit_scale": args.logit_scale} if args.logit_scale is not None else {}))
    results = run_benchmark(
        methods=args.methods.split(",") if args.methods else None,
        tasks=args.tasks,
        recipe=recipe,
        lam_grid=[float(x) for x in args.lam_grid.split(",")] if args.lam_grid else None,
        out_dir=args.out,
        backbone=args.backbone,
        seed=args.seed,
        steps=args.steps,
        num_threads=args.threads,
        progress=not args.no_progress,
        stem=args.stem,
        patience=args.patience,
        stride=args.stride,
        variants=dict(parse_variant(v) for v in args.variant),
        protocol=args.protocol,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        n_boot=args.n_boot,
    )
    sys.stdout.write(markdown_report(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m taskmerge.bench``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)
