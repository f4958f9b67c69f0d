"""CLIP's zero-shot classifier: image features from the (merged) vision encoder, heads from the text encoder.

The papers merge only the image encoder; each task's classifier is CLIP's zero-shot head, built once from the
*pretrained* text encoder and frozen (Radford et al., 2021, §3.1.4; ``task_vectors``'
``build_classification_head``):

    w_c = s · normalize( mean_k normalize( g(template_k(class_c)) ) ),      s = exp(logit_scale)

with ``g`` the text tower followed by the text projection, and the logits of image ``x`` are
``w_c · f(x)`` with ``f(x) = normalize(P_v · pool(ViT(x)))`` (:class:`CLIPImageEncoder`). The scale ``s`` (100
for the released CLIPs) changes no prediction, only the logits' temperature, which the entropy objectives of
the data-based methods see as in the papers.

The merged tensors are those of :func:`encoder_state_dict`: every tensor of the vision tower
(``vision_model.*``); the visual projection ``P_v`` is not fine-tuned by the papers and stays the pretrained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from taskmerge.bench.vision.tasks import VisionTask
from taskmerge.databased import LinearHead

__all__ = ["CLIPImageEncoder", "encoder_state_dict", "text_embeddings", "zeroshot_weights", "zeroshot_head"]

PREFIX = "vision_model."


class CLIPImageEncoder(nn.Module):
    """``f(x) = normalize(P_v · pool(ViT(x)))``: the image side of CLIP's zero-shot classifier.

    Its state dict holds ``vision_model.*`` (the merged tensors) and ``visual_projection.weight``.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    @classmethod
    def from_clip(cls, clip: Any) -> CLIPImageEncoder:
        """The image encoder of a ``transformers.CLIPModel`` (sharing its modules)."""
        return cls(clip.vision_model, clip.visual_projection)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``(B, D)`` of a batch of pixel values ``(B, 3, H, W)``."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)


def encoder_state_dict(encoder: CLIPImageEncoder) -> dict[str, torch.Tensor]:
    """The merged tensors θ₀: every ``vision_model.*`` tensor of the encoder (detached copies, on the CPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items() if k.startswith(PREFIX)}


@torch.no_grad()
def text_embeddings(clip: Any, tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu",
                    batch_size: int = 256) -> torch.Tensor:
    """``g(text)`` = text projection of the text tower's pooled output, ``(len(texts), d)`` float32 on the CPU
    (padded batches, truncated at the text tower's context length)."""
    max_length = int(clip.config.text_config.max_position_embeddings)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        pooled = clip.text_model(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device)).pooler_output
        rows.append(clip.text_projection(pooled).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def zeroshot_weights(clip: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """The zero-shot head ``(C, d)`` of the module docstring: per class, the normalised embeddings of its
    prompts averaged and renormalised, times ``exp(logit_scale)``."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(text_embeddings(clip, tokenizer, texts, device, batch_size), dim=-1)
    per_class = F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
    return per_class * clip.logit_scale.detach().float().exp().cpu()


def zeroshot_head(clip: Any, tokenizer: Any, task: VisionTask, device: torch.device | str = "cpu",
                  batch_size: int = 256) -> LinearHead:
    """Task ``task``'s frozen zero-shot head (no bias)."""
    return LinearHead(zeroshot_weights(clip, tokenizer, task.classnames, task.templates, device, batch_size))
