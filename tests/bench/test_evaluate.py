"""Evaluation against per-example reference computations (no batching, no padding)."""

from __future__ import annotations

import math

import pytest
import torch
from bench_helpers import load_into, reference_accuracy, reference_features

from taskmerge.bench.datasets import load_task
from taskmerge.bench.evaluate import (
    Evaluator,
    Head,
    evaluate_accuracy,
    mean_pool,
    normalized_accuracy,
    tokenize,
)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mean_pool(hidden, mask)
    assert torch.allclose(out[0], hidden[0, :2].mean(0))
    assert torch.allclose(out[1], hidden[1].mean(0))


def test_normalized_accuracy() -> None:
    assert normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert normalized_accuracy(0.9, 0.9) == 1.0
    with pytest.raises(ValueError):
        normalized_accuracy(0.5, 0.0)


def test_tokenize_batches_cover_every_example_once(tiny) -> None:
    texts = ["a", "abc def", "a b c d e f g", "xy", "hello world"] * 7
    tok = tokenize(tiny.tokenizer, texts, max_length=12, batch_size=8)
    flat = [i for b in tok.batches for i in b]
    assert sorted(flat) == list(range(len(texts)))
    assert all(len(b) <= 8 for b in tok.batches)
    assert max(len(x) for x in tok.ids) <= 12


def test_features_match_unbatched_reference(tiny) -> None:
    texts = [t for t, _ in load_task("toy_length", 0).val]
    ev = Evaluator(tiny.model, tiny.tokenizer, max_length=48, batch_size=16)
    got = ev.features(texts, normalize=True)
    ref = reference_features(tiny.model, tiny.tokenizer, texts)
    assert torch.allclose(got, ref, atol=1e-5)


def test_accuracy_matches_reference_and_loads_state_dict(tiny) -> None:
    task = load_task("toy_length", 0)
    g = torch.Generator().manual_seed(0)
    head = Head(torch.randn(3, tiny.hidden_size, generator=g), torch.randn(3, generator=g), task.labels)
    # a perturbed encoder, given as a state dict
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in tiny.state_dict().items()}
    ev = Evaluator(tiny.model, tiny.tokenizer)
    acc = ev.accuracy(head, task.test, sd)
    ref = reference_accuracy(load_into(tiny.model, sd), tiny.tokenizer, head.weight, head.bias, task.test)
    assert acc == pytest.approx(ref, abs=1e-9)
    # the pretrained weights again: differs from the perturbed result's model and matches its own reference
    acc0 = evaluate_accuracy(tiny.model, tiny.tokenizer, tiny.state_dict(), head, task.test)
    ref0 = reference_accuracy(tiny.model, tiny.tokenizer, head.weight, head.bias, task.test)
    assert acc0 == pytest.approx(ref0, abs=1e-9)
    # the evaluator never modifies the backbone it was built from
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in tiny.state_dict().items())


def test_evaluator_rejects_foreign_state_dict(tiny) -> None:
    ev = Evaluator(tiny.model, tiny.tokenizer)
    sd = tiny.state_dict()
    sd.pop(next(iter(sd)))
    with pytest.raises(KeyError):
        ev.load(sd)


def test_head_roundtrip(tmp_path) -> None:
    head = Head(torch.randn(4, 8), torch.randn(4), ["a", "b", "c", "d"], normalize=False)
    head.save(tmp_path / "h.safetensors")
    back = Head.load(tmp_path / "h.safetensors")
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert back.labels == head.labels and back.normalize is False
    assert not math.isnan(float(back.logits(torch.randn(2, 8)).sum()))


def test_correct_matches_per_example_reference(tiny) -> None:
    task = load_task("toy_letters", 0)
    g = torch.Generator().manual_seed(1)
    head = Head(torch.randn(2, tiny.hidden_size, generator=g), torch.randn(2, generator=g), task.labels)
    ev = Evaluator(tiny.model, tiny.tokenizer, batch_size=7)
    got = ev.correct(head, task.val)
    feats = reference_features(tiny.model, tiny.tokenizer, [t for t, _ in task.val])
    expect = [int((f @ head.weight.T + head.bias).argmax()) == y for f, (_, y) in zip(feats, task.val)]
    assert got.dtype == bool and got.tolist() == expect
    assert ev.accuracy(head, task.val) == pytest.approx(sum(expect) / len(expect))
