"""MDA-AM reads no label by default; the label-using class means, the ETF classifier and the class means from
mini-batches are explicit options that do what they say (resolved spec MDA.4, App. G.1)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from databased_problems import Problem

from taskmerge.databased import mda_am
from taskmerge.databased.loop import LabeledInputs, TensorInputs, head_logits
from taskmerge.databased.mda_am import etf_targets
from taskmerge.errors import OptionError
from taskmerge.rotation import procrustes

FAST = {"progress": False, "batch_size": 16}


@dataclass(frozen=True)
class TrappedInputs(TensorInputs):
    """Unlabeled inputs that also carry labels, which must never be read."""

    @property
    def labels(self) -> torch.Tensor:
        raise AssertionError("a label was read")


class CountingLabels:
    """Labelled inputs that count how often their labels are read."""

    def __init__(self, inputs: TensorInputs, labels: torch.Tensor) -> None:
        self.inputs, self._labels, self.reads = inputs, labels, 0

    @property
    def labels(self) -> torch.Tensor:
        self.reads += 1
        return self._labels


def _labels(p: Problem, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, c, (len(x),), generator=gen) for x, c in zip(p.inputs, p.classes)]


def test_mda_am_reads_no_label_by_default(toy: Problem) -> None:
    trapped = [TrappedInputs(x.data) for x in toy.inputs]
    for opts in ({}, {"pseudo_labels": "expert"}, {"procrustes_means": "full"}, {"classifier": "etf"}):
        res = mda_am(toy.base, toy.tasks, toy.heads, trapped, {**FAST, "steps": 12, "procrustes_every": 5, **opts},
                     encoder=toy.encoder)
        assert res.info["uses_labels"] is False and res.info["options"]["class_means"] == "pseudo"
    with pytest.raises(OptionError, match="class_means"):  # labels given without asking for them: refused
        mda_am(toy.base, toy.tasks, toy.heads, trapped, {**FAST, "steps": 1}, encoder=toy.encoder,
               labeled=[LabeledInputs(x, y) for x, y in zip(toy.inputs, _labels(toy))])
    with pytest.raises(OptionError, match="labelled inputs"):
        mda_am(toy.base, toy.tasks, toy.heads, trapped, {**FAST, "steps": 1, "class_means": "labels"}, encoder=toy.encoder)


def test_label_class_means_variant_uses_the_labels_for_r_proc(toy: Problem) -> None:
    labels = _labels(toy)
    labeled = [CountingLabels(x, y) for x, y in zip(toy.inputs, labels)]
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs,
                 {**FAST, "steps": 1, "class_means": "labels", "init_lambda": 0.4}, encoder=toy.encoder, labeled=labeled)
    assert res.info["uses_labels"] is True and all(x.reads > 0 for x in labeled)
    # the step-0 R_proc: Procrustes of the labelled class means (computed here) onto the ETF targets
    start = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 0, "init_lambda": 0.4},
                   encoder=toy.encoder).state_dict
    targets = etf_targets(toy.heads)
    for t, (x, y) in enumerate(zip(toy.inputs, labels)):
        f = toy.encoder.features(start, x).double()
        f = f / f.norm(dim=1, keepdim=True)
        present = sorted(set(y.tolist()))
        means = torch.stack([f[y == c].mean(0) for c in present])
        expect = procrustes(means, targets[t][present].double())
        torch.testing.assert_close(res.info["procrustes_rotations"][t].double(), expect, atol=1e-5, rtol=0)


def test_etf_classifier_is_the_scaled_etf_rotated(toy: Problem) -> None:
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs,
                 {**FAST, "steps": 20, "classifier": "etf", "rotation_lr": 0.05}, encoder=toy.encoder)
    targets = etf_targets(toy.heads)
    rotations = res.info["rotations"]
    for t, (orig, new) in enumerate(zip(toy.heads, res.heads)):
        s = float(orig.weight.norm(dim=1).mean())
        torch.testing.assert_close(new.weight, s * targets[t] @ rotations[t], atol=1e-5, rtol=0)
        assert torch.equal(new.bias, torch.zeros_like(new.bias))
        torch.testing.assert_close(new.weight.norm(dim=1), torch.full((orig.weight.shape[0],), s), atol=1e-5, rtol=0)
        h = toy.encoder.features(res.state_dict, toy.inputs[t])  # deployed logits = s · M* (R h)
        torch.testing.assert_close(head_logits(new, h), s * (h @ rotations[t].T) @ targets[t].T, atol=1e-5, rtol=0)


def test_class_means_from_the_batches_equal_a_full_pass_when_a_batch_is_everything(toy: Problem) -> None:
    n = len(toy.inputs[0])
    opts = {**FAST, "steps": 2, "batch_size": n, "procrustes_every": 1, "lr": 1e-9, "rotation_lr": 1e-9}
    from_batches = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, opts, encoder=toy.encoder)
    full = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "procrustes_means": "full"}, encoder=toy.encoder)
    torch.testing.assert_close(from_batches.info["procrustes_rotations"], full.info["procrustes_rotations"],
                               atol=1e-4, rtol=0)
    assert float((full.info["procrustes_rotations"] - torch.eye(5)).abs().max()) > 1e-2
