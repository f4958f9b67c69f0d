"""Reading PEFT LoRA adapters against their base, checked against PEFT's own ``merge_and_unload``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from taskmerge.errors import CheckpointError  # noqa: E402
from taskmerge.io import PeftAdapterSource, is_adapter, open_checkpoint  # noqa: E402
from taskmerge.merge import MergeRequest, iter_merged  # noqa: E402

CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=24)
Q0 = "encoder.layer.0.attention.self.query.weight"


def _randomize_trainable(model: torch.nn.Module, seed: int) -> None:
    """PEFT initialises B = 0; give every trainable tensor (A, B, biases, saved modules) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_adapter(base: torch.nn.Module, out: Path, seed: int, safe: bool = True, **lora) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter of ``base`` to ``out``; returns PEFT's merged state dict (merge_and_unload)."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
    _randomize_trainable(model, seed)
    model.save_pretrained(out, safe_serialization=safe)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "rslora": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["key", "intermediate.dense", "output.dense"]),
    "extras": dict(r=3, lora_alpha=6, target_modules=["query", "word_embeddings"], bias="lora_only",
                   modules_to_save=["pooler.dense"], alpha_pattern={"query": 12}),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = BertModel(BertConfig(**CONFIG))
    base.save_pretrained(root / "base")
    merged = {name: make_adapter(base, root / name, seed, **kw) for seed, (name, kw) in enumerate(ADAPTERS.items())}
    merged["bin"] = make_adapter(base, root / "bin", 7, safe=False, r=2, lora_alpha=2, target_modules=["value"])
    return {"root": root, "base": root / "base", "base_sd": load_file(str(root / "base" / "model.safetensors")),
            "merged": merged, "model": base}


def _source(family: dict, name: str) -> PeftAdapterSource:
    src = open_checkpoint(family["root"] / name, base=open_checkpoint(family["base"]))
    assert isinstance(src, PeftAdapterSource)
    return src


@pytest.mark.parametrize("name", [*ADAPTERS, "bin"])
def test_reading_gives_peft_merge_and_unload(family: dict, name: str) -> None:
    src = _source(family, name)
    merged = family["merged"][name]
    assert sorted(src.keys()) == sorted(family["base_sd"])
    changed = 0
    for key in src.keys():
        torch.testing.assert_close(src.get(key), merged[key], rtol=0, atol=1e-7, msg=key)
        changed += not torch.equal(merged[key], family["base_sd"][key])
    assert changed == len(src.adapted()) > 0


@pytest.mark.parametrize("name", [*ADAPTERS, "bin"])
def test_exact_updates_and_factors(family: dict, name: str) -> None:
    src = _source(family, name)
    merged, base = family["merged"][name], family["base_sd"]
    for key in src.keys():
        delta = src.task_update(key, torch.float64)
        torch.testing.assert_close(delta.float(), merged[key] - base[key], rtol=0, atol=1e-6, msg=key)
        f = src.lowrank(key)
        if base[key].ndim != 2:
            assert f is None
        elif key not in src.adapted():
            assert f is not None and f.rank == 0 and not bool(delta.any())
        elif f is not None:
            torch.testing.assert_close(f.dense(torch.float64), delta, rtol=0, atol=1e-12)
            assert f.rank == src.rank(key) == ADAPTERS.get(name, {"r": 2})["r"]


def test_scaling_rslora_and_alpha_pattern(family: dict) -> None:
    plain, rs, extras = (_source(family, n) for n in ("plain", "rslora", "extras"))
    assert plain.lowrank(Q0).scale == 8 / 4
    assert rs.lowrank("encoder.layer.0.attention.self.key.weight").scale == pytest.approx(4 / math.sqrt(2))
    assert extras.lowrank(Q0).scale == 12 / 3  # alpha_pattern {"query": 12}
    emb = extras.lowrank("embeddings.word_embeddings.weight")  # lora_embedding_A/B, ΔW = (B A)ᵀ
    assert emb.shape == (40, 16) and emb.scale == 6 / 3
    # modules_to_save and trained biases replace the base value: not low-rank
    assert extras.lowrank("pooler.dense.weight") is None and extras.rank("pooler.dense.weight") is None
    assert "encoder.layer.1.attention.self.query.bias" in extras.adapted()


def test_engine_uses_the_exact_update_even_for_a_bfloat16_base(family: dict, tmp_path: Path) -> None:
    base_sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in family["base_sd"].items()}
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    base = open_checkpoint(tmp_path / "base.safetensors")
    src = open_checkpoint(family["root"] / "plain", base=base)
    req = MergeRequest.build("task_arithmetic")
    tau = {n: t for n, _, t in iter_merged(base, [src], req) if t is not None}
    exact = _source(family, "plain").task_update(Q0)
    torch.testing.assert_close(tau[Q0], exact, rtol=0, atol=0)  # θ_t − θ₀ in bfloat16 would lose most of it
    assert src.get(Q0).dtype == torch.bfloat16


def test_prefixes_of_the_base_and_of_the_adapter(family: dict, tmp_path: Path) -> None:
    # base saved with a task-model prefix (bert.*) against an adapter trained on the bare encoder
    save_file({f"bert.{k}": v for k, v in family["base_sd"].items()}, str(tmp_path / "prefixed.safetensors"))
    prefixed = open_checkpoint(family["root"] / "plain", base=open_checkpoint(tmp_path / "prefixed.safetensors"))
    torch.testing.assert_close(prefixed.task_update(f"bert.{Q0}"), _source(family, "plain").task_update(Q0))
    # an adapter trained on a task model (bert.* modules, a classifier in modules_to_save) against the bare base
    torch.manual_seed(0)
    task_model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=3))
    task_model.bert.load_state_dict(family["model"].state_dict())
    merged = make_adapter(task_model, tmp_path / "cls", 3, r=2, lora_alpha=4, target_modules=["query"],
                          modules_to_save=["classifier"])
    src = open_checkpoint(tmp_path / "cls", base=open_checkpoint(family["base"]))
    for key in src.keys():
        torch.testing.assert_close(src.get(key), merged[f"bert.{key}"], rtol=0, atol=1e-7)
    assert all(not k.startswith("classifier") for k in src.adapted())  # the head is not in the base: ignored


def test_adapter_needs_its_base(family: dict) -> None:
    assert is_adapter(family["root"] / "plain") and not is_adapter(family["base"])
    with pytest.raises(CheckpointError, match="needs the base model"):
        open_checkpoint(family["root"] / "plain")


def test_adapter_of_another_architecture_is_refused(family: dict, tmp_path: Path) -> None:
    other = BertModel(BertConfig(**{**CONFIG, "hidden_size": 8}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not fit base tensor"):
        open_checkpoint(family["root"] / "plain", base=open_checkpoint(tmp_path / "other"))
    save_file({k: v for k, v in family["base_sd"].items() if "attention.self.value" not in k},
              str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="attention.self.value"):
        open_checkpoint(family["root"] / "plain", base=open_checkpoint(tmp_path / "partial.safetensors"))


def test_dora_and_other_peft_types_are_refused(family: dict, tmp_path: Path) -> None:
    make_adapter(family["model"], tmp_path / "dora", 0, r=2, target_modules=["query"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(tmp_path / "dora", base=family["base"])
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="only LORA"):
        open_checkpoint(tmp_path / "ia3", base=family["base"])
