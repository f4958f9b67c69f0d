"""Seconds per optimisation step of the data-based methods, next to the floor of the same batches.

    python benchmarks/databased_step.py                       # MiniLM, the benchmark's 8 tasks
    python benchmarks/databased_step.py --backbone tiny       # tiny random BERT, two toy tasks (seconds)

One step of AdaMerging / MDA-AM / MOMA runs one mini-batch of every task (the methods' default batch: 16,
MOMA 24) through the merged encoder, forward and backward. What the step costs beyond the model's own work
is the loop's overhead. Reported per method: the median (and mean) wall seconds of a step after ``--warmup``
steps, the one-off setup (task vectors, MDA-TA's merge, MOMA's teacher features, …), and the ratio to the
**floor**: the plain forward + backward of the same batches (same sampler seeds) through the encoder with
``torch.func.functional_call``, every weight a leaf that requires a gradient and no merging, in three layouts:

* ``packed`` — the loop's own layout (sequences cut into length chunks, :mod:`taskmerge.databased.encoder`):
  the model's own work for this step, the reference for the ratio;
* ``per_task`` — one forward per task batch (each padded to its longest sequence);
* ``joined`` — all tasks in one forward padded to the step's longest sequence (the layout before the chunks).

The task models are the backbone plus small random updates and the heads random (C_t × d): a step's cost does
not depend on their values. Each method's full run (its default steps) is projected from the median step.
Prints a table and JSON (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from taskmerge.databased import DATA_METHODS, parse_data_options
from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
from taskmerge.databased.loop import LinearHead, TaskSampler, TokenInputs

DEFAULT_TASKS = {"tiny": "toy_letters,toy_length", "minilm": "8"}


def synthetic_tasks(base: dict[str, torch.Tensor], count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` task models: every floating tensor moved by 1e-3 × its standard deviation of Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                scale = 1e-3 * (float(v.float().std()) if v.numel() > 1 else 1.0)
                sd[k] = v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            else:
                sd[k] = v.clone()
        out.append(sd)
    return out


def _joined(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    return {k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1])) for b in batches]) for k in batches[0]}


def floor_seconds(encoder: FunctionalEncoder, base: dict[str, torch.Tensor], inputs: Sequence[TokenInputs],
                  batch_size: int, steps: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of a plain forward + backward of the methods' batches, per layout (module docstring)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in base.items() if v.is_floating_point()}
    samplers = [TaskSampler(len(x), batch_size, seed * 1009 + 17 * t + 1) for t, x in enumerate(inputs)]
    times: dict[str, list[float]] = {"packed": [], "per_task": [], "joined": []}
    for step in range(warmup + steps):
        batches = [x.batch(next(s)) for x, s in zip(inputs, samplers)]
        for layout in times:
            tick = time.perf_counter()
            if layout == "packed":
                feats = torch.cat(encoder.many(leaves, batches))
            elif layout == "per_task":
                feats = torch.cat([encoder(leaves, b) for b in batches])
            else:
                feats = encoder(leaves, _joined(batches))
            feats.square().sum().backward()
            for v in leaves.values():
                v.grad = None
            if step >= warmup:
                times[layout].append(time.perf_counter() - tick)
    return {k: statistics.median(v) for k, v in times.items()}


def method_seconds(method: str, base: dict[str, torch.Tensor], task_sds: Sequence[dict[str, torch.Tensor]],
                   heads: Sequence[Any], inputs: Sequence[TokenInputs], encoder: FunctionalEncoder,
                   steps: int, warmup: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``method`` for ``warmup + steps`` steps with its default options; seconds per step and setup."""
    opts = parse_data_options(method, {**(options or {}), "steps": warmup + steps, "progress": False})
    tick = time.perf_counter()
    result = DATA_METHODS[method].fn(base, task_sds, heads, inputs, opts, encoder=encoder)
    total = time.perf_counter() - tick
    timed = result.history.step_seconds[warmup:]
    return {"batch_size": opts.batch_size, "default_steps": parse_data_options(method, {}).steps,
            "median_step_seconds": statistics.median(timed), "mean_step_seconds": statistics.mean(timed),
            "setup_seconds": total - sum(result.history.step_seconds)}


