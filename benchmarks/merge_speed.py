"""Merge speed and peak memory on CLIP ViT-B/32 shapes, side by side with FusionBench.

Every (implementation, method) pair runs in a fresh spawned process that builds the same seeded
task vectors, merges them once and reports wall time and peak RSS (``ru_maxrss``) above the RSS it
had once its inputs existed. When FusionBench (``pip install fusion-bench==0.2.33``) is importable,
its TSV-M, Iso-C, Iso-CTS, TIES (flattened model, global 20 % trim, disjoint mean), task arithmetic
(``task_arithmetic_merge`` on a zero base, as taskmerge gets it; and, as a lower bound, its bare ``state_dict_sum``
of the task vectors, whose θ_t − θ₀ pass is not timed) and weight averaging (``state_dict_avg`` of the models) run on
the same tensors in the same script run; the speed ratio and the
largest per-tensor relative difference ``‖ours − theirs‖_F / ‖theirs‖_F`` are printed. With
``--reference64`` FusionBench's algorithm also runs on the same task vectors in float64, and both float32
outputs are compared with it (which of the two float32 results is closer to the exact one).
Both run with torch's default intra-op threads (taskmerge: ``merged_task_vector``'s default, one tensor at a
time; ``TASKMERGE_BENCH_WORKERS=N`` uses the engine's thread pool instead: with 2 workers TSV-M took 54.7 s against
61.6 s one tensor at a time, ``results/merge_speed_vit_b32_workers2.md``).

    python benchmarks/merge_speed.py                 # 8 tasks, 12 layers, every data-free method
    python benchmarks/merge_speed.py --layers 2 --methods tsv_m iso_c --json out.json
    python benchmarks/merge_speed.py --device cuda --methods tsv_m iso_c iso_cts   # on a GPU machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_scale import cpu_model  # noqa: E402
from vit_shapes import task_vectors  # noqa: E402

FUSIONBENCH_METHODS = ("tsv_m", "iso_c", "iso_cts", "ties", "task_arithmetic", "weight_averaging")
WORKERS = int(os.environ.get("TASKMERGE_BENCH_WORKERS", "1"))
# TIES as FusionBench runs it: one magnitude threshold per task over the flattened model, k = 20 %.
EXTRA_OPTIONS = {"mda_ta": {"num_classes": [10] * 8}, "ties": {"keep": 0.2, "scope": "global"}}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _StateDictModel:
    """What FusionBench's ``task_arithmetic_merge`` reads of a model: ``state_dict`` and ``load_state_dict``."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return self.sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd


def _run_ours(method: str, tvs: list[dict[str, torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    from taskmerge.merge import merged_task_vector
    from taskmerge.selection import TensorPolicy

    zeros = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    options = dict(EXTRA_OPTIONS.get(method, {}))
    if "num_classes" in options:
        options["num_classes"] = options["num_classes"][: len(tvs)]
    # FusionBench treats every 2-D tensor as a matrix: do the same so the outputs are comparable.
    policy = TensorPolicy(exclude=(), matrix_exclude=())
    return merged_task_vector(zeros, tvs, method, options, policy=policy, workers=WORKERS, device=device)


def _run_fusionbench(method: str, tvs: list[dict[str, torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    if method == "tsv_m":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

        return compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[], accelerator=device)
    if method == "ties":
        # FusionBench's TiesMergingAlgorithm: flatten, trim per task to the top 20 %, elect, disjoint merge
        # (its config's default merge_func is "sum"; "mean" is the paper's disjoint mean, which ours computes)
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
        return vector_to_state_dict(ties_merging(flat, reset_thresh=20, merge_func="mean"), tvs[0])
    if method == "task_arithmetic":
        # FusionBench's Task Arithmetic (``task_arithmetic_merge``) on the inputs taskmerge gets: a zero base and
        # the T models, each task vector formed by its state_dict_sub, summed by state_dict_add.
        from fusion_bench.method.task_arithmetic.task_arithmetic import task_arithmetic_merge

        base = _StateDictModel({k: torch.zeros_like(v) for k, v in tvs[0].items()})
        return task_arithmetic_merge(base, [_StateDictModel(tv) for tv in tvs], scaling_factor=1.0).sd
    if method in ("task_arithmetic_sum", "weight_averaging"):
        # its in-place sum over task vectors formed beforehand (not timed: TA's θ_t − θ₀ pass is left out), and
        # its simple average of the models (``simple_average`` on state dicts)
        from fusion_bench.utils.state_dict_arithmetic import state_dict_avg, state_dict_sum

        return (state_dict_sum if method == "task_arithmetic_sum" else state_dict_avg)(tvs)
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts

    if method == "iso_c":
        return iso_c(tvs, accelerator=device, exclude_keys=[])
    return iso_cts(tvs, common_space_fraction=0.8, accelerator=device, exclude_keys=[])


def _child(impl: str, method: str, n_tasks: int, layers: int, seed: int, save: str | None, queue: mp.Queue,
           float64: bool = False, device: str = "cpu") -> None:
    import contextlib
    import io

    torch.set_num_threads(torch.get_num_threads())
    tvs = task_vectors(n_tasks, layers, seed)
    if float64:
        tvs = [{k: v.double() for k, v in tv.items()} for tv in tvs]
    rss0 = _rss_mb()
    run = _run_ours if impl == "taskmerge" else _run_fusionbench
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context is not the merge's time
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
        # Warm-up on the smallest matrix, untimed: imports and first-call set-up are not the merge's time
        # (≈ 1 s of module compilation on a first taskmerge call, against ≈ 1 s for a whole TA merge).
        small = min((k for k, v in tvs[0].items() if v.ndim == 2), key=lambda k: tvs[0][k].numel())
        run(method, [{small: tv[small]} for tv in tvs], device)
        start = time.perf_counter()
        merged = run(method, tvs, device)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if save:
        torch.save({k: (v if float64 else v.float()).cpu() for k, v in merged.items()}, save)
    queue.put({"impl": impl, "method": method, "seconds": elapsed, "peak_rss_mb": peak, "peak_over_inputs_mb": peak - rss0})


def _measure(impl: str, method: str, args: argparse.Namespace, save: str | None, float64: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    device = "cpu" if float64 else args.device  # the float64 reference runs on the CPU
    proc = ctx.Process(target=_child, args=(impl, method, args.tasks, args.layers, args.seed, save, queue, float64,
                                            device))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k, ref in b.items():
        denom = ref.double().norm().item()
        if denom > 0:
            worst = max(worst, (a[k].double() - ref.double()).norm().item() / denom)
    return worst


def main() -> None:
    from taskmerge.registry import list_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=[s.name for s in list_methods() if s.data_free])
    parser.add_argument("--no-fusionbench", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both implementations compute")
    parser.add_argument("--reference64", action="store_true",
                        help="also run FusionBench in float64 and compare both float32 outputs with it")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--md", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()

    have_fb = not args.no_fusionbench and importlib.util.find_spec("fusion_bench") is not None
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            compare = have_fb and method in FUSIONBENCH_METHODS
            ours_path = f"{tmp}/ours-{method}.pt" if compare else None
            row = {"method": method, "ours": _measure("taskmerge", method, args, ours_path)}
            if compare:
                fb_path = f"{tmp}/fb-{method}.pt"
                row["fusionbench"] = _measure("fusionbench", method, args, fb_path)
                row["speedup"] = row["fusionbench"]["seconds"] / row["ours"]["seconds"]
                row["max_rel_diff"] = _max_rel_diff(torch.load(ours_path), torch.load(fb_path))
                if method == "task_arithmetic":  # also its bare sum, given the task vectors (a lower bound)
                    row["fusionbench_sum"] = _measure("fusionbench", "task_arithmetic_sum", args, fb_path)
                    row["speedup_sum"] = row["fusionbench_sum"]["seconds"] / row["ours"]["seconds"]
                if args.reference64:
                    ref_path = f"{tmp}/ref64-{method}.pt"
                    row["reference64_seconds"] = _measure("fusionbench", method, args, ref_path, float64=True)["seconds"]
                    ref = torch.load(ref_path)
                    row["ours_vs_float64"] = _max_rel_diff(torch.load(ours_path), ref)
                    row["fusionbench_vs_float64"] = _max_rel_diff(torch.load(fb_path), ref)
            rows.append(row)
            print(f"  {method}: {row['ours']['seconds']:.2f} s", file=sys.stderr)
    report = {
        "benchmark": "merge_speed", "tasks": args.tasks, "layers": args.layers,
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": mp.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": load_before,
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "fusionbench": have_fb, "workers": WORKERS, "device": args.device, "results": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    print("\n" + table)
    if args.md:
        args.md.write_text(table)


def markdown(report: dict) -> str:
    """The report as a Markdown table with the machine and the run's settings."""
    m = report["machine"]
    where = (f"{m['gpu']} (the merges' algebra), " if report.get("device", "cpu") != "cpu" else "")
    lines = [
        f"CLIP ViT-B/32 shapes, {report['tasks']} tasks, {report['layers']} layers; {where}{m['cpu']}, {m['cpus']} cores, "
        f"torch {m['torch']} ({m['threads']} threads); load average before / after: {m['load_before']} / "
        f"{m['load_after']}. " + (f"taskmerge: thread pool of {report['workers']} workers ({m['threads'] // report['workers'] or 1} "
                                  "intra-op thread(s) each; a tensor that runs alone gets every thread); FusionBench: "
                                  "torch's default intra-op threads." if report.get("workers", 1) > 1 else
                                  "taskmerge: 1 tensor at a time; both with torch's default intra-op threads."),
        "",
        "| method | taskmerge s | peak RSS MB | FusionBench s | FB peak RSS MB | speed-up | max rel diff "
        "| ours vs float64 | FB vs float64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        fb = r.get("fusionbench")
        ref = (f"{r['ours_vs_float64']:.1e} | {r['fusionbench_vs_float64']:.1e} |" if "ours_vs_float64" in r
               else "– | – |")
        lines.append(f"| {r['method']} | {r['ours']['seconds']:.2f} | {r['ours']['peak_rss_mb']:.0f} | "
                     + (f"{fb['seconds']:.2f} | {fb['peak_rss_mb']:.0f} | {r['speedup']:.1f}× | {r['max_rel_diff']:.1e} | "
                        if fb else "– | – | – | – | ") + ref)
        if "fusionbench_sum" in r:
            fs = r["fusionbench_sum"]
            lines.append(f"| {r['method']} vs FB's bare sum of given task vectors | {r['ours']['seconds']:.2f} | "
                         f"{r['ours']['peak_rss_mb']:.0f} | {fs['seconds']:.2f} | {fs['peak_rss_mb']:.0f} | "
                         f"{r['speedup_sum']:.1f}× | – | – | – |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
