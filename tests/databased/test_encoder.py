"""The step batches of taskmerge.databased.encoder: length chunks and the compacted vocabulary change no
feature and no gradient (compared with plain per-task forwards over the full merged parameters)."""

from __future__ import annotations

import itertools

import pytest
import torch
from databased_problems import Problem, tiny_bert_problem

from taskmerge.databased.adamerging import CoefficientMerge
from taskmerge.databased.encoder import length_chunks
from taskmerge.databased.loop import task_vectors
from taskmerge.databased.moma import MaskedMerge
from taskmerge.merge import merged_task_vector


def test_length_chunks_is_the_brute_force_optimum() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = sorted(torch.randint(1, 30, (8,), generator=gen).tolist())
        overhead = float(torch.randint(0, 40, (1,), generator=gen))

        def cost(ends: list[int]) -> float:
            starts = [0, *ends[:-1]]
            return sum((e - s) * lengths[e - 1] + overhead for s, e in zip(starts, ends))

        best = min(cost([*c, 8]) for k in range(8) for c in itertools.combinations(range(1, 8), k))
        ends = length_chunks(lengths, overhead)
        assert ends[-1] == 8 and ends == sorted(ends)
        assert cost(ends) == pytest.approx(best)


def _bert_with_pad(pad: int) -> Problem:
    """The tiny BERT problem with padding index ``pad`` (inputs padded with it)."""
    from transformers import BertConfig, BertModel

    from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
    from taskmerge.databased.loop import TokenInputs

    p = tiny_bert_problem(seed=3)
    config = BertConfig(**{**p.module.config.to_dict(), "pad_token_id": pad})
    module = BertModel(config).eval()
    module.load_state_dict(p.base)
    inputs = [TokenInputs(list(x.ids), pad_id=pad) for x in p.inputs]
    return Problem(module, p.base, p.tasks, p.heads, inputs, FunctionalEncoder(module, p.base, mean_pool_features(True)),
                   p.classes)


@pytest.mark.parametrize("pad", [0, 2])
def test_compacted_step_equals_plain_forwards_in_value_and_gradient(pad: int) -> None:
    p = _bert_with_pad(pad)
    assert p.encoder.embedding is not None and p.encoder.embedding[1] == pad
    batches = [x.batch([0, 3, 5, 7, 11, 2]) for x in p.inputs]
    probe = [torch.randn(6, 16, generator=torch.Generator().manual_seed(t)) for t in range(len(batches))]

    def loss_of(feats: list[torch.Tensor]) -> torch.Tensor:
        return sum((f * w).sum() for f, w in zip(feats, probe))

    vectors = task_vectors(p.base, p.tasks)
    ref_merge = CoefficientMerge(p.base, vectors, "layer", 0.4)
    with torch.no_grad():
        ref_merge.lambdas.add_(0.1 * torch.randn(ref_merge.lambdas.shape, generator=torch.Generator().manual_seed(9)))
    merge = CoefficientMerge(p.base, vectors, "layer", 0.0)
    with torch.no_grad():
        merge.lambdas.copy_(ref_merge.lambdas)
    # reference: one plain forward per task batch, the full merged parameter dict
    full = ref_merge()
    ref = [p.encoder(full, b) for b in batches]
    loss_of(ref).backward()
    # the loop's path: length chunks (a low overhead: several chunks) + the compacted embedding table
    p.encoder.chunk_overhead = 2.0
    step = p.encoder.prepare(batches)
    name = p.encoder.embedding[0]
    assert name in step.rows and step.rows[name].numel() < p.base[name].shape[0]
    assert len(step.chunks) > 2
    padded = sum(c["input_ids"].numel() for c in step.chunks)
    assert padded < sum(b["input_ids"].shape[1] for b in batches) * 6  # less padding than one joined batch
    ours = p.encoder.step_features(batches, merge)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    loss_of(ours).backward()
    torch.testing.assert_close(merge.lambdas.grad, ref_merge.lambdas.grad, atol=1e-5, rtol=1e-4)


def test_masked_merge_rows_match_the_full_table() -> None:
    p = tiny_bert_problem(seed=4)
    tau = merged_task_vector(p.base, p.tasks, "task_arithmetic")
    merge = MaskedMerge(p.base, tau, 0.3, list(tau), init=0.5)
    with torch.no_grad():
        for s in merge.logits:
            s.normal_(generator=torch.Generator().manual_seed(1))
    name = p.encoder.embedding[0]
    rows = torch.tensor([0, 5, 9, 17])
    part, full = merge(True, {name: rows}), merge(True)
    torch.testing.assert_close(part[name], full[name][rows], atol=0, rtol=0)
    expected = p.base[name][rows] + 0.3 * torch.sigmoid(merge.logits[merge.masked.index(name)][rows]) * tau[name][rows]
    torch.testing.assert_close(part[name], expected, atol=1e-6, rtol=0)


def test_length_ordered_no_grad_pass_equals_one_example_at_a_time(bert: Problem) -> None:
    x = bert.inputs[0]
    feats = bert.encoder.features({}, x, batch_size=7)
    for i in (0, 4, len(x) - 1):
        torch.testing.assert_close(feats[i], bert.encoder({}, x.batch([i]))[0], atol=2e-6, rtol=0)


def test_tensor_inputs_run_as_one_chunk(toy: Problem) -> None:
    batches = [x.batch(range(4)) for x in toy.inputs]
    step = toy.encoder.prepare(batches)
    assert len(step.chunks) == 1 and step.rows == {} and step.sizes == [4, 4, 4]
    for b, f in zip(batches, toy.encoder.many({}, batches)):
        torch.testing.assert_close(f, toy.encoder({}, b), atol=1e-6, rtol=0)
