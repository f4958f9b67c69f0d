"""Combine benchmark results of the same configuration run with different fine-tuning seeds into one table.

A three-seed table costs three fine-tuning rounds and three sweeps; when a one-seed table already exists, only the
new seeds need to run::

    taskmerge bench --tasks 8 --patience 3                         # seed 0 (the main job)
    taskmerge bench --tasks 8 --patience 3 --seeds 1,2 --stem s12  # seeds 1 and 2
    python -m taskmerge.bench.combine results/bench_minilm_v2_full_8tasks.json results/s12.json \\
        --out results --stem bench_minilm_v2_full_8tasks_seeds012

The result is what ``--seeds 0,1,2`` writes in one run: the first seed's rows at the top level, every seed's
rows under ``seed_runs`` and the mean ± sd of every average under ``across_seeds``. The inputs must agree on
everything but the fine-tuning seed (backbone, recipe, protocol, heads, data seed and splits, tasks, methods,
sweep protocol, bootstrap size, the λ grid of each method they share); a difference is an error
naming the field and the files. The later seeds may run fewer methods (``--methods``): the first input's rows
are all kept (its paired differences too), and the mean ± sd covers the rows present in every seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskmerge.bench.runner import markdown_report, seed_results
from taskmerge.errors import OptionError

logger = logging.getLogger(__name__)

SEED_RUN_KEYS: tuple[str, ...] = ("pretrained", "finetuned", "methods", "checkpoints")


def _config(results: Mapping[str, Any]) -> dict[str, Any]:
    """The fields two results must share to be seeds of one table."""
    meta = results["meta"]
    recipe = {k: v for k, v in meta["recipe"].items() if k != "seed"}
    return {
        "backbone": meta["backbone"]["identity"],
        "recipe (except its seed)": recipe,
        "split_protocol": meta.get("split_protocol"),
        "head": meta.get("head"),
        "data seed": meta.get("seed"),
        "tasks": meta["tasks"],
        "unseen_tasks": meta.get("unseen_tasks", []),
        "protocol": meta["protocol"],
        "n_boot": meta.get("n_boot"),
        "data splits (sha256)": {n: m.get("sha256") for n, m in meta.get("manifests", {}).items()},
    }


def _grids(results: Mapping[str, Any]) -> dict[str, Any]:
    return {n: row.get("grid") for n, row in results["methods"].items()}


def seed_runs(results: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """``{fine-tuning seed: run}`` of one results JSON: its ``seed_runs``, or its top-level rows for one seed."""
    if "seed_runs" in results:
        return {int(s): dict(r) for s, r in results["seed_runs"].items()}
    seed = int(results["meta"].get("finetune_seeds", [results["meta"]["recipe"]["seed"]])[0])
    run = {k: results[k] for k in ("pretrained", "finetuned", "methods")}
    run["checkpoints"] = results["meta"].get("checkpoints", {})
    return {seed: run}


def combine(results: Sequence[Mapping[str, Any]], sources: Sequence[str] | None = None) -> dict[str, Any]:
    """One results dict holding the seed runs of ``results`` (in order), with the mean ± sd across seeds.

    Raises:
        OptionError: fewer than two inputs, a configuration field that differs (named, with the files), or a
            fine-tuning seed present in two inputs.
    """
    if len(results) < 2:
        raise OptionError("combine: expected at least two results to combine")
    sources = list(sources) if sources is not None else [f"input {i + 1}" for i in range(len(results))]
    ref = _config(results[0])
    for res, src in zip(results[1:], sources[1:]):
        cfg = _config(res)
        for key, value in ref.items():
            if cfg[key] != value:
                raise OptionError(f"combine: {src} differs from {sources[0]} in {key}: {cfg[key]!r} vs {value!r}")
        first_grids, grids = _grids(results[0]), _grids(res)
        for name in set(first_grids) & set(grids):
            if grids[name] != first_grids[name]:
                raise OptionError(f"combine: {src} differs from {sources[0]} in the λ grid of {name}: "
                                  f"{grids[name]} vs {first_grids[name]}")
    runs: dict[int, dict[str, Any]] = {}
    owner: dict[int, str] = {}
    for res, src in zip(results, sources):
        for seed, run in seed_runs(res).items():
            if seed in runs:
                raise OptionError(f"combine: fine-tuning seed {seed} is in both {owner[seed]} and {src}")
            runs[seed], owner[seed] = {k: run[k] for k in SEED_RUN_KEYS if k in run}, src
    seeds = list(runs)
    if not set.intersection(*(set(r["methods"]) for r in runs.values())):
        raise OptionError(f"combine: no method row is in every input ({', '.join(sources)})")
    combined = seed_results(runs, seeds)
    meta = json.loads(json.dumps(results[0]["meta"]))
    seed_timings: dict[str, Any] = {}
    for res in results:
        seed_timings.update(res["meta"].get("seed_timings_seconds", {}))
    meta.update({
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": {**meta["recipe"], "seed": seeds[0]},
        "finetune_seeds": seeds,
        "seed_timings_seconds": seed_timings,
        "timings_seconds": {"total": sum(float(r["meta"]["timings_seconds"]["total"]) for r in results)},
        "combined_from": [{"source": src, "date": r["meta"].get("date"), "finetune_seeds": list(seed_runs(r)),
                           "machine": r["meta"].get("machine"), "wall_seconds": r["meta"]["timings_seconds"]["total"]}
                          for r, src in zip(results, sources)],
    })
    meta.pop("outputs", None)
    combined["meta"] = meta
    return combined


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m taskmerge.bench.combine A.json B.json [...] --out DIR --stem STEM``."""
    p = argparse.ArgumentParser(prog="python -m taskmerge.bench.combine", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="results JSONs written by the benchmark")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--stem", required=True, help="output file stem")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = []
    for path in args.inputs:
        try:
            loaded.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {path}: cannot read a results JSON ({exc})") from None
    try:
        combined = combine(loaded, args.inputs)
    except OptionError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(combined, indent=2) + "\n", encoding="utf-8")
    (out / f"{args.stem}.md").write_text(markdown_report(combined), encoding="utf-8")
    logger.info("wrote %s/%s.{json,md}", out, args.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
