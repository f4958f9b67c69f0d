"""The papers' vision protocol end to end: CLIP ViT, 8 / 14 / 20 tasks, zero-shot heads, λ on validation.

:func:`run_vision_benchmark` on a loaded :class:`~taskmerge.bench.vision.suite.Suite`:

1. score the pretrained encoder (zero-shot) and every fine-tuned encoder on its own task, validation and test;
   the fine-tuned accuracies normalise (normalised accuracy = merged / fine-tuned, per task);
2. per data-free method, merge once (:func:`taskmerge.merge.merged_task_vector` over the vision tower) and choose
   λ on validation (:func:`taskmerge.bench.runner.sweep_lambda`: best average normalised validation accuracy,
   first on ties) from the method's registered grid — or, for a method registered with an ``option_grid`` and
   the λ grid ``(1.0,)``, its own hyper-parameter (:mod:`taskmerge.bench.option_sweep`) — then score test;
3. per data-based configuration (:mod:`taskmerge.bench.vision.adapt`), adapt on the unlabeled test images from
   its start's chosen λ and score test;
4. tables: per-task absolute and normalised test accuracy, averages with 95 % bootstrap intervals over test
   examples (:func:`taskmerge.bench.stats.bootstrap_average_ci`; the normalised interval resamples the
   fine-tuned model's correctness with the same indices), and paired intervals of each method's absolute and
   normalised averages minus Task Arithmetic's and TSV-M's (:func:`taskmerge.bench.stats.paired_bootstrap_diff_ci`;
   the JSON's ``paired: {reference: {avg_test, avg_normalized_test}}``, as the text runner writes it).

Results go to ``<out>/<stem>.json`` and ``<out>/<stem>.md``. ``python -m taskmerge.bench.vision --help`` (or
``taskmerge bench --suite vit``) runs it from the command line.
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

import numpy as np
import torch

from taskmerge.bench.report import avg_cell, choice_cell, diff_cell, mean, pct
from taskmerge.bench.vision.suite import Suite
from taskmerge.errors import CheckpointError, OptionError

__all__ = ["run_vision_benchmark", "markdown_report", "build_parser", "main", "REFERENCE_METHODS"]

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("task_arithmetic", "tsv_m")
"""Rows every other row's normalised average is compared with (paired bootstrap), when they are in the run."""

Correct = dict[str, torch.Tensor]


def _accuracies(correct: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(c.float().mean()) for n, c in correct.items()}


def _arrays(correct: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: c.cpu().numpy().astype(bool) for n, c in correct.items()}


class _Scorer:
    """Summaries of per-example test correctness against the fine-tuned reference (module docstring, 4)."""

    def __init__(self, ft_test: Correct, n_boot: int, seed: int) -> None:
        from taskmerge.bench.evaluate import normalized_accuracy

        self.norm = normalized_accuracy
        self.ft = _arrays(ft_test)
        self.ft_acc = _accuracies(ft_test)
        self.n_boot = n_boot
        self.seed = seed

    def summary(self, correct: Correct) -> dict[str, Any]:
        """Per-task and normalised test accuracy, their averages and the averages' 95 % intervals (``ci95``, the
        text runner's keys)."""
        from taskmerge.bench.stats import bootstrap_average_ci

        arrays = _arrays(correct)
        test = _accuracies(correct)
        avg, lo, hi = bootstrap_average_ci(arrays, None, self.n_boot, self.seed)
        navg, nlo, nhi = bootstrap_average_ci(arrays, self.ft, self.n_boot, self.seed)
        return {"test": test, "normalized_test": {n: self.norm(a, self.ft_acc[n]) for n, a in test.items()},
                "avg_test": avg, "avg_normalized_test": navg,
                "ci95": {"avg_test": [lo, hi], "avg_normalized_test": [nlo, nhi]}}

    def paired(self, a: Correct, b: Correct) -> dict[str, list[float]]:
        """``{"avg_test" | "avg_normalized_test": [Δ, low, high]}``: the averages of ``a`` minus ``b`` with their
        paired 95 % intervals (same resampled test examples for both; the text runner's ``paired`` format)."""
        from taskmerge.bench.stats import paired_bootstrap_diff_ci

        xa, xb = _arrays(a), _arrays(b)
        return {"avg_test": list(paired_bootstrap_diff_ci(xa, xb, None, self.n_boot, self.seed)),
                "avg_normalized_test": list(paired_bootstrap_diff_ci(xa, xb, self.ft, self.n_boot, self.seed))}


