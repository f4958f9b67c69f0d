"""Evaluation: mean-pooled encoder features, a task's linear head, accuracy and per-example correctness.

An encoder is evaluated as a *state dict* (``name -> tensor``) loaded into one reusable copy of the backbone
model, so a merged model ``θ₀ + λτ`` never needs a checkpoint on disk. Texts are tokenised once per split
and batched by length (dynamic padding), which keeps a λ sweep cheap.

Features are the attention-mask-weighted mean of the last hidden states, L2-normalised when the head says
so (the default: the heads score normalised features, like CLIP's zero-shot heads). :meth:`Evaluator.correct`
returns which examples a head gets right, from which the runner's bootstrap intervals resample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 48
DEFAULT_EVAL_BATCH = 64


@dataclass
class Head:
    """A task's linear classifier on pooled encoder features: ``logits = W f + b``.

    Heads are built once from the frozen pretrained encoder (zero-shot prompts or a linear probe, see
    :mod:`taskmerge.bench.finetune`), stored next to every checkpoint of the task, and never merged.
    """

    weight: torch.Tensor  # (num_classes, hidden)
    bias: torch.Tensor  # (num_classes,)
    labels: list[str]
    normalize: bool = True

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores of already pooled (and, if required, normalised) features."""
        return features @ self.weight.T + self.bias

    def save(self, path: str | Path) -> None:
        """Write ``weight`` and ``bias`` to a safetensors file; labels and ``normalize`` go in its metadata."""
        from safetensors.torch import save_file

        meta = {"labels": json.dumps(self.labels), "normalize": json.dumps(self.normalize), "pooling": "mean"}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Read a head written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
        return cls(weight, bias, json.loads(meta.get("labels", "[]")), json.loads(meta.get("normalize", "true")))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` (B, T, H) over the positions where ``attention_mask`` (B, T) is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean pooling, then L2 normalisation if ``normalize``."""
    features = mean_pool(hidden, attention_mask)
    return F.normalize(features, dim=-1) if normalize else features


@dataclass
class TokenizedSplit:
    """Token ids of a list of texts (truncated, unpadded) and, per batch, the example indices it holds."""

    ids: list[list[int]]
    batches: list[list[int]]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> TokenizedSplit:
    """Tokenise ``texts`` (truncated to ``max_length``) and group indices into length-sorted batches."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return TokenizedSplit(ids=ids, batches=batches)


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids``, ``attention_mask`` and ``token_type_ids`` tensors."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attention_mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


@torch.no_grad()
def encode(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str] | TokenizedSplit,
    normalize: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_EVAL_BATCH,
) -> torch.Tensor:
    """Pooled features (N, H) of ``texts`` in their original order; the model is put in eval mode."""
    tok = texts if isinstance(texts, TokenizedSplit) else tokenize(tokenizer, texts, max_length, batch_size)
    model.eval()
    out: torch.Tensor | None = None
    for batch in tok.batches:
        inputs = collate([tok.ids[i] for i in batch], tokenizer.pad_token_id)
        hidden = model(**inputs).last_hidden_state
        feats = pool(hidden, inputs["attention_mask"], normalize).float()
        if out is None:
            out = torch.empty(len(tok.ids), feats.shape[-1])
        out[torch.as_tensor(batch)] = feats
    return out if out is not None else torch.empty(0, int(model.config.hidden_size))


def correct_of_logits(logits: torch.Tensor, labels: Sequence[int]) -> np.ndarray:
    """Per row, whether its arg-max equals the label (a boolean array)."""
    if len(labels) == 0:
        return np.zeros(0, dtype=bool)
    return (logits.argmax(-1) == torch.as_tensor(list(labels))).numpy()


def accuracy_of_logits(logits: torch.Tensor, labels: Sequence[int]) -> float:
    """Fraction of rows whose arg-max equals the label."""
    if len(labels) == 0:
        return float("nan")
    return float(correct_of_logits(logits, labels).mean())


def normalized_accuracy(merged: float, finetuned: float) -> float:
    """Normalised accuracy of the TSV/Iso papers: merged accuracy divided by the task's fine-tuned accuracy."""
    if finetuned <= 0:
        raise ValueError(f"fine-tuned accuracy must be positive, got {finetuned}")
    return merged / finetuned


class Evaluator:
    """Accuracy of encoder state dicts on task splits, with one reusable model copy and cached tokenisation.

    Args:
        model: a model of the backbone's architecture (copied; the argument is not modified).
        tokenizer: its tokenizer.
        max_length: truncation length (the fine-tuning length).
        batch_size: evaluation batch size.
    """

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_EVAL_BATCH
    ) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._tokens: dict[str, TokenizedSplit] = {}

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an encoder state dict (all keys of the backbone's state dict) into the evaluation model."""
        missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
        if missing or unexpected:
            raise KeyError(f"state dict does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def _tokenized(self, texts: Sequence[str]) -> TokenizedSplit:
        key = hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()
        if key not in self._tokens:
            self._tokens[key] = tokenize(self.tokenizer, texts, self.max_length, self.batch_size)
        return self._tokens[key]

    def features(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Pooled features of ``texts`` under the currently loaded state dict."""
        return encode(self.model, self.tokenizer, self._tokenized(texts), normalize=normalize)

    def correct(
        self,
        head: Head,
        examples: Sequence[tuple[str, int]],
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Which of ``examples`` ``head`` classifies right (boolean array, example order); ``state_dict`` (if
        given) is loaded first."""
        if state_dict is not None:
            self.load(state_dict)
        texts = [t for t, _ in examples]
        labels = [y for _, y in examples]
        return correct_of_logits(head.logits(self.features(texts, head.normalize)), labels)

    def accuracy(
        self,
        head: Head,
        examples: Sequence[tuple[str, int]],
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Accuracy of ``head`` on ``examples``; ``state_dict`` (if given) is loaded first."""
        correct = self.correct(head, examples, state_dict)
        return float(correct.mean()) if correct.size else float("nan")


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    state_dict: Mapping[str, torch.Tensor] | None,
    head: Head,
    examples: Sequence[tuple[str, int]],
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_EVAL_BATCH,
) -> float:
    """One-off accuracy of ``state_dict`` (or ``model`` as it is, if ``None``) with ``head`` on ``examples``."""
    return Evaluator(model, tokenizer, max_length, batch_size).accuracy(head, examples, state_dict)
