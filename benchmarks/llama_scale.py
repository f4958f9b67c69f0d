"""Merge time and peak RSS on a LLaMA-shaped sharded checkpoint, side by side with MergeKit.

Generates a base and T fine-tunes with LLaMA shapes (bfloat16 safetensors shards, see
``llama_shapes.py``), then runs every merge as its own command-line process, as a user would:
``taskmerge merge`` for task arithmetic, TIES, DARE, TSV-M, Iso-C and DC-Merge, and ``mergekit-yaml`` on
the same folders for task arithmetic, TIES and DARE when MergeKit is given. Each process's wall time
and peak resident set (``ru_maxrss`` from ``wait4``, the same figure as ``/usr/bin/time -v``'s "Maximum
resident set size") are recorded with the load average before and after it; the inputs are read once
before the timed runs so that every run starts from the same page cache. For the methods both tools
run, the largest relative difference ``‖ours − theirs‖_F / ‖theirs‖_F`` over a few tensors is reported
(DARE is random: not compared).

The ``io_floor`` row times the least any merge of these files does (read every input tensor, write the output
once, with taskmerge's readers and writer); ``tsv_m_certified`` / ``dc_merge_certified`` are TSV-M and DC-Merge with
``svd: certified``, and every SVD row's accuracy is checked on three sample matrices against the exact route in
float64 (column "vs float64").

    python benchmarks/llama_scale.py --size small                     # ~100M parameters, for development
    python benchmarks/llama_scale.py --size 1b --root /tmp/llama1b \\
        --mergekit /tmp/mkvenv/bin/mergekit-yaml --json results/llama_scale.json --md results/llama_scale.md

MergeKit runs in its own environment (``python -m venv --system-site-packages``, ``pip install -c
constraints.txt mergekit`` with ``torch==2.13.0`` pinned) so that it cannot change taskmerge's torch.
Both merge every tensor for TA / TIES / DARE (``--exclude '^$'``: MergeKit has no head exclusion);
TSV-M, Iso-C and DC-Merge use taskmerge's default policy (``lm_head`` kept, embeddings averaged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import PRESETS, n_params, write_family  # noqa: E402

from taskmerge.executors import default_workers  # noqa: E402

# method → (taskmerge CLI arguments, MergeKit merge_method and per-model parameters, global parameters)
OURS: dict[str, list[str]] = {
    "task_arithmetic": ["--lambda", "0.3", "--exclude", "^$"],
    "ties": ["--lambda", "1.0", "-o", "keep=0.2", "--exclude", "^$"],
    "ties_global": ["--lambda", "1.0", "-o", "keep=0.2", "-o", "scope=global", "--exclude", "^$"],
    "dare": ["--lambda", "0.3", "-o", "p=0.9", "--exclude", "^$"],
    "tsv_m": [],
    "tsv_m_certified": ["-o", "svd=certified"],
    "iso_c": [],
    "dc_merge": [],
    "dc_merge_certified": ["-o", "svd=certified"],
}
# a row label that is not a method name
METHOD_OF = {"ties_global": "ties", "tsv_m_certified": "tsv_m", "dc_merge_certified": "dc_merge"}
# SVD-based rows whose accuracy is checked on SAMPLE_MATRICES: route of the svd option
SVD_ROWS = {"tsv_m": "exact", "tsv_m_certified": "certified", "dc_merge": "exact", "dc_merge_certified": "certified"}
SAMPLE_MATRICES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                   "model.layers.2.mlp.down_proj.weight")
FLOOR = "io_floor"  # the row of the I/O floor: read every input tensor and write the output once
MERGEKIT: dict[str, tuple[str, dict, dict]] = {
    "task_arithmetic": ("task_arithmetic", {"weight": 0.3}, {"normalize": False}),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "dare": ("dare_linear", {"weight": 0.3, "density": 0.1}, {"normalize": False}),
}
COMPARE = ("task_arithmetic", "ties")
COMPARED_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                    "model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


TIMEOUT_S = 3600.0


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (wait4's ru_maxrss), CPU times and load averages."""
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        timer = threading.Timer(TIMEOUT_S, proc.kill)
        timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    result = {"started": started, "seconds": round(seconds, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "exit": proc.returncode,
              "cpu_user_s": round(ru.ru_utime, 1), "cpu_sys_s": round(ru.ru_stime, 1),
              "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}
    if proc.returncode != 0:
        result["log_tail"] = log.read_text()[-2000:]
    return result


def _warm(paths: list[Path]) -> None:
    """Read every input file once (same page-cache state for every timed run)."""
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def run_ours(method: str, base: Path, models: list[Path], out: Path, log: Path, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "taskmerge.cli", "merge", "--base", str(base), "--models", *map(str, models),
           "--method", METHOD_OF.get(method, method), "--output", str(out), "--overwrite", "--no-progress", *OURS[method]]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return measure(cmd, log)


def io_floor(output: Path, base: Path, models: list[Path]) -> None:
    """The I/O floor of a merge: read every tensor of the base and of every model with the engine's readers
    (``pread``, :mod:`taskmerge.io.streaming`), write the base's tensors once as the output with its writer."""
    from taskmerge.io.readers import open_checkpoint
    from taskmerge.io.streaming import streaming_source
    from taskmerge.io.writers import CheckpointWriter

    base_reader = streaming_source(open_checkpoint(base))
    readers = [streaming_source(open_checkpoint(m, base=base_reader)) for m in models]
    names = base_reader.keys()
    with CheckpointWriter(output, overwrite=True, copy_from=base) as writer:
        writer.plan([(n, *base_reader.meta(n)) for n in names])
        for name in names:
            value = base_reader.get(name)
            for r in readers:
                r.get(name)
            writer.add(name, value)
        writer.commit()


def run_floor(base: Path, models: list[Path], out: Path, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-run", str(out), str(base), *map(str, models)]
    return measure(cmd, log)


def svd_accuracy(row: str, base: Path, models: list[Path]) -> float:
    """The largest ``‖x − ref‖ / ‖ref‖`` over :data:`SAMPLE_MATRICES` of an SVD row's merged update (float32, its
    ``svd`` route) against the exact route in float64 (the per-layer function on the same task updates)."""
    from taskmerge.io.readers import open_checkpoint
    from taskmerge.registry import LayerContext, get_method

    spec = get_method(METHOD_OF.get(row, row))
    base_reader = open_checkpoint(base)
    readers = [open_checkpoint(m, base=base_reader) for m in models]
    worst = 0.0
    for name in SAMPLE_MATRICES:
        theta0 = base_reader.get(name).double()
        deltas = torch.stack([r.get(name).double() - theta0 for r in readers])
        ctx = LayerContext(name)
        got = spec.fn(deltas.float(), spec.parse({"svd": SVD_ROWS[row]}), ctx).double()
        ref = spec.fn(deltas, spec.parse({"svd": "exact"}), ctx)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return worst


def run_mergekit(exe: str, method: str, base: Path, models: list[Path], out: Path, log: Path) -> dict:
    merge_method, params, global_params = MERGEKIT[method]
    config = {"merge_method": merge_method, "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(m), "parameters": dict(params)} for m in models],
              "parameters": global_params}
    cfg = out.with_suffix(".yml")
    cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
    cmd = [exe, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0"]
    return measure(cmd, log)


def _max_rel_diff(ours: Path, theirs: Path, base: dict[str, torch.Tensor]) -> float:
    """max over :data:`COMPARED_TENSORS` of ``‖ours − theirs‖ / ‖theirs − θ₀‖`` (relative to the merged update)."""
    from taskmerge.io.readers import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    worst = 0.0
    for name in COMPARED_TENSORS:
        x, y = a.get(name).double(), b.get(name).double()
        worst = max(worst, (x - y).norm().item() / max((y - base[name]).norm().item(), 1e-30))
    return worst


def combine(paths: list[Path], json_out: Path | None, md_out: Path | None) -> None:
    """One report from several invocations on the same files: every row, labelled with its invocation."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = dict(reports[-1])
    merged["runs"] = [dict(r, report=p.stem) for p, rep in zip(paths, reports) for r in rep["runs"]]
    merged["combined_from"] = [{"file": p.name, "load_average_at_end": r["load_average_at_end"],
                                "taskmerge_workers": r.get("taskmerge_workers")} for p, r in zip(paths, reports)]
    args = argparse.Namespace(json=json_out, md=md_out)
    _write(args, merged, final=all(r.get("complete") for r in reports))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/taskmerge-llama-scale"),
                        help="where the checkpoints are generated (needs (T + 3) × model size of free disk)")
    parser.add_argument("--methods", nargs="+", default=list(OURS), help=f"rows: {', '.join(OURS)}, {FLOOR}")
    parser.add_argument("--mergekit", help="path of mergekit-yaml (its own venv); omitted: MergeKit is not run")
    parser.add_argument("--workers", type=int, help="taskmerge --workers (default: taskmerge's own default)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--reuse-mergekit", type=Path,
                        help="a previous report (JSON) of the same size whose MergeKit runs are taken instead of rerun")
    parser.add_argument("--combine", type=Path, nargs="+", help="only combine these reports into --json / --md")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds before a run is killed")
    parser.add_argument("--floor-run", nargs="+", type=Path, metavar="PATH",
                        help="internal: OUTPUT BASE MODEL...: the I/O floor's process (row io_floor)")
    args = parser.parse_args()
    if args.floor_run:
        io_floor(args.floor_run[0], args.floor_run[1], args.floor_run[2:])
        return
    globals()["TIMEOUT_S"] = args.timeout
    if args.combine:
        combine(args.combine, args.json, args.md)
        return

    shape = PRESETS[args.size]
    root: Path = args.root
    print(f"generating {args.size} ({n_params(shape) / 1e9:.2f}B parameters) × {args.tasks + 1} in {root}", file=sys.stderr)
    t0 = time.perf_counter()
    base, models = write_family(root, shape, args.tasks)
    gen_s = time.perf_counter() - t0
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    _warm([base, *models])
    from taskmerge.io.readers import open_checkpoint

    base_reader = open_checkpoint(base)
    base_tensors = {name: base_reader.get(name).double() for name in COMPARED_TENSORS}

    previous = {}
    if args.reuse_mergekit:
        old = json.loads(args.reuse_mergekit.read_text())
        if old.get("size") == args.size and old.get("tasks") == args.tasks:
            previous = {r["method"]: r for r in old["runs"] if r.get("mergekit", {}).get("exit") == 0}
    runs = []
    outdir = root / "outputs"
    outdir.mkdir(exist_ok=True)
    for method in args.methods:
        row: dict = {"method": method}
        order = ["mergekit", "taskmerge"] if len(runs) % 2 else ["taskmerge", "mergekit"]
        for impl in order:
            out = outdir / f"{impl}-{method}"
            if impl == "taskmerge" and method == FLOOR:
                print("  I/O floor ...", file=sys.stderr)
                row["taskmerge"] = run_floor(base, models, out, outdir / f"{impl}-{method}.log")
            elif impl == "taskmerge":
                print(f"  taskmerge {method} ...", file=sys.stderr)
                row["taskmerge"] = run_ours(method, base, models, out, outdir / f"{impl}-{method}.log", args.workers)
            elif args.mergekit and method in previous:  # MergeKit's run and the output comparison, taken over
                row["mergekit"] = dict(previous[method]["mergekit"], reused=True)
                if "max_rel_diff" in previous[method]:
                    row["max_rel_diff"] = previous[method]["max_rel_diff"]
            elif args.mergekit and method in MERGEKIT:
                print(f"  mergekit {method} ...", file=sys.stderr)
                row["mergekit"] = run_mergekit(args.mergekit, method, base, models, out, outdir / f"{impl}-{method}.log")
        if "mergekit" in row and row["mergekit"]["exit"] == 0 and row["taskmerge"]["exit"] == 0:
            row["speedup"] = round(row["mergekit"]["seconds"] / row["taskmerge"]["seconds"], 2)
            if method in COMPARE and not row["mergekit"].get("reused"):
                row["max_rel_diff"] = _max_rel_diff(outdir / f"taskmerge-{method}", outdir / f"mergekit-{method}",
                                                    base_tensors)
        for impl in ("taskmerge", "mergekit"):
            shutil.rmtree(outdir / f"{impl}-{method}", ignore_errors=True)
        if method in SVD_ROWS and row["taskmerge"]["exit"] == 0:
            row["vs_float64"] = svd_accuracy(method, base, models)
        runs.append(row)
        print(f"    {json.dumps(row)}", file=sys.stderr)
        _write(args, _report(args, shape, size_gb, gen_s, runs))  # after every method: a partial report survives

    _write(args, _report(args, shape, size_gb, gen_s, runs), final=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _report(args: argparse.Namespace, shape, size_gb: float, gen_s: float, runs: list[dict]) -> dict:
    report = {
        "benchmark": "llama_scale", "size": args.size, "shape": shape.__dict__, "params": n_params(shape),
        "tasks": args.tasks, "checkpoint_gb": round(size_gb, 2), "generate_s": round(gen_s, 1),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "mem_gb": round(_mem_total_gb(), 1), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "taskmerge_workers": args.workers or default_workers(),
        "runs": runs,
    }
    if args.mergekit:
        try:
            mk = subprocess.run([str(Path(args.mergekit).with_name("python")), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True)
            report["mergekit_version"] = mk.stdout.strip()
        except OSError:
            pass
    return report


def _write(args: argparse.Namespace, report: dict, final: bool = False) -> None:
    report["complete"] = final
    text = json.dumps(report, indent=2)
    table = markdown(report)
    if final:
        print(text)
        print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"LLaMA-shaped checkpoint, {report['params'] / 1e9:.2f}B parameters ({report['size']}), bfloat16, "
        f"{report['checkpoint_gb']:.2f} GB per model, T = {report['tasks']} fine-tunes; "
        f"{m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM, torch {m['torch']}"
        + (f", MergeKit {report['mergekit_version']}" if report.get("mergekit_version") else "") + ".",
        "Wall time of the whole command (process start to exit), peak RSS of the process; load average "
        "(1 min) before the run in brackets; * = MergeKit run taken over from an earlier invocation on the same "
        "files (same machine).",
        "",
        "| method | taskmerge s | taskmerge peak RSS GB | MergeKit s | MergeKit peak RSS GB | speed-up | RSS < 4 GB | max rel diff "
        "| vs float64 | vs I/O floor |" + (" run |" if report.get("combined_from") else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if report.get("combined_from") else ""),
    ]
    floors = [r["taskmerge"]["seconds"] for r in report["runs"] if r["method"] == FLOOR and r["taskmerge"]["exit"] == 0]
    for r in report["runs"]:
        ours = r["taskmerge"]
        mk = r.get("mergekit")
        ok = "yes" if ours["exit"] == 0 and ours["peak_rss_mb"] < 4096 else "no"
        cell = (lambda x: f"{x['seconds']:.1f} [{x['load_before'][0]:.1f}]{'*' if x.get('reused') else ''}"
                if x["exit"] == 0 else f"failed ({x['exit']})")
        lines.append(
            f"| {r['method']} | {cell(ours)} | {ours['peak_rss_mb'] / 1024:.2f} | "
            + (f"{cell(mk)} | {mk['peak_rss_mb'] / 1024:.2f} | " if mk else "– | – | ")
            + (f"{r['speedup']:.2f}× | " if "speedup" in r else "– | ")
            + f"{ok} | " + (f"{r['max_rel_diff']:.1e} |" if "max_rel_diff" in r else "– |")
            + (f" {r['vs_float64']:.1e} |" if "vs_float64" in r else " – |")
            + (f" {ours['seconds'] / floors[-1]:.2f}× |" if floors and ours["exit"] == 0 and r["method"] != FLOOR
               else " – |")
            + (f" {r.get('report', '')} |" if report.get("combined_from") else "")
        )
    lines.append("")
    lines.append(f"`{FLOOR}`: read every tensor of the base and the fine-tunes and write the base once, with taskmerge's "
                 "own readers and writer (the least any merge of these files does); \"vs I/O floor\" divides by it. "
                 f"\"vs float64\": SVD rows, the per-layer function's merged update in float32 on {', '.join(SAMPLE_MATRICES)} "
                 "against the exact route in float64 (largest ‖x − ref‖ / ‖ref‖).")
    for part in report.get("combined_from", []):
        lines.append(f"Run `{Path(part['file']).stem}`: taskmerge with {part['taskmerge_workers']} worker(s), load average "
                     f"at its end {part['load_average_at_end']}.")
    lines.append(f"taskmerge ran with {report['taskmerge_workers']} worker(s). Load average at the end: "
                 f"{report['load_average_at_end']}." + ("" if report.get("complete", True) else " (partial: an invocation was interrupted or is still running)"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