def _data_free_row(suite: Suite, label: str, method: str, options: dict[str, Any], lam_grid: Sequence[float] | None,
                   ft_val: Mapping[str, float], *, patience: int | None, merge_device: str,
                   progress: bool) -> tuple[dict[str, Any], Correct, dict[str, torch.Tensor]]:
    """One data-free method: merge, choose λ (or its option) on validation, score test (module docstring, 2)."""
    from tqdm.auto import tqdm

    from taskmerge.bench.option_sweep import sweep_option, swept_option
    from taskmerge.bench.runner import sweep_lambda
    from taskmerge.merge import apply_task_vector, merged_task_vector
    from taskmerge.registry import get_method

    spec = get_method(method)
    if "num_classes" in getattr(spec.options, "model_fields", {}) and "num_classes" not in options:
        options = {**options, "num_classes": [suite.tasks[n].num_classes for n in suite.names]}
    grid = [float(x) for x in (lam_grid if lam_grid is not None else spec.lambda_grid or (spec.default_lambda,))]

    def merge(opts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return merged_task_vector(suite.base_sd, suite.task_sds, method, dict(opts), device=merge_device)

    def score(tau: Mapping[str, torch.Tensor], lam: float) -> tuple[float, dict[str, float]]:
        val = _accuracies(suite.correct(apply_task_vector(suite.base_sd, tau, lam), "val"))
        return mean([val[n] / ft_val[n] for n in suite.names]), val

    record: dict[str, Any] = {}
    swept = swept_option(spec, grid, options)
    t0 = time.perf_counter()
    if swept is None:
        tau = merge(options)
        merge_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        bar = tqdm(grid, desc=f"λ sweep {label}", disable=not progress, leave=False)
        lam, best, curve = sweep_lambda(list(bar), lambda x: score(tau, x), patience)
        bar.close()
    else:  # the method's own hyper-parameter, chosen at λ = 1 (the sweep's time includes the merges)
        key, values = swept
        found = sweep_option(key, list(values), lambda v: merge({**options, key: v}), lambda t: score(t, 1.0))
        tau, lam, best, merge_seconds = found.tau, 1.0, found.score, found.merge_seconds
        curve = [{"lambda": 1.0, **point} for point in found.curve]
        options = {**options, key: found.value}
        record = {"chosen_option": {key: found.value}, "option_grid": {key: list(values)}}
    correct = suite.correct(apply_task_vector(suite.base_sd, tau, lam), "test")
    record.update({"kind": "data-free", "method": method, "lambda": lam, "grid": grid, "avg_normalized_val": best,
                   "val_curve": curve, "grid_points_evaluated": len(curve), "options": options,
                   "merge_seconds": merge_seconds, "sweep_seconds": time.perf_counter() - t0})
    return record, correct, tau


def _check_finetuned(suite: Suite, ft_val: Mapping[str, float], ft_test: Mapping[str, float]) -> None:
    """A fine-tuned tower that never scores on its own validation split cannot normalise (an error); one near
    chance on test is suspicious (a warning): a wrong checkpoint, or class names not in the dataset's label order."""
    for name in suite.names:
        chance = 1.0 / suite.tasks[name].num_classes
        where = f"fine-tuned checkpoint of task {name!r} ({suite.sources.checkpoints[name]})"
        if ft_val[name] <= 0:
            raise CheckpointError(f"{where}: 0 % accuracy on its validation split; is it the right checkpoint, and are "
                                  "the class names in the dataset's label order?")
        if ft_test[name] < 2 * chance:
            logger.warning("%s: test accuracy %.1f %% (chance %.1f %%): check the checkpoint and the order of the "
                           "class names", where, 100 * ft_test[name], 100 * chance)


def _starts(data_configs: Sequence[Mapping[str, Any]], rows: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    """Add the data-free start of every data-based configuration to ``rows`` (label → (method, options)) unless a
    row with that method and options is already there; return each configuration's start label."""
    from taskmerge.databased import parse_data_options, start_method

    labels = []
    for cfg in data_configs:
        parsed = parse_data_options(cfg["method"], cfg.get("options") or {})
        method = start_method(cfg["method"], parsed)
        options = dict(getattr(parsed, "base_options", None) or {}) if cfg["method"] == "moma" else {}
        label = next((k for k, (m, o) in rows.items() if m == method and o == options), None)
        if label is None:
            label = method if method not in rows else f"{method} (start of {cfg['name']})"
            rows[label] = (method, options)
        labels.append(label)
    return labels


def run_vision_benchmark(
    suite: Suite,
    methods: Sequence[str] | None = None,
    *,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    data_configs: Sequence[Mapping[str, Any]] = (),
    lam_grid: Sequence[float] | None = None,
    patience: int | None = None,
    merge_device: str | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    out_dir: str | Path | None = "results",
    stem: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol (module docstring) and return (and, with ``out_dir``, write) the results.

    Args:
        suite: the loaded suite (:func:`taskmerge.bench.vision.suite.load_suite`).
        methods: data-free method names (default: every registered data-free method).
        variants: extra rows, label → (method, options) (:func:`taskmerge.bench.runner.parse_variant`).
        data_configs: data-based rows, ``{"name", "method", "options"}`` each.
        lam_grid: λ values swept for every data-free method (default: each method's registered grid).
        patience: stop a λ sweep after this many grid points without a new best (``None``: whole grid).
        merge_device: where the merges run (default: the evaluator's device).
        n_boot, boot_seed: bootstrap replicates and seed of the intervals.
        out_dir, stem: write ``<out_dir>/<stem>.json`` and ``.md`` (``None``: nothing written).
        progress: progress bars.
    """
    from taskmerge.bench.runner import default_methods
    from taskmerge.registry import get_method

    t_start = time.perf_counter()
    names = suite.names
    methods = default_methods() if methods is None else methods
    rows: dict[str, tuple[str, dict[str, Any]]] = {m: (m, {}) for m in methods}
    rows.update({label: (m, dict(o)) for label, (m, o) in (variants or {}).items()})
    for label, (method, _) in rows.items():
        if not get_method(method).data_free:
            raise OptionError(f"{label}: {method} is not a data-free method; pass data-based methods with "
                              "--data-method")
    start_labels = _starts(data_configs, rows)
    device = merge_device or str(suite.evaluator.device)

    t0 = time.perf_counter()
    pre_val, pre_test = suite.correct(suite.base_sd, "val"), suite.correct(suite.base_sd, "test")
    ft_val: dict[str, float] = {}
    ft_test: Correct = {}
    for name, sd in zip(names, suite.task_sds):
        suite.evaluator.load(sd)
        ft_val[name] = float(suite.evaluator.correct(suite.heads[name], suite.val[name]).float().mean())
        ft_test[name] = suite.evaluator.correct(suite.heads[name], suite.test[name])
    reference_seconds = time.perf_counter() - t0
    _check_finetuned(suite, ft_val, _accuracies(ft_test))
    scorer = _Scorer(ft_test, n_boot, boot_seed)
    correct: dict[str, Correct] = {}
    results: dict[str, Any] = {
        "pretrained": {**scorer.summary(pre_test), "val": _accuracies(pre_val)},
        "finetuned": {**scorer.summary(ft_test), "val": ft_val},
        "methods": {},
    }
    kept: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
    for label, (method, options) in rows.items():
        record, correct[label], tau = _data_free_row(suite, label, method, dict(options), lam_grid, ft_val,
                                                     patience=patience, merge_device=device, progress=progress)
        results["methods"][label] = {**scorer.summary(correct[label]), **record}
        if label in start_labels:
            kept[label] = (record["lambda"], tau)
        del tau
        logger.info("%s: λ=%g, test avg %.4f (normalized %.4f)", label, record["lambda"],
                    results["methods"][label]["avg_test"], results["methods"][label]["avg_normalized_test"])

    from taskmerge.bench.vision.adapt import adapt

    for cfg, start in zip(data_configs, start_labels):
        lam, tau = kept[start]
        options = dict(cfg.get("options") or {})
        if cfg["method"] == "mda_am" and rows[start][0] == "mda_ta":
            options.setdefault("mda_options", results["methods"][start]["options"])
        correct[cfg["name"]], record = adapt(suite, cfg["method"], options, lam, tau, progress=progress)
        summary = scorer.summary(correct[cfg["name"]])
        start_row = results["methods"][start]
        results["methods"][cfg["name"]] = {
            **summary, **record, "kind": "data-based", "method": cfg["method"], "start": start, "lambda": lam,
            "adapt_split": "test (unlabeled)",
            "delta_avg_normalized_test": summary["avg_normalized_test"] - start_row["avg_normalized_test"]}
    for label, row in results["methods"].items():
        row["paired"] = {ref: scorer.paired(correct[label], correct[ref])
                         for ref in REFERENCE_METHODS if ref in correct and ref != label}

    results["meta"] = _meta(suite, list(results["methods"]), lam_grid, patience, n_boot, boot_seed,
                            {**suite.seconds, "reference_eval": reference_seconds,
                             "total": time.perf_counter() - t_start})
    if out_dir is not None:
        stem = stem or f"vision_{_slug(suite.sources.backbone)}_{len(names)}tasks"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown_report(results), encoding="utf-8")
        results["meta"]["outputs"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
        logger.info("wrote %s/%s.{json,md}", out, stem)
    return results


def _slug(name: str) -> str:
    return "".join(ch for ch in name.lower().replace("/", "") if ch.isalnum() or ch == "-")


def _meta(suite: Suite, rows: list[str], lam_grid: Sequence[float] | None, patience: int | None, n_boot: int,
          boot_seed: int, seconds: dict[str, float]) -> dict[str, Any]:
    from taskmerge.bench.runner import machine_info

    machine = machine_info()
    if suite.evaluator.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(suite.evaluator.device)
    src = suite.sources
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "backbone": src.backbone,
        "pretrained": suite.clip_path,
        "checkpoints": {n: src.checkpoints[n] for n in suite.names},
        "data": {n: {"val": suite.val[n].source, "test": suite.test[n].source, "n_val": len(suite.val[n]),
                     "n_test": len(suite.test[n])} for n in suite.names},
        "tasks": suite.names,
        "titles": {n: suite.tasks[n].title for n in suite.names},
        "rows": rows,
        "lam_grid": None if lam_grid is None else list(lam_grid),
        "protocol": ("frozen zero-shot heads from the pretrained text encoder; lambda (or the method's own option) "
                     "chosen per method by average normalized accuracy on validation; test reported"
                     + (f"; lambda sweep stopped after {patience} points without improvement" if patience else "")),
        "bootstrap": {"n_boot": n_boot, "seed": boot_seed, "level": 0.95},
        "timings_seconds": seconds,
    }


def _label(name: str, row: Mapping[str, Any]) -> str:
    if row.get("kind") != "data-based":
        return name
    labels = ", validation labels" if row.get("uses_labels") else ""
    return f"{name} (data-based, from {row['start']}{labels})"


def markdown_report(results: Mapping[str, Any]) -> str:
    """Absolute and normalised test accuracy per task with averages and their 95 % intervals, paired
    differences to the reference rows, and how the run was set up, as Markdown."""
    meta = results["meta"]
    tasks: list[str] = meta["tasks"]
    cols = [meta["titles"][t] for t in tasks]
    m = meta["machine"]
    boot = meta["bootstrap"]
    lines = [
        f"# taskmerge vision benchmark: CLIP {meta['backbone']}, {len(tasks)} tasks",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['platform']}; CPU {m['cpu']} ({m['cpu_count']} logical CPUs); "
        + (f"GPU {m['gpu']}; " if "gpu" in m else "")
        + f"torch {m['torch']}, transformers {m['transformers']}",
        f"- Pretrained: {meta['pretrained']}; fine-tuned: "
        + ", ".join(f"`{meta['checkpoints'][t]}`" for t in tasks),
        f"- Protocol: {meta['protocol']}. Intervals: 95 % percentile bootstrap over test examples "
        f"({boot['n_boot']} replicates, seed {boot['seed']}); normalized = merged / fine-tuned accuracy per task.",
        f"- Wall time: {meta['timings_seconds']['total']:.0f} s",
        "",
        "## Absolute test accuracy (%)",
        "",
        "| Method | " + " | ".join(cols) + " | Avg [95% CI] | λ |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    pre, ft = results["pretrained"], results["finetuned"]
    lines.append("| Pretrained (zero-shot) | " + " | ".join(pct(pre["test"][t]) for t in tasks)
                 + f" | {avg_cell(pre, 'avg_test')} | – |")
    lines.append("| Fine-tuned (individual) | " + " | ".join(pct(ft["test"][t]) for t in tasks)
                 + f" | {avg_cell(ft, 'avg_test')} | – |")
    rows = results["methods"]
    for name, row in rows.items():
        lines.append(f"| {_label(name, row)} | " + " | ".join(pct(row["test"][t]) for t in tasks)
                     + f" | {avg_cell(row, 'avg_test')} | {choice_cell(row)} |")
    lines += ["", "## Normalized test accuracy (% of the fine-tuned model's accuracy)", "",
              "| Method | " + " | ".join(cols) + " | Avg [95% CI] |", "|---|" + "---|" * (len(cols) + 1)]
    lines.append("| Pretrained (zero-shot) | " + " | ".join(pct(pre["normalized_test"][t]) for t in tasks)
                 + f" | {avg_cell(pre, 'avg_normalized_test')} |")
    for name, row in rows.items():
        lines.append(f"| {_label(name, row)} | "
                     + " | ".join(pct(row["normalized_test"][t]) for t in tasks)
                     + f" | {avg_cell(row, 'avg_normalized_test')} |")
    refs = [r for r in REFERENCE_METHODS if r in rows]
    if refs:
        lines += ["", "## Paired differences of the normalized average (points, 95% CI over test examples; * excludes 0)", "",
                  "| Method | " + " | ".join(f"− {r}" for r in refs) + " |", "|---|" + "---|" * len(refs)]
        for name, row in rows.items():
            cells = []
            for r in refs:
                d = row["paired"].get(r, {}).get("avg_normalized_test")
                cells.append(diff_cell(d))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Tasks: " + "; ".join(f"{meta['titles'][t]} = `{t}` ({meta['data'][t]['n_test']} test, "
                                        f"{meta['data'][t]['n_val']} validation)" for t in tasks) + "."]
    return "\n".join(lines) + "\n"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of the vision benchmark (reusable under ``taskmerge bench --suite vit``)."""
    from taskmerge.bench.vision.loaders import BACKBONES

    p = parser or argparse.ArgumentParser(prog="python -m taskmerge.bench.vision",
                                          description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="ViT-B/32", help=f"one of {', '.join(BACKBONES)} (default ViT-B/32)")
    p.add_argument("--tasks", default="8", help="8, 14, 20, or comma-separated task names (default 8)")
    p.add_argument("--methods", default=None, help="comma-separated data-free methods (default: all of them)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD:key=value,...",
                   help="an extra data-free row: METHOD with these options under LABEL (repeatable)")
    p.add_argument("--data-method", action="append", default=[], metavar="NAME=METHOD:key=value,...",
                   help="a data-based row (adamerging, mda_am, moma) adapting on the unlabeled test images, "
                        "e.g. 'moma-ta=moma:base=task_arithmetic,steps=1000'; MDA-AM's label-using variant: "
                        "'mda-labels=mda_am:class_means=labels' (validation labels) (repeatable)")
    p.add_argument("--lam-grid", default=None, help="comma-separated λ values (default: each method's grid)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop each λ sweep after this many grid points without improvement (default: whole grid)")
    p.add_argument("--sources", default=None, metavar="YAML",
                   help="where the pretrained CLIP, checkpoints and data are (see taskmerge.bench.vision.loaders)")
    p.add_argument("--data-dir", default=None,
                   help="root of the image folders (<dir>/<task>/{test,train,val}/<label>/)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory for downloads")
    p.add_argument("--offline", action="store_true", help="download nothing (hub references from the local cache only)")
    p.add_argument("--print-sources", action="store_true", help="print the resolved sources as YAML and exit")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available, else cpu)")
    p.add_argument("--merge-device", default=None, help="device of the merges (default: --device)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads (default 4)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation share of the training split (default 0.1, the papers')")
    p.add_argument("--max-val", type=int, default=5000, help="validation examples per task at most (default 5000)")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the validation carve (default 0)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--stem", default=None, help="output file stem (default vision_<backbone>_<n>tasks)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _print_sources(sources: Any, tasks: Sequence[str]) -> None:
    import yaml

    data = {"pretrained": sources.pretrained, "checkpoints": {n: sources.checkpoints[n] for n in tasks},
            "data_dir": str(sources.data_dir) if sources.data_dir else None,
            "cache_dir": str(sources.cache_dir) if sources.cache_dir else None}
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the vision benchmark from parsed :func:`build_parser` arguments; print the Markdown report."""
    from taskmerge.bench.runner import parse_variant
    from taskmerge.bench.vision.loaders import make_sources, read_sources_yaml
    from taskmerge.bench.vision.suite import load_suite
    from taskmerge.bench.vision.tasks import apply_overrides, resolve_tasks

    config = read_sources_yaml(args.sources) if args.sources else {}
    table = apply_overrides(config.get("tasks"))
    names = resolve_tasks(args.tasks, table)
    sources = make_sources(args.backbone, {n: table[n] for n in names}, config, data_dir=args.data_dir,
                           offline=args.offline, cache_dir=args.cache_dir)
    if args.print_sources:
        _print_sources(sources, names)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_configs = [{"name": n, "method": m, "options": o} for n, (m, o) in map(parse_variant, args.data_method)]
    suite = load_suite(names, table, sources, device=device, batch_size=args.batch_size, workers=args.workers,
                       val_fraction=args.val_fraction, max_val=args.max_val, val_seed=args.val_seed)
    results = run_vision_benchmark(
        suite,
        methods=args.methods.split(",") if args.methods else None,
        variants=dict(parse_variant(v) for v in args.variant),
        data_configs=data_configs,
        lam_grid=[float(x) for x in args.lam_grid.split(",")] if args.lam_grid else None,
        patience=args.patience,
        merge_device=args.merge_device,
        n_boot=args.n_boot,
        out_dir=args.out,
        stem=args.stem,
        progress=not args.no_progress,
    )
    sys.stdout.write(markdown_report(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m taskmerge.bench.vision``); a bad input is one line on stderr
    and exit code 2."""
    from taskmerge.errors import TaskmergeError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except TaskmergeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
