"""LP-FT on a tiny random BERT: head frozen, learning happens, checkpoints cached, reproducible; LoRA format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from bench_helpers import load_into, reference_accuracy, reference_features

from taskmerge.bench import finetune as ft
from taskmerge.bench.datasets import load_task
from taskmerge.bench.evaluate import Head

TINY_RECIPE = ft.Recipe(steps=60, lr=1e-3, batch_size=16, max_length=48, warmup_ratio=0.1, lp_shots=16)


def test_batch_order_epochs_are_permutations() -> None:
    batches = ft.batch_order(n=10, steps=7, batch_size=4, seed=1)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]  # 28 draws = 2 full epochs + 8
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batches == ft.batch_order(10, 7, 4, 1)
    assert batches != ft.batch_order(10, 7, 4, 2)


def test_linear_schedule() -> None:
    total, warm = 10, 2
    values = [ft.linear_schedule(s, total, warm) for s in range(total)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))


def test_logistic_regression_reaches_stationary_point() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    l2 = 1e-2
    w, b = ft.fit_logistic_regression(x, y, 3, l2)
    # independent check of optimality: gradient of the objective at the solution is ~0
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    loss = F.cross_entropy(x.double() @ w64.T + b64, y) + l2 * w64.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w64, b64])
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4


def test_probe_examples_takes_first_shots_per_class() -> None:
    task = load_task("toy_length", 0)
    probe = ft.probe_examples(task, 5)
    assert [sum(1 for _, y in probe if y == c) for c in range(3)] == [5, 5, 5]
    firsts = {c: [e for e in task.train if e[1] == c][:5] for c in range(3)}
    assert sorted(probe) == sorted(e for v in firsts.values() for e in v)
    assert ft.probe_examples(task, None) == task.train


def test_recipe_helpers() -> None:
    assert ft.get_recipe("full") == ft.RECIPES["full"]
    assert ft.get_recipe("lora").kind == "lora"
    assert ft.get_recipe("full", steps=7).steps == 7
    r = ft.get_recipe(ft.RECIPES["full"].to_dict())
    assert r == ft.RECIPES["full"]
    with pytest.raises(ValueError):
        ft.get_recipe("nope")
    with pytest.raises(ValueError):
        ft.Recipe(kind="adapter")


def test_full_finetune_learns_keeps_head_and_caches(tiny, cache, monkeypatch) -> None:
    task = load_task("toy_length", 0)
    ck = ft.finetune(tiny, task, TINY_RECIPE, progress=False)
    assert ck.path.is_dir() and str(ck.path).startswith(str(cache))
    files = {p.name for p in ck.path.iterdir()}
    assert {"model", "head.safetensors", "recipe.json"} <= files
    info = json.loads((ck.path / "recipe.json").read_text())
    assert info["data_manifest_hash"] == task.manifest_hash and info["backbone"]["identity"] == tiny.identity

    # the stored head is the linear probe of the *pretrained* encoder on the first `lp_shots` training examples
    # of each class (recomputed independently here)
    shots = TINY_RECIPE.lp_shots
    probe = [(t, y) for i, (t, y) in enumerate(task.train) if sum(1 for _, z in task.train[:i] if z == y) < shots]
    assert len(probe) == shots * 3
    feats = reference_features(tiny.model, tiny.tokenizer, [t for t, _ in probe])
    lp_info = json.loads(next((cache / "heads" / task.name).glob("*.json")).read_text())
    w, b = ft.fit_logistic_regression(feats, torch.tensor([y for _, y in probe]), 3, lp_info["lp_l2"])
    assert torch.allclose(ck.head.weight, w, atol=1e-3) and torch.allclose(ck.head.bias, b, atol=1e-3)
    y_train = torch.tensor([y for _, y in task.train])
    pre_feats = reference_features(tiny.model, tiny.tokenizer, [t for t, _ in task.train])
    lp_loss = F.cross_entropy(pre_feats @ ck.head.weight.T + ck.head.bias, y_train)

    # the encoder changed, the unused pooler did not
    sd, base = ck.state_dict(), tiny.state_dict()
    assert set(sd) == set(base)
    assert any(not torch.equal(sd[k], base[k]) for k in base if k.startswith("encoder."))
    assert all(torch.equal(sd[k], base[k]) for k in base if k.startswith("pooler."))

    # the saved folder is a plain Hugging Face model
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(str(ck.model_dir))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in sd.items())

    # learning: fine-tuned accuracy on held-out test data is far above chance (1/3), and the training loss
    # with the frozen head (recomputed independently) dropped well below the pretrained encoder's
    tuned = load_into(tiny.model, sd)
    acc = reference_accuracy(tuned, tiny.tokenizer, ck.head.weight, ck.head.bias, task.test)
    assert acc > 0.8, acc
    tuned_feats = reference_features(tuned, tiny.tokenizer, [t for t, _ in task.train])
    tuned_loss = F.cross_entropy(tuned_feats @ ck.head.weight.T + ck.head.bias, y_train)
    assert tuned_loss < 0.5 * lp_loss, (float(tuned_loss), float(lp_loss))

    # cached: a second call does not train
    def boom(*a, **k):
        raise AssertionError("retrained a cached checkpoint")

    monkeypatch.setattr(ft, "train_encoder", boom)
    again = ft.finetune(tiny, task, TINY_RECIPE, progress=False)
    assert again.path == ck.path and torch.equal(again.head.weight, ck.head.weight)


def test_cache_key_tracks_recipe_data_and_backbone(tiny) -> None:
    task0, task1 = load_task("toy_letters", 0), load_task("toy_letters", 1)
    r = TINY_RECIPE
    k = ft.checkpoint_key(r, task0, tiny)
    assert k == ft.checkpoint_key(ft.Recipe(**{**r.to_dict(), "lp_l2_grid": tuple(r.lp_l2_grid),
                                                "lora_targets": tuple(r.lora_targets)}), task0, tiny)
    assert k != ft.checkpoint_key(ft.get_recipe(r, steps=61), task0, tiny)
    assert k != ft.checkpoint_key(r, task1, tiny)
    from taskmerge.bench.backbone import tiny_bert

    assert k != ft.checkpoint_key(r, task0, tiny_bert(seed=1))
    # the head key ignores fine-tuning-only settings, so full and LoRA share one linear probe
    assert ft.head_key(r, task0, tiny) == ft.head_key(ft.get_recipe(r, kind="lora", lr=5e-4), task0, tiny)


def test_finetune_is_reproducible(tiny, tmp_path) -> None:
    task = load_task("toy_letters", 0)
    r = ft.get_recipe(TINY_RECIPE, steps=8)
    a = ft.finetune(tiny, task, r, cache=tmp_path / "a", progress=False).state_dict()
    b = ft.finetune(tiny, task, r, cache=tmp_path / "b", progress=False).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_checkpoint(tiny, cache) -> None:
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    task = load_task("toy_length", 0)
    r = ft.get_recipe("lora", steps=20, lr=5e-3, lora_rank=4, lora_alpha=8)
    ck = ft.finetune(tiny, task, r, progress=False)
    assert ck.adapter_dir is not None and (ck.adapter_dir / "adapter_config.json").exists()
    cfg = json.loads((ck.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"query", "key", "value"}
    adapter = load_file(str(next(ck.adapter_dir.glob("adapter_model.safetensors"))))
    sd, base = ck.state_dict(), tiny.state_dict()
    changed = {k for k in base if not torch.equal(sd[k], base[k])}
    assert changed and all(k.endswith(("query.weight", "key.weight", "value.weight")) for k in changed)
    # merged weight == W0 + (alpha / r) * B @ A, from the adapter file
    key = "encoder.layer.0.attention.self.query.weight"
    a_key = next(k for k in adapter if "layer.0.attention.self.query.lora_A" in k)
    b_key = next(k for k in adapter if "layer.0.attention.self.query.lora_B" in k)
    expect = base[key] + (8 / 4) * adapter[b_key] @ adapter[a_key]
    assert torch.allclose(sd[key], expect, atol=1e-6)
    assert isinstance(ck.head, Head)


# v1 keys computed with the code before zero-shot heads and protocol v2 existed (commit 665f739), for the
# toy_letters v1 splits and a backbone whose weights hash is "minilm-sha"
V1_KEYS = {
    "full": "fd98368b107573742c22b1ad638d7f40901b5943b7319680dc7e54b93ca38b02",
    "lora": "49501f7d7206f94105c24b320504ca02edb45b68733fcb9c847765f927cdbeeb",
    "full_seed1": "ef3f69f6742077d8ee583b77f2f97eb28d92e4bc6281b5b4fe4f6b26aea7481b",
    "head": "5218be0ade95188348e32199826c58aaafadd03dd5891a10e696f0a9f82ba318",
}


def test_v1_cache_keys_unchanged() -> None:
    from types import SimpleNamespace

    bb = SimpleNamespace(identity="minilm-sha")
    task = load_task("toy_letters", 0, "v1")
    full, lora = ft.get_recipe("full", head="probe"), ft.get_recipe("lora", head="probe")
    assert full == ft.Recipe()
    assert ft.checkpoint_key(full, task, bb) == V1_KEYS["full"]
    assert ft.checkpoint_key(lora, task, bb) == V1_KEYS["lora"]
    assert ft.checkpoint_key(ft.get_recipe(full, seed=1), task, bb) == V1_KEYS["full_seed1"]
    assert ft.head_key(full, task, bb) == ft.head_key(lora, task, bb) == V1_KEYS["head"]
    # a v1 recipe.json (no "head" field) reads back as the probe recipe
    assert ft.get_recipe(full.to_dict()) == full and "head" not in full.to_dict()
    # the zero-shot recipes and the v2 data have keys of their own
    assert ft.checkpoint_key(ft.get_recipe("full"), task, bb) != V1_KEYS["full"]
    assert ft.checkpoint_key(full, load_task("toy_letters", 0), bb) != V1_KEYS["full"]


def test_zero_shot_head_is_clip_prompt_ensemble(tiny, cache) -> None:
    task = load_task("toy_length", 0)
    recipe = ft.get_recipe("full", logit_scale=7.0)
    head = ft.task_head(tiny, task, recipe)
    # independent: each prompt embedded alone (mean pool, normalise), averaged per class, renormalised, scaled
    rows = []
    for name in task.class_names:
        e = reference_features(tiny.model, tiny.tokenizer, [t.format(name) for t in task.templates])
        m = e.mean(0)
        rows.append(7.0 * m / m.norm())
    assert torch.allclose(head.weight, torch.stack(rows), atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(3)) and head.normalize
    # cached by a key that holds the prompts: other templates give another head file
    assert ft.task_head(tiny, task, recipe).weight.equal(head.weight)
    assert len(list((cache / "heads" / task.name).glob("*.safetensors"))) == 1
    from dataclasses import replace

    info = replace(task.info, templates=("{}",))
    other = replace(task, info=info)
    assert ft.head_key(recipe, other, tiny) != ft.head_key(recipe, task, tiny)
    with pytest.raises(ValueError, match="normalize"):
        ft.Recipe(head="zeroshot", normalize=False)


def test_finetune_through_frozen_zero_shot_head(tiny, cache) -> None:
    task = load_task("toy_length", 0)
    recipe = ft.get_recipe("full", steps=40, lr=1e-3)
    ck = ft.finetune(tiny, task, recipe, progress=False)
    zs = ft.task_head(tiny, task, recipe)
    assert torch.equal(ck.head.weight, zs.weight)  # the head did not move
    tuned = load_into(tiny.model, ck.state_dict())
    before = reference_accuracy(tiny.model, tiny.tokenizer, zs.weight, zs.bias, task.test)
    after = reference_accuracy(tuned, tiny.tokenizer, zs.weight, zs.bias, task.test)
    assert after > max(before + 0.2, 0.6), (before, after)
    assert ft.Checkpoint.load(ck.path).recipe == recipe
