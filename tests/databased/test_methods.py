"""AdaMerging, MDA-AM and MOMA on toy MLP encoders and a tiny random BERT (taskmerge.databased)."""

from __future__ import annotations

import pytest
import torch
from databased_problems import Problem, toy_problem

from taskmerge.databased import adamerging, mda_am, moma
from taskmerge.databased.loop import (
    LabeledInputs,
    TensorInputs,
    count_parameters,
    entropy,
    head_logits,
    subset_inputs,
)
from taskmerge.databased.mda_am import etf_targets, mda_task_blocks, rotation_diagnostics
from taskmerge.databased.moma import MaskedMerge
from taskmerge.errors import OptionError
from taskmerge.merge import apply_task_vector, merged_task_vector
from taskmerge.rotation import is_rotation

FAST = {"progress": False, "batch_size": 16}


def _features(p: Problem, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    return p.encoder.features(state, p.inputs[t])


def _mean_entropy(p: Problem, state: dict[str, torch.Tensor]) -> float:
    return sum(float(entropy(head_logits(h, _features(p, state, t))).mean()) for t, h in enumerate(p.heads))


def _close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# -------------------------------------------------------------------------------------------- AdaMerging


def test_adamerging_lowers_entropy(toy: Problem) -> None:
    start = apply_task_vector(toy.base, merged_task_vector(toy.base, toy.tasks, "task_arithmetic"), 0.3)
    res = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 60, "lr": 0.05},
                     encoder=toy.encoder)
    before, after = _mean_entropy(toy, start), _mean_entropy(toy, res.state_dict)
    assert after < 0.8 * before
    assert sum(res.history.loss[-5:]) < sum(res.history.loss[:5])
    lam = torch.tensor(list(res.info["lambdas"].values()))
    assert lam.shape == (4, 3) and float(lam.min()) >= 0 and float(lam.max()) <= 1  # layer-wise, clamped
    encoder_sd, heads = res  # unpacks as (encoder state dict, heads)
    assert heads == toy.heads and set(encoder_sd) == set(toy.base)


def test_adamerging_starts_at_task_arithmetic_and_task_wise(toy: Problem) -> None:
    res = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 0, "init_lambda": 0.4},
                     encoder=toy.encoder)
    ta = apply_task_vector(toy.base, merged_task_vector(toy.base, toy.tasks, "task_arithmetic"), 0.4)
    _close_states(res.state_dict, ta)
    res = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs,
                     {**FAST, "steps": 5, "granularity": "task", "preprocess": "ties"}, encoder=toy.encoder)
    assert list(res.info["lambdas"]) == ["*"] and len(res.info["lambdas"]["*"]) == 3


def test_runs_are_reproducible_given_the_seed(toy: Problem) -> None:
    opts = {**FAST, "steps": 8, "lr": 0.05, "batch_size": 8}
    a = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "seed": 3}, encoder=toy.encoder)
    b = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "seed": 3}, encoder=toy.encoder)
    c = adamerging(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "seed": 4}, encoder=toy.encoder)
    assert a.history.loss == b.history.loss and a.history.loss != c.history.loss
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])
    opts = {**FAST, "steps": 8, "batch_size": 8, "matrix_lr": 0.01}
    m1 = moma(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "seed": 3}, encoder=toy.encoder)
    m2 = moma(toy.base, toy.tasks, toy.heads, toy.inputs, {**opts, "seed": 3}, encoder=toy.encoder)
    assert m1.history.loss == m2.history.loss
    assert all(torch.equal(h1.weight, h2.weight) for h1, h2 in zip(m1.heads, m2.heads))


def test_data_fraction_subsets_are_seeded() -> None:
    x = TensorInputs(torch.arange(100.0).unsqueeze(1))
    a, b = subset_inputs(x, 0.1, 0), subset_inputs(x, 0.1, 0)
    assert len(a) == 10 and torch.equal(a.batch(range(10)), b.batch(range(10)))
    assert subset_inputs(x, 1.0, 0) is x


# ----------------------------------------------------------------------------------------------- MDA-AM


def _labeled(p: Problem) -> list[LabeledInputs]:
    gen = torch.Generator().manual_seed(9)
    return [LabeledInputs(x, torch.randint(0, c, (len(x),), generator=gen)) for x, c in zip(p.inputs, p.classes)]


