"""The papers' vision protocol: CLIP ViT-B/32, B/16, L/14 fine-tuned on 8 / 14 / 20 image tasks, merged.

* :mod:`~taskmerge.bench.vision.tasks` — the 20 tasks in the papers' order, class names, prompt templates;
* :mod:`~taskmerge.bench.vision.images` — the on-disk image-folder format, the validation carve, preprocessing;
* :mod:`~taskmerge.bench.vision.loaders` — the one loader (local folders or the Hugging Face hub);
* :mod:`~taskmerge.bench.vision.zeroshot` — CLIP's zero-shot heads and image features;
* :mod:`~taskmerge.bench.vision.evaluate` — per-example correctness of an encoder state dict;
* :mod:`~taskmerge.bench.vision.suite` — everything a run needs, loaded;
* :mod:`~taskmerge.bench.vision.adapt` — the data-based rows (AdaMerging, MDA-AM, MOMA);
* :mod:`~taskmerge.bench.vision.runner` — merge, choose λ on validation, tables
  (``python -m taskmerge.bench.vision``).

Submodules are imported lazily so that ``import taskmerge.bench.vision`` stays cheap and downloads nothing.
"""

from __future__ import annotations