def measure(backbone: str = "minilm", tasks: str | None = None, methods: Sequence[str] = ("adamerging", "mda_am", "moma"),
            steps: int = 6, warmup: int = 2, split: str = "test", protocol: str = "v2", max_length: int = 48,
            threads: int | None = None, chunk_overhead: float = 64.0) -> dict[str, Any]:
    """Everything the module docstring describes, as a dict."""
    from taskmerge.bench.backbone import load_backbone
    from taskmerge.bench.datasets import load_task, resolve_tasks
    from taskmerge.bench.finetune import configure_threads
    from taskmerge.bench.runner import machine_info

    n_threads = configure_threads(threads)
    bb = load_backbone(backbone)
    names = resolve_tasks(tasks or DEFAULT_TASKS.get(backbone, "8"))
    data = {n: load_task(n, 0, protocol) for n in names}
    inputs = [TokenInputs.from_texts(bb.tokenizer, [t for t, _ in data[n].split(split)], max_length) for n in names]
    base = bb.state_dict()
    task_sds = synthetic_tasks(base, len(names))
    gen = torch.Generator().manual_seed(1)
    heads = [LinearHead(torch.randn(data[n].num_classes, bb.hidden_size, generator=gen), torch.zeros(data[n].num_classes))
             for n in names]
    encoder = FunctionalEncoder(bb.model, base, mean_pool_features(True), chunk_overhead=chunk_overhead)
    rows = {m: method_seconds(m, base, task_sds, heads, inputs, encoder, steps, warmup) for m in methods}
    sizes = sorted({r["batch_size"] for r in rows.values()})
    floors = {bs: floor_seconds(encoder, base, inputs, bs, steps, warmup) for bs in sizes}
    for r in rows.values():
        floor = floors[r["batch_size"]]
        r["floor"] = floor
        r["ratio_to_floor"] = r["median_step_seconds"] / floor["packed"]
        r["projected_run_seconds"] = r["median_step_seconds"] * r["default_steps"] + r["setup_seconds"]
    tokens = [sum(x.lengths()) / len(x) for x in inputs]
    return {"backbone": bb.name, "tasks": names, "split": split, "protocol": protocol, "threads": n_threads,
            "chunk_overhead": chunk_overhead,
            "steps_timed": steps, "warmup": warmup, "mean_tokens_per_input": dict(zip(names, tokens)),
            "machine": machine_info(), "methods": rows,
            "floors": {str(bs): v for bs, v in floors.items()}}


def table(res: dict[str, Any]) -> str:
    """The measurement as a Markdown table."""
    lines = [f"{res['backbone']}, {len(res['tasks'])} tasks, {res['threads']} threads, adapt split {res['split']}",
             "",
             "| method | batch | s/step (median) | mean | setup s | floor packed | floor per task | floor joined | "
             "× floor | projected run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        f = r["floor"]
        lines.append(f"| {name} | {r['batch_size']} | {r['median_step_seconds']:.3f} | {r['mean_step_seconds']:.3f} | "
                     f"{r['setup_seconds']:.1f} | {f['packed']:.3f} | {f['per_task']:.3f} | {f['joined']:.3f} | "
                     f"{r['ratio_to_floor']:.2f} | {r['projected_run_seconds'] / 60:.1f} min ({r['default_steps']} steps) |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--tasks", default=None, help="task count or comma-separated names (default: by backbone)")
    p.add_argument("--methods", default="adamerging,mda_am,moma")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default="v2", choices=["v1", "v2"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk-overhead", type=float, default=64.0,
                   help="cost of one more forward in padded tokens, for the length chunks (FunctionalEncoder's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    res = measure(args.backbone, args.tasks, [m for m in args.methods.split(",") if m], args.steps, args.warmup,
                  args.split, args.protocol, threads=args.threads, chunk_overhead=args.chunk_overhead)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n\n" + table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