def test_mda_task_blocks_sum_to_mda_ta(toy: Problem) -> None:
    opts = {"num_classes": toy.classes}
    blocks = mda_task_blocks(toy.base, toy.tasks, opts)
    tau = merged_task_vector(toy.base, toy.tasks, "mda_ta", opts)
    assert set(blocks) == set(tau)
    for name, b in blocks.items():
        torch.testing.assert_close(b.sum(0), tau[name], atol=1e-5, rtol=1e-5)


def test_mda_am_starts_at_mda_ta(toy: Problem) -> None:
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 0, "init_lambda": 0.7},
                 encoder=toy.encoder)
    tau = merged_task_vector(toy.base, toy.tasks, "mda_ta", {"num_classes": toy.classes})
    _close_states(res.state_dict, apply_task_vector(toy.base, tau, 0.7))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(res.heads, toy.heads))


@pytest.mark.parametrize("granularity", ["layer", "task_layer"])
def test_mda_am_rotations_stay_in_so_d_and_absorb_into_heads(toy: Problem, granularity: str) -> None:
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs,
                 {**FAST, "steps": 30, "rotation_lr": 0.05, "lr": 0.02, "procrustes_every": 10,
                  "granularity": granularity}, encoder=toy.encoder)
    rotations = res.info["rotations"]
    assert min(res.info["rotation_distance_to_identity"]) > 1e-2  # they did move
    assert is_rotation(rotations, 1e-5)  # RᵀR = I, det R = +1
    assert is_rotation(res.info["procrustes_rotations"], 1e-5)
    for t, (old, new) in enumerate(zip(toy.heads, res.heads)):
        h = _features(toy, res.state_dict, t)
        torch.testing.assert_close(head_logits(new, h), head_logits(old, h @ rotations[t].T), atol=1e-5, rtol=0)
    assert res.history.parts["rotation"][-1] < res.history.parts["rotation"][0] + 1e-9
    # diagnostics on held-out labelled data: the learned-R accuracy is the deployed heads' accuracy
    held_out = _labeled(toy)
    diag = rotation_diagnostics(toy.encoder, res.state_dict, res.info["classifier_heads"], rotations,
                                res.info["procrustes_rotations"], held_out)
    for t, lab in enumerate(held_out):
        pred = head_logits(res.heads[t], toy.encoder.features(res.state_dict, lab.inputs)).argmax(-1)
        assert diag["acc_learned"][t] == pytest.approx(float((pred == lab.labels).float().mean()), abs=1e-12)
        pred = head_logits(toy.heads[t], toy.encoder.features(res.state_dict, lab.inputs)).argmax(-1)
        assert diag["acc_identity"][t] == pytest.approx(float((pred == lab.labels).float().mean()), abs=1e-12)


def test_mda_am_ablations(toy: Problem) -> None:
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 5, "rotation": False},
                 encoder=toy.encoder)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(res.heads, toy.heads))
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs,
                 {**FAST, "steps": 0, "parameter_alignment": False, "init_lambda": 0.3}, encoder=toy.encoder)
    ta = apply_task_vector(toy.base, merged_task_vector(toy.base, toy.tasks, "task_arithmetic"), 0.3)
    _close_states(res.state_dict, ta)
    res = mda_am(toy.base, toy.tasks, toy.heads, toy.inputs,
                 {**FAST, "steps": 3, "pseudo_labels": "expert", "etf_targets": "task_nearest", "init_lambda": "1/T"},
                 encoder=toy.encoder)
    assert is_rotation(res.info["rotations"], 1e-5)


