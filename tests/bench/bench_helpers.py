"""Independent reference computations for the benchmark tests (no code shared with taskmerge.bench)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


@torch.no_grad()
def reference_features(
    model, tokenizer, texts: Sequence[str], max_length: int = 48, normalize: bool = True
) -> torch.Tensor:
    """One text at a time, no padding: mean of the last hidden states over all tokens, then L2 normalisation."""
    model.eval()
    rows = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state[0]
        v = hidden.mean(0)
        if normalize:
            v = v / v.norm()
        rows.append(v)
    return torch.stack(rows)


def reference_accuracy(model, tokenizer, weight: torch.Tensor, bias: torch.Tensor,
                       examples: Sequence[tuple[str, int]], normalize: bool = True) -> float:
    feats = reference_features(model, tokenizer, [t for t, _ in examples], normalize=normalize)
    pred = (feats @ weight.T + bias).argmax(-1)
    return sum(int(p) == y for p, (_, y) in zip(pred.tolist(), examples)) / len(examples)


def load_into(model, state_dict: Mapping[str, torch.Tensor]):
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(dict(state_dict), strict=True)
    return m
