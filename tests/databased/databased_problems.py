"""Small merging problems of the data-based tests: a toy MLP and a tiny random BERT, with their fine-tuned copies,
heads and unlabeled inputs (a module of its own, so test files import it by a name no other conftest shares)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
from taskmerge.databased.loop import LinearHead, TensorInputs, TokenInputs


class ToyEncoder(nn.Module):
    """A two-layer MLP whose output is the feature (d = 5)."""

    def __init__(self, din: int = 6, hidden: int = 12, dout: int = 5) -> None:
        super().__init__()
        self.l1 = nn.Linear(din, hidden)
        self.l2 = nn.Linear(hidden, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


@dataclass
class Problem:
    module: nn.Module
    base: dict[str, torch.Tensor]
    tasks: list[dict[str, torch.Tensor]]
    heads: list[Any]
    inputs: list[Any]
    encoder: FunctionalEncoder
    classes: list[int]


def toy_problem(seed: int = 0, classes: tuple[int, ...] = (3, 4, 2), n: int = 48, scale: float = 0.5) -> Problem:
    """Base MLP, task models = base + random updates, random linear heads, Gaussian unlabeled inputs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = ToyEncoder()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tasks = [{k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in classes]
    heads = [LinearHead(torch.randn(c, 5, generator=gen), 0.1 * torch.randn(c, generator=gen)) for c in classes]
    inputs = [TensorInputs(torch.randn(n, 6, generator=gen)) for _ in classes]
    return Problem(module, base, tasks, heads, inputs, FunctionalEncoder(module, base), list(classes))


def tiny_bert_problem(seed: int = 0, classes: tuple[int, ...] = (3, 2), n: int = 24) -> Problem:
    """A tiny random BertModel (from a config), perturbed copies as fine-tuned models, LP-style heads on
    L2-normalised mean-pooled features, random token sequences as unlabeled inputs."""
    from transformers import BertConfig, BertModel

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    module = BertModel(config).eval()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tasks = [{k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
              for k, v in base.items()} for _ in classes]
    heads = [LinearHead(torch.randn(c, 16, generator=gen), torch.zeros(c)) for c in classes]
    inputs = []
    for _ in classes:
        ids = [torch.randint(5, 40, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
        inputs.append(TokenInputs([[2, *x, 3] for x in ids], pad_id=0))
    encoder = FunctionalEncoder(module, base, mean_pool_features(True))
    return Problem(module, base, tasks, heads, inputs, encoder, list(classes))