def test_etf_targets_are_simplex_frames(toy: Problem) -> None:
    for mode in ("global_anchored", "global_random"):
        targets = etf_targets(toy.heads, mode)
        frame = torch.cat(targets).double()
        c = frame.shape[0]
        gram = frame @ frame.T
        if frame.shape[1] >= c:
            expected = (c * torch.eye(c, dtype=torch.float64) - 1) / (c - 1)
            torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(frame.norm(dim=1), torch.ones(c, dtype=torch.float64), atol=1e-5, rtol=0)
    for m, c in zip(etf_targets(toy.heads, "task_nearest"), toy.classes):
        g = m.double() @ m.double().T
        torch.testing.assert_close(g, (c * torch.eye(c, dtype=torch.float64) - 1) / (c - 1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- MOMA


def test_moma_absorbed_heads_give_the_aligned_logits(bert: Problem) -> None:
    res = moma(bert.base, bert.tasks, bert.heads, bert.inputs,
               {**FAST, "steps": 6, "matrix_lr": 0.05, "mask_lr": 0.5, "batch_size": 8}, encoder=bert.encoder)
    a = res.info["matrices"]
    assert float((a - torch.eye(16)).abs().max()) > 1e-3  # A_t moved away from I
    for t, (old, new) in enumerate(zip(bert.heads, res.heads)):
        g = _features(bert, res.state_dict, t)
        torch.testing.assert_close(head_logits(new, g), head_logits(old, g @ a[t].T), atol=1e-5, rtol=0)
    assert res.info["masking_rate"] >= 0


def test_moma_deployed_model_has_the_base_architecture_and_size(bert: Problem) -> None:
    from transformers import BertModel

    res = moma(bert.base, bert.tasks, bert.heads, bert.inputs, {**FAST, "steps": 2, "batch_size": 8},
               encoder=bert.encoder)
    assert res.info["parameters"] == count_parameters(bert.base) + sum(h.weight.numel() + h.bias.numel() for h in bert.heads)
    model = BertModel(bert.module.config)
    model.load_state_dict(res.state_dict, strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in bert.module.parameters())
    assert [h.weight.shape for h in res.heads] == [h.weight.shape for h in bert.heads]


def test_moma_mask_absorption_matches_the_functional_forward(bert: Problem) -> None:
    tau = merged_task_vector(bert.base, bert.tasks, "task_arithmetic")
    merge = MaskedMerge(bert.base, tau, 0.4, list(tau), init=0.5)
    with torch.no_grad():
        for s in merge.logits:
            s.normal_()
        functional = merge()
    absorbed = merge.absorbed(bert.base, merge.final_masks("soft"))
    batch = bert.inputs[0].batch(range(8))
    torch.testing.assert_close(bert.encoder(functional, batch), bert.encoder(absorbed, batch), atol=1e-6, rtol=0)
    binary = merge.final_masks(rate=0.3)
    kept = sum(float(m.sum()) for m in binary.values()) / sum(m.numel() for m in binary.values())
    assert kept == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("base", ["weight_averaging", "task_arithmetic", "ties"])
def test_moma_orthogonal_only_starts_from_its_base(toy: Problem, base: str) -> None:
    res = moma(toy.base, toy.tasks, toy.heads, toy.inputs,
               {**FAST, "steps": 0, "base": base, "variant": "orthogonal", "lam": 0.5}, encoder=toy.encoder)
    _close_states(res.state_dict, apply_task_vector(toy.base, merged_task_vector(toy.base, toy.tasks, base), 0.5))
    assert res.info["masking_rate"] == 0.0


def test_moma_variants_and_data_fraction(toy: Problem) -> None:
    for variant in ("moma", "orthogonal", "linear_mask"):
        res = moma(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 10, "variant": variant, "matrix_lr": 0.01},
                   encoder=toy.encoder)
        assert res.history.loss[-1] < res.history.loss[0]
        if variant == "linear_mask":
            assert res.history.parts["ortho"][-1] == 0.0
    res = moma(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 3, "data_fraction": 0.1, "mask_rate": 0.5},
               encoder=toy.encoder)
    assert res.info["deployed_mask_mean"] == pytest.approx(0.5, abs=0.01)
    res = moma(toy.base, toy.tasks, toy.heads, toy.inputs, {**FAST, "steps": 3, "orthogonality": "exp"}, encoder=toy.encoder)
    assert is_rotation(res.info["matrices"], 1e-5)


def test_moma_aligns_features_to_the_fine_tuned_ones() -> None:
    p = toy_problem(seed=1, scale=1.0)
    res = moma(p.base, p.tasks, p.heads, p.inputs, {**FAST, "steps": 80, "matrix_lr": 0.02}, encoder=p.encoder)
    assert res.history.parts["align"][-1] < 0.8 * res.history.parts["align"][0]


def test_bad_inputs_are_rejected(toy: Problem) -> None:
    with pytest.raises(ValueError, match="heads"):
        adamerging(toy.base, toy.tasks, toy.heads[:2], toy.inputs, FAST, encoder=toy.encoder)
    with pytest.raises(OptionError, match="steps"):
        moma(toy.base, toy.tasks, toy.heads, toy.inputs, {"steps": -1}, encoder=toy.encoder)


def test_one_forward_for_all_tasks_equals_one_per_task(bert: Problem) -> None:
    batches = [x.batch(range(5)) for x in bert.inputs]
    joined = bert.encoder.many({}, batches)
    for b, f in zip(batches, joined):
        torch.testing.assert_close(f, bert.encoder({}, b), atol=1e-5, rtol=0)
