"""Measure LP-FT training step time and evaluation throughput of MiniLM on this machine, per task.

Usage: python scripts/measure_step_time.py [--steps 12] [--threads N] [--tasks 8]

Prints, per task: mean tokens per training sequence (after truncation to 48); seconds per training step
(batch 16, median after 2 warm-up steps), as wall-clock and as process CPU time (on a busy machine run with
``--threads 1`` and read the CPU time, which other processes barely inflate); seconds for one pass over the
validation split; and the projected fine-tuning time of the suite for the recipe's number of steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from taskmerge.bench.backbone import load_minilm
from taskmerge.bench.datasets import load_task, resolve_tasks
from taskmerge.bench.evaluate import Evaluator, collate, pool
from taskmerge.bench.finetune import RECIPES, batch_order, configure_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tasks", default="8")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    recipe = RECIPES["full"]
    bb = load_minilm()
    ev = Evaluator(bb.model, bb.tokenizer, recipe.max_length)
    total_ft = 0.0
    total_eval = 0.0
    print(f"torch threads: {threads}; recipe steps {recipe.steps}, batch {recipe.batch_size}, "
          f"max length {recipe.max_length}")
    for name in resolve_tasks(args.tasks):
        task = load_task(name)
        ids = bb.tokenizer([t for t, _ in task.train], truncation=True, max_length=recipe.max_length)["input_ids"]
        labels = torch.tensor([y for _, y in task.train])
        model = bb.fresh_model().train()
        head_w = torch.randn(len(task.labels), bb.hidden_size) * 10
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
        times = []
        cpu_times = []
        for step, batch in enumerate(batch_order(len(ids), args.steps + 2, recipe.batch_size, 0)):
            t = time.perf_counter()
            c = time.process_time()
            inputs = collate([ids[i] for i in batch], bb.tokenizer.pad_token_id)
            feats = pool(model(**inputs).last_hidden_state, inputs["attention_mask"], True)
            loss = F.cross_entropy(feats @ head_w.T, labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 2:
                times.append(time.perf_counter() - t)
                cpu_times.append(time.process_time() - c)
        step_s = statistics.median(times)
        cpu_s = statistics.median(cpu_times)
        t = time.perf_counter()
        ev.load(bb.model.state_dict())
        ev.features([t for t, _ in task.val])
        eval_s = time.perf_counter() - t
        total_ft += step_s * recipe.steps
        total_eval += eval_s
        mean_len = sum(len(x) for x in ids) / len(ids)
        print(f"{name:26s} mean tokens {mean_len:5.1f}  step {step_s:.3f} s wall, {cpu_s:.3f} s CPU  "
              f"val pass {eval_s:.2f} s", flush=True)
    print(f"projected fine-tuning time for {recipe.steps} steps/task: {total_ft / 60:.1f} min; "
          f"one validation pass over all tasks: {total_eval:.1f} s")


if __name__ == "__main__":
    main()
