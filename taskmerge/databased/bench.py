"""Data-based methods on the offline benchmark (:mod:`taskmerge.bench`): the runner hook and a standalone driver.

* :func:`evaluate_databased` — run one data-based method on already loaded benchmark pieces (backbone, task
  data, heads, state dicts, evaluator) and report per-task test accuracy, absolute and normalised, in the
  shape of :func:`taskmerge.bench.runner.run_benchmark`'s per-method results, with the run's convergence
  evidence. This is the hook for the runner.
* :func:`run_databased` — everything end to end: load (or fine-tune, cached) the checkpoints, choose each
  data-free starting point's λ on validation (the runner's protocol), run the data-based configurations,
  and write ``<out_dir>/<stem>.json`` + ``.md`` (methods × tasks, absolute and normalised, Δ vs the start) and
  every run's loss curve (``<out_dir>/<stem>_curves/<row>.{json,png}``, :mod:`taskmerge.databased.curves`).

Protocol. The unlabeled inputs are the texts of ``adapt_split`` with their labels dropped: ``"test"`` by
default — the papers' test-time adaptation (AdaMerging, MDA and MOMA all adapt on the unlabeled test inputs
they are scored on; **transductive**); ``"val"`` (or ``"train"``) adapts on other texts (the **inductive**
variant), and every row and table says which. Labels serve only for choices and scores: each data-free start's
λ is chosen on the validation split, and the test split is scored. No data-based method reads a label, except
MDA-AM's explicit ``class_means="labels"`` variant (class means from the validation labels), marked in every
table. MDA-AM's rotation diagnostics are scored on the split it did not adapt on (validation, or test when it
adapted on validation). Each method starts from its data-free counterpart at the λ that counterpart chose on
validation: AdaMerging from Task Arithmetic, MDA-AM from MDA-TA (Task Arithmetic for the
``parameter_alignment=False`` ablation), MOMA from its ``base`` (WA / TA / TIES).

``python -m taskmerge.databased.bench --help`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskmerge.bench.report import diff_cell, fmt, mean, pct
from taskmerge.bench.runner import pack_correct, unpack_correct
from taskmerge.bench.stats import paired_bootstrap_diff_ci
from taskmerge.databased import DATA_METHODS, get_data_method, parse_data_options, start_method
from taskmerge.databased.curves import write_curve
from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
from taskmerge.databased.gap import attach_ceiling, gap_section
from taskmerge.databased.loop import LabeledInputs, TokenInputs, json_info

__all__ = ["evaluate_databased", "run_databased", "combine_results", "markdown_table", "protocol_of", "main"]

logger = logging.getLogger(__name__)


def protocol_of(adapt_split: str) -> str:
    """``"transductive"`` when adapting on the (unlabeled) test inputs that are scored, else ``"inductive"``."""
    return "transductive" if adapt_split == "test" else "inductive"


def _summary(acc: Mapping[str, float], ft: Mapping[str, float]) -> dict[str, Any]:
    norm = {n: acc[n] / ft[n] for n in acc}
    return {"test": dict(acc), "normalized_test": norm, "avg_test": mean(list(acc.values())),
            "avg_normalized_test": mean(list(norm.values()))}


def _accuracies(evaluator: Any, state: Mapping[str, torch.Tensor], heads: Mapping[str, Any],
                data: Mapping[str, Any], split: str) -> dict[str, float]:
    evaluator.load(state)
    return {n: evaluator.accuracy(heads[n], data[n].split(split)) for n in heads}


def _correct(evaluator: Any, state: Mapping[str, torch.Tensor], heads: Mapping[str, Any],
             data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per task, which test examples the heads classify right under ``state``."""
    evaluator.load(state)
    return {n: evaluator.correct(heads[n], data[n].test) for n in heads}


def _unlabeled(tokenizer: Any, data: Mapping[str, Any], split: str, max_length: int) -> list[TokenInputs]:
    """The texts of ``split`` of every task, tokenised once, labels dropped."""
    return [TokenInputs.from_texts(tokenizer, [text for text, _ in data[n].split(split)], max_length) for n in data]


def _labeled(tokenizer: Any, data: Mapping[str, Any], split: str, max_length: int) -> list[LabeledInputs]:
    return [LabeledInputs(TokenInputs.from_texts(tokenizer, [t for t, _ in data[n].split(split)], max_length),
                          torch.tensor([y for _, y in data[n].split(split)])) for n in data]


