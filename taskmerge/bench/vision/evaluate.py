"""Per-example correctness of a CLIP image encoder state dict with zero-shot heads on image splits."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from taskmerge.bench.vision.images import ImageSplit, Preprocess, pixel_batches
from taskmerge.bench.vision.zeroshot import PREFIX, CLIPImageEncoder
from taskmerge.databased.loop import head_logits
from taskmerge.errors import CheckpointError

__all__ = ["VisionEvaluator"]


class VisionEvaluator:
    """One copy of the image encoder on ``device``; :meth:`load` swaps the vision tower's weights in,
    :meth:`correct` scores a split with a head.

    Args:
        encoder: the image encoder (copied; the argument is not modified).
        preprocess: CLIP preprocessing of the images.
        device: where the copy runs.
        batch_size: images per forward pass.
        workers: threads decoding and preprocessing images ahead of the forward passes.
    """

    def __init__(self, encoder: CLIPImageEncoder, preprocess: Preprocess, device: torch.device | str = "cpu",
                 batch_size: int = 128, workers: int = 1) -> None:
        self.model = copy.deepcopy(encoder).to(device).eval()
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.workers = workers
        self.keys = frozenset(k for k in self.model.state_dict() if k.startswith(PREFIX))

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a vision-tower state dict (``vision_model.*``, every tensor)."""
        missing = sorted(self.keys - set(state_dict))
        extra = sorted(set(state_dict) - self.keys)
        if missing or extra:
            bad = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
            raise CheckpointError(f"encoder state dict does not fit the CLIP vision tower: {bad} "
                                  f"({len(missing)} missing, {len(extra)} unexpected)")
        self.model.load_state_dict(dict(state_dict), strict=False)

    @torch.no_grad()
    def features(self, split: ImageSplit) -> torch.Tensor:
        """Normalised image features ``(N, d)`` of the whole split, float32 on the CPU."""
        rows = [self.model(pixels.to(self.device)).float().cpu()
                for _, pixels in pixel_batches(split, self.preprocess, self.batch_size, self.workers)]
        return torch.cat(rows)

    def correct(self, head: object, split: ImageSplit) -> torch.Tensor:
        """Whether the head's top class is the label, per example (bool, ``(N,)``)."""
        return head_logits(head, self.features(split)).argmax(dim=1) == split.labels
