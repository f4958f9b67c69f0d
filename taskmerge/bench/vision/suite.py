"""A loaded vision suite: pretrained CLIP, fine-tuned vision towers, validation / test splits, zero-shot heads,
and an evaluator that scores any vision-tower state dict on all of it."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from taskmerge.bench.vision.evaluate import VisionEvaluator
from taskmerge.bench.vision.images import ImageSplit, Preprocess
from taskmerge.bench.vision.loaders import (
    Sources,
    load_clip,
    load_encoder_checkpoint,
    load_task_splits,
    with_local_classnames,
)
from taskmerge.bench.vision.tasks import VisionTask
from taskmerge.bench.vision.zeroshot import CLIPImageEncoder, encoder_state_dict, zeroshot_head
from taskmerge.databased import LinearHead

__all__ = ["Suite", "load_suite"]

logger = logging.getLogger(__name__)


@dataclass
class Suite:
    """Everything a run merges and evaluates.

    Attributes:
        names: the merged tasks, in order (``task_sds[i]`` is ``names[i]``'s fine-tuned tower).
        tasks: name → task (class names possibly replaced by a local ``classnames.txt``).
        heads: name → frozen zero-shot head of the pretrained CLIP.
        val, test: name → validation / test split.
        encoder: the pretrained image encoder (architecture for the data-based methods).
        preprocess: CLIP's image preprocessing.
        base_sd: θ₀, the pretrained ``vision_model.*`` tensors.
        task_sds: the fine-tuned towers (same keys).
        evaluator: scores state dicts on splits.
        sources: where it all came from.
        clip_path: the pretrained CLIP's local folder.
        seconds: loading times by stage.
    """

    names: list[str]
    tasks: dict[str, VisionTask]
    heads: dict[str, LinearHead]
    val: dict[str, ImageSplit]
    test: dict[str, ImageSplit]
    encoder: CLIPImageEncoder
    preprocess: Preprocess
    base_sd: dict[str, torch.Tensor]
    task_sds: list[dict[str, torch.Tensor]]
    evaluator: VisionEvaluator
    sources: Sources
    clip_path: str
    seconds: dict[str, float] = field(default_factory=dict)

    def correct(self, state_dict: Mapping[str, torch.Tensor], split: str,
                heads: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per-example correctness of ``state_dict`` on every task's ``split`` (``"val"`` / ``"test"``), each task
        with its head (``heads``, default the zero-shot ones)."""
        splits = self.val if split == "val" else self.test
        heads = self.heads if heads is None else heads
        self.evaluator.load(state_dict)
        return {n: self.evaluator.correct(heads[n], splits[n]) for n in self.names}


def load_suite(names: Sequence[str], tasks: Mapping[str, VisionTask], sources: Sources, *,
               device: str = "cpu", batch_size: int = 128, workers: int = 1, val_fraction: float = 0.1,
               max_val: int | None = 5000, val_seed: int = 0) -> Suite:
    """Load the suite of tasks ``names`` from ``sources`` (:mod:`taskmerge.bench.vision.loaders`).

    Args:
        names: the merged tasks, in order.
        tasks: the task table (name → :class:`~taskmerge.bench.vision.tasks.VisionTask`).
        sources: where models and data come from.
        device: where the encoder runs for evaluation and the zero-shot heads are computed.
        batch_size: images per forward pass.
        workers: threads decoding images.
        val_fraction, max_val, val_seed: the validation carve (:func:`~taskmerge.bench.vision.images.carve_validation`).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    clip = load_clip(sources)
    encoder = CLIPImageEncoder.from_clip(clip.model)
    base_sd = encoder_state_dict(encoder)
    seconds["load_pretrained"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    task_sds = [load_encoder_checkpoint(sources.checkpoints[n], n, base_sd, sources) for n in names]
    seconds["load_checkpoints"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = {n: with_local_classnames(tasks[n], sources) for n in names}
    val: dict[str, ImageSplit] = {}
    test: dict[str, ImageSplit] = {}
    for n in names:
        val[n], test[n] = load_task_splits(table[n], sources, val_fraction, max_val, val_seed)
        logger.info("%s: %d validation, %d test examples", n, len(val[n]), len(test[n]))
    seconds["index_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_model = clip.model.to(device)
    heads = {n: zeroshot_head(text_model, clip.tokenizer, table[n], device) for n in names}
    clip.model.to("cpu")
    seconds["zeroshot_heads"] = time.perf_counter() - t0

    preprocess = Preprocess(clip.processor)
    evaluator = VisionEvaluator(encoder, preprocess, device, batch_size, workers)
    return Suite(list(names), table, heads, val, test, encoder, preprocess, base_sd, task_sds, evaluator, sources,
                 str(clip.path), seconds)