def evaluate_databased(
    method: str,
    *,
    backbone: Any,
    data: Mapping[str, Any],
    heads: Mapping[str, Any],
    base_sd: Mapping[str, torch.Tensor],
    task_sds: Sequence[Mapping[str, torch.Tensor]],
    evaluator: Any,
    ft_test: Mapping[str, float],
    start_lambda: float,
    start_vector: Mapping[str, torch.Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
    adapt_split: str = "test",
    max_length: int = 48,
    progress: bool = True,
    inputs: Sequence[TokenInputs] | None = None,
    unseen_data: Mapping[str, Any] | None = None,
    unseen_heads: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run data-based ``method`` on the benchmark's pieces and report test accuracy (see the module docstring).

    Args:
        method: ``adamerging``, ``mda_am`` or ``moma``.
        backbone: the :class:`taskmerge.bench.backbone.Backbone` (its model is the architecture, its tokenizer
            tokenises the unlabeled texts).
        data: ``{task: TaskData}`` of the merged tasks, in the order of ``task_sds``.
        heads: ``{task: Head}`` (the frozen LP heads stored with the checkpoints).
        base_sd, task_sds: θ₀ and the fine-tuned encoders.
        evaluator: a :class:`taskmerge.bench.evaluate.Evaluator` of the backbone.
        ft_test: each task's fine-tuned test accuracy (the normaliser).
        start_lambda: the λ the starting data-free method chose on validation (initialises λ / sets MOMA's λ).
        start_vector: the starting method's merged task vector, if already computed (layer-wise MDA-AM, MOMA).
        options: the method's options (fields of its options class).
        adapt_split: which split's texts (labels dropped) are the unlabeled inputs (``"test"``: transductive,
            the papers' protocol; ``"val"`` / ``"train"``: inductive).
        max_length: tokenisation length (the recipe's).
        progress: progress bar of the training loop (unless ``options`` sets ``progress``).
        inputs: the unlabeled inputs already tokenised (``adapt_split``'s texts, task order), else tokenised here.
        unseen_data, unseen_heads: tasks held out of the merge, evaluated (test) with their own heads on the
            merged encoder (``unseen_test`` of the result, as the runner's rows).

    Returns:
        A row in the format of :func:`taskmerge.bench.runner.run_benchmark`'s ``results["methods"][name]``
        (``test`` / ``normalized_test`` per task and their averages, ``lambda`` = the start's λ, ``unseen_test``),
        plus ``val`` per task, the start method and λ, the protocol (``adapt_split``, ``protocol``,
        ``uses_labels``, ``label_source``), the loss history (``loss`` per step, ``loss_parts``,
        ``step_seconds``, ``loss_curve``: smoothed, every 5th step), its ``convergence``
        (:func:`taskmerge.databased.loop.tail_trend`), MOMA's ``masking_rate``, the learned λ's
        ``lambda_stats``, MDA-AM's ``diagnostics`` (on ``diagnostics_split``), ``info`` and seconds.
    """
    from taskmerge.databased.mda_am import rotation_diagnostics

    spec = get_data_method(method)
    names = list(data)
    normalize = {bool(getattr(heads[n], "normalize", True)) for n in names}
    if len(normalize) != 1:
        raise ValueError("all heads must agree on feature normalisation")
    opts = dict(options or {})
    key = {"adamerging": "init_lambda", "mda_am": "init_lambda", "moma": "lam"}[method]
    opts.setdefault(key, float(start_lambda))
    opts.setdefault("progress", progress)
    parsed = parse_data_options(method, opts)
    tok = backbone.tokenizer
    if inputs is None:
        inputs = _unlabeled(tok, data, adapt_split, max_length)
    encoder = FunctionalEncoder(backbone.model, base_sd, mean_pool_features(normalize.pop()))
    head_list = [heads[n] for n in names]
    kwargs: dict[str, Any] = {"encoder": encoder}
    uses_labels = method == "mda_am" and parsed.class_means == "labels"
    if uses_labels:
        kwargs["labeled"] = _labeled(tok, data, "val", max_length)
    if method in ("mda_am", "moma") and start_vector is not None and getattr(parsed, "granularity", "layer") == "layer":
        kwargs["start_vector"] = start_vector
    t0 = time.perf_counter()
    result = spec.fn(base_sd, task_sds, head_list, list(inputs), parsed, **kwargs)
    seconds = time.perf_counter() - t0
    new_heads = dict(zip(names, result.heads))
    correct = _correct(evaluator, result.state_dict, new_heads, data)
    test = {n: float(c.mean()) for n, c in correct.items()}
    val = {n: evaluator.accuracy(new_heads[n], data[n].val) for n in names}
    unseen_test = ({n: evaluator.accuracy(unseen_heads[n], unseen_data[n].test) for n in unseen_data}
                   if unseen_data and unseen_heads else {})
    hist = result.history
    smooth = hist.smoothed(10)
    info = json_info(result.info)
    row: dict[str, Any] = {}
    lam_table = result.info.get("lambdas")
    if lam_table:
        flat = [x for r in lam_table.values() for x in r]
        row["lambda_stats"] = {"min": min(flat), "max": max(flat), "mean": mean(flat)}
        rows = list(lam_table.values())
        info["lambda_mean_per_vector"] = [mean([r[i] for r in rows]) for i in range(len(rows[0]))]
    if "masking_rate" in result.info:
        row["masking_rate"] = float(result.info["masking_rate"])
    if method == "mda_am" and parsed.rotation:
        held_out = "test" if adapt_split == "val" else "val"
        diag = rotation_diagnostics(encoder, result.state_dict, result.info["classifier_heads"],
                                    result.info["rotations"], result.info["procrustes_rotations"],
                                    _labeled(tok, data, held_out, max_length), parsed.feature_batch_size)
        row["diagnostics"] = {k: mean(v) for k, v in diag.items()}
        row["diagnostics_per_task"] = diag
        row["diagnostics_split"] = held_out
    timed = hist.step_seconds[1:] or hist.step_seconds
    return {
        **_summary(test, ft_test),
        "val": val,
        "method": method,
        "start_method": start_method(method, parsed),
        "start_lambda": float(start_lambda),
        "lambda": float(start_lambda),
        "unseen_test": unseen_test,
        "correct_test": {n: pack_correct(c) for n, c in correct.items()},
        "adapt_split": adapt_split,
        "protocol": protocol_of(adapt_split),
        "uses_labels": uses_labels,
        "label_source": "val (class means)" if uses_labels else None,
        "options": parsed.model_dump(),
        "loss": hist.loss,
        "loss_parts": hist.parts,
        "step_seconds": hist.step_seconds,
        "loss_curve": smooth[::5] + ([smooth[-1]] if smooth and (len(smooth) - 1) % 5 else []),
        "convergence": hist.convergence(),
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, len(hist.loss)),
        "median_step_seconds": statistics.median(timed) if timed else None,
        **row,
        "info": info,
    }


def run_databased(
    configs: Sequence[Mapping[str, Any]],
    tasks: int | str | Sequence[str] = 8,
    recipe: Any = "full",
    *,
    backbone: Any = "minilm",
    seed: int = 0,
    start_lambdas: Mapping[str, float] | None = None,
    start_options: Mapping[str, Mapping[str, Any]] | None = None,
    lam_grids: Mapping[str, Sequence[float]] | None = None,
    patience: int | None = 3,
    adapt_split: str = "test",
    protocol: str = "v2",
    out_dir: str | Path | None = "results",
    stem: str = "databased",
    reference: str | Path | None = None,
    cache: Path | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Run data-based configurations on the benchmark (module docstring).

    Args:
        configs: ``[{"name": row name, "method": adamerging|mda_am|moma, "options": {...}}, ...]``.
        tasks, recipe, backbone, seed, cache, num_threads, progress: as :func:`taskmerge.bench.runner.run_benchmark`.
        start_lambdas: λ of data-free starting methods already chosen (skips their validation sweep).
        start_options: options of the data-free starting methods (``mda_ta``'s ``num_classes`` is filled in).
        lam_grids: λ grids of the starting methods' sweeps (default: the registry's).
        patience: stop a sweep after this many grid points without a new best (``None``: whole grid).
        adapt_split: the split whose texts are the unlabeled inputs (default ``"test"``, the papers' transductive
            protocol; ``"val"``: the inductive variant); a configuration's ``"adapt_split"`` key overrides it.
        protocol: the benchmark's split protocol (``"v2"`` or ``"v1"``, :func:`taskmerge.bench.datasets.load_task`);
            a named recipe takes the protocol's head, as in :func:`taskmerge.bench.runner.run_benchmark`.
        n_boot: bootstrap replicates of each row's 95 % interval of its Δ vs its start (``delta_ci95``: paired,
            resampling the test examples within each task, :func:`taskmerge.bench.stats.paired_bootstrap_diff_ci`).
        out_dir, stem: write ``<out_dir>/<stem>.json`` and ``.md``, and every run's loss curve to
            ``<out_dir>/<stem>_curves/`` (``out_dir=None``: nothing written).
        reference: a results JSON of an earlier run on the same checkpoints — this module's or
            :func:`taskmerge.bench.runner.run_benchmark`'s — whose pretrained / fine-tuned accuracies and data-free
            starts (λ and test accuracy) are reused instead of re-evaluated (checked: same tasks, recipe and
            checkpoint folders).
    """
    from tqdm.auto import tqdm

    from taskmerge.bench.backbone import load_backbone
    from taskmerge.bench.datasets import load_task, resolve_tasks
    from taskmerge.bench.evaluate import Evaluator
    from taskmerge.bench.finetune import configure_threads, finetune, get_recipe
    from taskmerge.bench.runner import machine_info, sweep_lambda
    from taskmerge.merge import apply_task_vector, merged_task_vector
    from taskmerge.registry import get_method

    t_start = time.perf_counter()
    configure_threads(num_threads)
    names = resolve_tasks(tasks)
    if isinstance(recipe, str):  # a named recipe takes the protocol's head (the runner's rule)
        recipe = get_recipe(recipe, head="zeroshot" if protocol == "v2" else "probe")
    recipe = get_recipe(recipe)
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    data = {n: load_task(n, seed, protocol) for n in names}
    test_counts = {n: len(data[n].test) for n in names}
    checkpoints = {n: finetune(bb, data[n], recipe, cache=cache, progress=progress) for n in names}
    heads = {n: ck.head for n, ck in checkpoints.items()}
    base_sd = bb.state_dict()
    task_sds = [checkpoints[n].state_dict() for n in names]
    ev = Evaluator(bb.model, bb.tokenizer, max_length=recipe.max_length)
    ck_paths = {n: str(ck.path) for n, ck in checkpoints.items()}
    ref = _load_reference(reference, names, recipe, ck_paths, protocol)
    if ref is not None:
        ft_val, ft_test = dict(ref["finetuned"]["val"]), dict(ref["finetuned"]["test"])
        pre_test = dict(ref["pretrained"]["test"])
    else:
        ft_val, ft_test = {}, {}
        for n, sd in zip(names, task_sds):
            ev.load(sd)
            ft_val[n] = ev.accuracy(heads[n], data[n].val)
            ft_test[n] = ev.accuracy(heads[n], data[n].test)
        pre_test = _accuracies(ev, base_sd, heads, data, "test")
    results: dict[str, Any] = {
        "pretrained": _summary(pre_test, ft_test),
        "finetuned": {"test": ft_test, "val": ft_val, "avg_test": mean(list(ft_test.values()))},
        "starts": {},
        "methods": {},
    }
    counts = [data[n].num_classes for n in names]
    s_opts = {k: dict(v) for k, v in (start_options or {}).items()}
    s_opts.setdefault("mda_ta", {}).setdefault("num_classes", counts)
    known = dict(start_lambdas or {})
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    tokenized: dict[str, list[TokenInputs]] = {}
    starts_correct: dict[str, dict[str, np.ndarray]] = {}

    def start(method: str) -> tuple[float, dict[str, torch.Tensor]]:
        if method in vectors:
            return results["starts"][method]["lambda"], vectors[method]
        t0 = time.perf_counter()
        tau = merged_task_vector(base_sd, task_sds, method, s_opts.get(method))
        curve: list[dict[str, Any]] = []
        reused = (ref or {}).get("starts", {}).get(method)
        if reused is not None and (method not in known or float(known[method]) == float(reused["lambda"])):
            results["starts"][method] = {**{k: reused[k] for k in ("test", "normalized_test", "avg_test",
                                                                   "avg_normalized_test", "lambda")},
                                         "options": s_opts.get(method, {}), "val_curve": reused.get("val_curve", []),
                                         "reused_from": str(reference), "seconds": time.perf_counter() - t0}
            vectors[method] = tau
            packed = reused.get("correct_test")
            starts_correct[method] = ({n: unpack_correct(packed[n], len(data[n].test)) for n in names} if packed else
                                      _correct(ev, apply_task_vector(base_sd, tau, float(reused["lambda"])), heads, data))
            results["starts"][method]["correct_test"] = {n: pack_correct(c) for n, c in starts_correct[method].items()}
            return float(reused["lambda"]), tau
        if method in known:
            lam = float(known[method])
        else:
            grid = list((lam_grids or {}).get(method) or get_method(method).lambda_grid or (get_method(method).default_lambda,))

            def score(lam: float) -> tuple[float, dict[str, float]]:
                val = _accuracies(ev, apply_task_vector(base_sd, tau, lam), heads, data, "val")
                return mean([val[n] / ft_val[n] for n in names]), val

            lam, _, curve = sweep_lambda(list(tqdm(grid, desc=f"λ sweep {method}", disable=not progress, leave=False)),
                                         score, patience)
        starts_correct[method] = _correct(ev, apply_task_vector(base_sd, tau, lam), heads, data)
        test = {n: float(c.mean()) for n, c in starts_correct[method].items()}
        results["starts"][method] = {**_summary(test, ft_test), "lambda": lam, "options": s_opts.get(method, {}),
                                     "val_curve": curve, "seconds": time.perf_counter() - t0,
                                     "correct_test": {n: pack_correct(c) for n, c in starts_correct[method].items()}}
        logger.info("start %s: λ=%g test avg %.4f (normalized %.4f)", method, lam,
                    results["starts"][method]["avg_test"], results["starts"][method]["avg_normalized_test"])
        vectors[method] = tau
        return lam, tau

    for cfg in configs:
        method = cfg["method"]
        if method not in DATA_METHODS:
            raise KeyError(f"unknown data-based method {method!r}")
        opts = dict(cfg.get("options") or {})
        parsed = parse_data_options(method, opts)
        smethod = start_method(method, parsed)
        if method == "moma" and parsed.base_options:
            s_opts.setdefault(smethod, dict(parsed.base_options))
        lam, tau = start(smethod)
        if method == "mda_am" and smethod == "mda_ta":
            opts.setdefault("mda_options", s_opts["mda_ta"])
        split = cfg.get("adapt_split", adapt_split)
        if split not in tokenized:  # tokenise each split once for all configurations
            tokenized[split] = _unlabeled(bb.tokenizer, data, split, recipe.max_length)
        res = evaluate_databased(method, backbone=bb, data=data, heads=heads, base_sd=base_sd, task_sds=task_sds,
                                 evaluator=ev, ft_test=ft_test, start_lambda=lam, start_vector=tau, options=opts,
                                 adapt_split=split, max_length=recipe.max_length, progress=progress,
                                 inputs=tokenized[split])
        start_res = results["starts"][smethod]
        res["delta_avg_test"] = res["avg_test"] - start_res["avg_test"]
        res["delta_avg_normalized_test"] = res["avg_normalized_test"] - start_res["avg_normalized_test"]
        mine = {n: unpack_correct(res["correct_test"][n], len(data[n].test)) for n in names}
        res["delta_ci95"] = {  # paired bootstrap over the test examples (same resamples for the row and its start)
            "avg_test": list(paired_bootstrap_diff_ci(mine, starts_correct[smethod], None, n_boot)),
            "avg_normalized_test": list(paired_bootstrap_diff_ci(mine, starts_correct[smethod], dict(ft_test), n_boot))}
        name = cfg.get("name", method)
        if out_dir is not None:
            res["curve"] = write_curve(Path(out_dir) / f"{stem}_curves", name, res)
        results["methods"][name] = res
        logger.info("%s: test avg %.4f (normalized %.4f), Δ vs %s %+.4f", name, res["avg_test"],
                    res["avg_normalized_test"], smethod, res["delta_avg_test"])
        if out_dir is not None:  # write after every configuration, so a long run leaves partial results
            _write(results, names, recipe, bb, seed, t_start, out_dir, stem, machine_info(), ck_paths, protocol,
                   test_counts)
    return _write(results, names, recipe, bb, seed, t_start, out_dir, stem, machine_info(), ck_paths, protocol,
                  test_counts)


def _load_reference(reference: str | Path | None, names: list[str], recipe: Any,
                    ck_paths: Mapping[str, str], protocol: str) -> dict[str, Any] | None:
    """Pretrained / fine-tuned accuracies and data-free starts of an earlier run on the same checkpoints."""
    if reference is None:
        return None
    ref = json.loads(Path(reference).read_text(encoding="utf-8"))
    meta = ref.get("meta", {})
    if meta.get("split_protocol", "v1") != protocol:
        raise ValueError(f"{reference}: split protocol {meta.get('split_protocol', 'v1')}, this run uses {protocol}")
    if list(meta.get("tasks", [])) != list(names) or meta.get("recipe") != recipe.to_dict():
        raise ValueError(f"{reference}: different tasks or recipe")
    if meta.get("checkpoints") and {n: meta["checkpoints"].get(n) for n in names} != dict(ck_paths):
        raise ValueError(f"{reference}: different fine-tuned checkpoints")
    starts = dict(ref.get("starts", {}))
    for m, r in ref.get("methods", {}).items():  # the runner's data-free rows
        if "lambda" in r and "start_method" not in r:
            starts.setdefault(m, r)
    return {"pretrained": ref["pretrained"], "finetuned": ref["finetuned"], "starts": starts}


def _write(results: dict[str, Any], names: list[str], recipe: Any, bb: Any, seed: int, t_start: float,
           out_dir: str | Path | None, stem: str, machine: Mapping[str, Any],
           checkpoints: Mapping[str, str] | None = None, protocol: str = "v2",
           test_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    results["meta"] = {
        "split_protocol": protocol,
        "checkpoints": dict(checkpoints or {}),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": dict(machine),
        "backbone": {"name": bb.name, "identity": bb.identity},
        "recipe": recipe.to_dict(),
        "seed": seed,
        "tasks": names,
        "test_counts": dict(test_counts or {}),  # unpacks the rows' ``correct_test`` (taskmerge.bench.pairwise)
        "seconds": time.perf_counter() - t_start,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown_table(results), encoding="utf-8")
    return results


def combine_results(paths: Sequence[str | Path], out_dir: str | Path | None = None, stem: str = "databased",
                    order: Sequence[str] | None = None, ceiling: str | Path | None = None) -> dict[str, Any]:
    """Merge the JSON outputs of several :func:`run_databased` runs on the same tasks and checkpoints into one
    table (starts and method rows of later files win on name clashes; ``order`` lists method rows first);
    ``ceiling``: a ``scripts/moma_ceiling.py`` JSON of the same benchmark, shown beside each row's share of the
    gap closed (:mod:`taskmerge.databased.gap`)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    if not runs:
        raise ValueError("nothing to combine")
    tasks = runs[0]["meta"]["tasks"]
    for p, r in zip(paths, runs):
        if r["meta"]["tasks"] != tasks or r["meta"]["recipe"] != runs[0]["meta"]["recipe"] \
                or r["meta"].get("split_protocol", "v1") != runs[0]["meta"].get("split_protocol", "v1"):
            raise ValueError(f"{p}: different tasks, recipe or split protocol")
        if r["finetuned"]["test"] != runs[0]["finetuned"]["test"]:
            raise ValueError(f"{p}: different fine-tuned checkpoints")
    out: dict[str, Any] = {"pretrained": runs[0]["pretrained"], "finetuned": runs[0]["finetuned"], "starts": {},
                           "methods": {}}
    for r in runs:
        out["starts"].update(r["starts"])
        out["methods"].update(r["methods"])
    if order:
        out["methods"] = {k: out["methods"][k] for k in [*order, *out["methods"]] if k in out["methods"]}
    out["meta"] = {**runs[-1]["meta"], "seconds": sum(r["meta"]["seconds"] for r in runs),
                   "combined_from": [str(p) for p in paths]}
    if ceiling is not None:
        attach_ceiling(out, json.loads(Path(ceiling).read_text(encoding="utf-8")), str(ceiling))
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        (d / f"{stem}.md").write_text(markdown_table(out), encoding="utf-8")
    return out


def _adapt_cell(r: Mapping[str, Any]) -> str:
    split = r.get("adapt_split", "?")
    frac = r.get("options", {}).get("data_fraction", 1.0)
    share = "" if frac >= 1.0 else f", {100 * frac:g} %"
    return f"{split} ({r.get('protocol', protocol_of(split))}{share})"


def _delta(r: Mapping[str, Any], key: str) -> str:
    """``Δ [low, high]`` in points: the row's change vs its start with its paired-bootstrap 95 % interval
    (:func:`taskmerge.bench.report.diff_cell`, ``*`` when it excludes 0)."""
    ci = (r.get("delta_ci95") or {}).get(key)
    return diff_cell(ci) if ci else f"{100 * r[f'delta_{key}']:+.1f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Absolute and normalised test accuracy per task (pretrained, fine-tuned, data-free starts, data-based
    rows with their protocol), then every run's training record (schedule, seconds per step, convergence)."""
    from taskmerge.bench.runner import SHORT_NAMES

    meta = results["meta"]
    tasks = meta["tasks"]
    cols = [SHORT_NAMES.get(t, t) for t in tasks]
    m = meta["machine"]
    lines = [
        f"# Data-based merging on the taskmerge benchmark: {meta['backbone']['name']}, {len(tasks)} tasks",
        "",
        f"- Date: {meta['date']}; machine: {m.get('platform')}, CPU {m.get('cpu')} ({m.get('cpu_count')} logical CPUs, "
        f"{m.get('torch_threads')} torch threads), torch {m.get('torch')}",
        f"- Recipe: LP-FT {meta['recipe']['kind']}, {meta['recipe']['steps']} steps; split protocol "
        f"{meta.get('split_protocol', 'v1')}; data seed {meta['seed']}; wall time {meta['seconds']:.0f} s",
        "- Data-free starts: λ chosen on validation (average normalised accuracy). Data-based rows start from the "
        "start named in their row at that λ and adapt on the unlabeled texts (labels dropped) of the split in "
        "column *adapt on*: `test` = transductive (the papers' test-time adaptation), `val` = inductive. Column "
        "*labels*: `none`, or the labels a row's variant reads (MDA-AM `class_means=labels`: validation labels). "
        "Δ vs start in points, with its 95 % paired-bootstrap interval over the test examples.",
        "",
        "## Absolute test accuracy (%)",
        "",
        "| Method | start (λ) | adapt on | labels | steps × batch | " + " | ".join(cols) + " | Avg | Δ vs start |",
        "|---|---|---|---|---|" + "---|" * (len(cols) + 2),
    ]
    pre, ft = results["pretrained"], results["finetuned"]
    lines.append("| Pretrained (task heads) | – | – | – | – | " + " | ".join(pct(pre["test"][t]) for t in tasks)
                 + f" | {pct(pre['avg_test'])} | |")
    lines.append("| Fine-tuned (individual) | – | – | – | – | " + " | ".join(pct(ft["test"][t]) for t in tasks)
                 + f" | {pct(ft['avg_test'])} | |")
    for name, r in results["starts"].items():
        lines.append(f"| {name} (data-free) | λ={r['lambda']:g} | – | – | – | "
                     + " | ".join(pct(r["test"][t]) for t in tasks) + f" | {pct(r['avg_test'])} | |")
    for name, r in results["methods"].items():
        o = r["options"]
        lines.append(f"| {name} | {r['start_method']} ({r['start_lambda']:g}) | {_adapt_cell(r)} | "
                     f"{r.get('label_source') or 'none'} | {o['steps']} × {o['batch_size']} | "
                     + " | ".join(pct(r["test"][t]) for t in tasks) + f" | {pct(r['avg_test'])} | {_delta(r, 'avg_test')} |")
    lines += ["", "## Normalized test accuracy (% of the fine-tuned model's accuracy)", "",
              "| Method | adapt on | labels | " + " | ".join(cols) + " | Avg | Δ vs start |",
              "|---|---|---|" + "---|" * (len(cols) + 2)]
    lines.append("| Pretrained (task heads) | – | – | " + " | ".join(pct(pre["normalized_test"][t]) for t in tasks)
                 + f" | {pct(pre['avg_normalized_test'])} | |")
    for name, r in results["starts"].items():
        lines.append(f"| {name} (data-free) | – | – | " + " | ".join(pct(r["normalized_test"][t]) for t in tasks)
                     + f" | {pct(r['avg_normalized_test'])} | |")
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {_adapt_cell(r)} | {r.get('label_source') or 'none'} | "
                     + " | ".join(pct(r["normalized_test"][t]) for t in tasks)
                     + f" | {pct(r['avg_normalized_test'])} | {_delta(r, 'avg_normalized_test')} |")
    lines += ["", "## Training and convergence", "",
              "*still falling*: the least-squares slope of the per-step loss over the last 10 % of steps is below "
              "−2 standard errors (`taskmerge.databased.loop.tail_trend`); *tail Δ*: the fitted change of the loss "
              "across that window, *run Δ*: the window's mean minus the first window's. Curves: "
              "`<stem>_curves/<row>.{json,png}`.", "",
              "| Method | adapt on | steps × batch | s/step | first loss | last loss (10-step mean) | tail Δ | run Δ | "
              "still falling | masking rate | λ range (mean) | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        loss = r["loss"]
        last = mean(loss[-10:]) if loss else float("nan")
        conv = r.get("convergence") or {}
        falling = {True: "**yes**", False: "no", None: "–"}[conv.get("still_falling")]
        lam = r.get("lambda_stats")
        lam_cell = f"[{lam['min']:.3f}, {lam['max']:.3f}] ({lam['mean']:.3f})" if lam else "–"
        mask = r.get("masking_rate")
        notes = []
        if r.get("diagnostics"):
            dg = r["diagnostics"]
            notes.append(f"{r['diagnostics_split']} acc R=I/R_proc/R: "
                         + "/".join(f"{100 * dg[k]:.1f}" for k in ("acc_identity", "acc_procrustes", "acc_learned")))
        o = r["options"]
        lines.append(f"| {name} | {_adapt_cell(r)} | {o['steps']} × {o['batch_size']} | {r['seconds_per_step']:.2f} | "
                     f"{fmt(loss[0] if loss else None, '.4f')} | {fmt(last, '.4f')} | "
                     f"{fmt(conv.get('tail_change'), '+.4f')} | {fmt(conv.get('total_change'), '+.4f')} | {falling} | "
                     f"{'–' if mask is None else f'{100 * mask:.1f} %'} | {lam_cell} | {'; '.join(notes)} |")
    if results["methods"]:
        lines += gap_section(results)
    lines += ["", "Task columns: " + "; ".join(f"{SHORT_NAMES.get(t, t)} = `{t}`" for t in tasks) + "."]
    return "\n".join(lines) + "\n"


def _parse_config(text: str) -> dict[str, Any]:
    """``name=method:key=value,key=value`` (values parsed as YAML; :func:`taskmerge.bench.runner.parse_variant`);
    the key ``adapt_split`` sets the row's split instead of a method option."""
    from taskmerge.bench.runner import parse_variant

    name, (method, options) = parse_variant(text)
    options = dict(options)
    cfg = {"name": name, "method": method}
    if "adapt_split" in options:
        cfg["adapt_split"] = str(options.pop("adapt_split"))
    return {**cfg, "options": options}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m taskmerge.databased.bench --config NAME=METHOD:key=value,... [--config ...]``."""
    p = argparse.ArgumentParser(prog="python -m taskmerge.databased.bench", description=__doc__.splitlines()[0])
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="instead of running: merge the JSON outputs of earlier runs into <out>/<stem>.{json,md}")
    p.add_argument("--ceiling", metavar="JSON", help="with --combine: a scripts/moma_ceiling.py JSON of the same "
                   "benchmark, shown beside each row's share of the gap closed")
    p.add_argument("--config", action="append",
                   help="NAME=METHOD:key=value,... e.g. 'moma-ta=moma:base=task_arithmetic,steps=100' (repeatable)")
    p.add_argument("--tasks", default="8")
    p.add_argument("--recipe", default="full")
    p.add_argument("--start-lambda", action="append", default=[], metavar="METHOD=λ",
                   help="λ of a data-free start already chosen on validation (skips its sweep)")
    p.add_argument("--adapt-split", default="test", choices=["train", "val", "test"],
                   help="split whose texts (labels dropped) the methods adapt on: test = transductive (the papers', "
                        "default), val / train = inductive; a config's adapt_split=... overrides it")
    p.add_argument("--protocol", default="v2", choices=["v1", "v2"], help="benchmark split protocol (as `taskmerge bench`)")
    p.add_argument("--out", default="results")
    p.add_argument("--stem", default="databased")
    p.add_argument("--reference", default=None,
                   help="results JSON of an earlier run (this module's or `taskmerge bench`'s) on the same checkpoints: "
                        "reuse its pretrained / fine-tuned accuracies and data-free starts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ceiling and not args.combine:
        p.error("--ceiling goes with --combine")
    if args.combine:
        print(markdown_table(combine_results(args.combine, args.out, args.stem, ceiling=args.ceiling)))
        return 0
    if not args.config:
        p.error("give --config (or --combine)")
    lams = {k: float(v) for k, v in (s.split("=", 1) for s in args.start_lambda)}
    res = run_databased([_parse_config(c) for c in args.config], tasks=args.tasks, recipe=args.recipe,
                        start_lambdas=lams, adapt_split=args.adapt_split, protocol=args.protocol, out_dir=args.out,
                        stem=args.stem,
                        reference=args.reference,
                        num_threads=args.threads, patience=args.patience, progress=not args.no_progress)
    print(markdown_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
