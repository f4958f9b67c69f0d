"""End to end with PEFT LoRA adapters: adapters in through the CLI, merged by every LoRA-relevant method,
and LoRA adapters out, loaded back with ``peft.PeftModel.from_pretrained``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModel, BertConfig, BertModel  # noqa: E402

from taskmerge import linalg  # noqa: E402
from taskmerge.cli import main  # noqa: E402
from taskmerge.io import open_checkpoint  # noqa: E402
from taskmerge.merge import MergeRequest, iter_merged, merge_checkpoints  # noqa: E402

CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=24)
# Three adapters with different ranks and target modules (query: 4 + 3, value: 4 + 2, …).
ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["key", "value", "intermediate.dense"]),
    dict(r=3, lora_alpha=3, target_modules=["query", "output.dense"]),
]
METHODS: dict[str, list[str]] = {
    "task_arithmetic": [],
    "ties": [],
    "tsv_m": [],
    "iso_cts": [],
    "dc_merge": ["-o", "setting=lora", "-o", "lora_rank=4"],
    "knots": [],
}
INPUT = torch.tensor([[1, 5, 7, 2, 9, 3]])


def _randomize_trainable(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora_e2e")
    torch.manual_seed(0)
    base = BertModel(BertConfig(**CONFIG))
    base.save_pretrained(root / "base")
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    adapters, deltas = [], []
    for i, kw in enumerate(ADAPTERS):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
        _randomize_trainable(model, i)
        model.save_pretrained(root / f"adapter{i}")
        merged = model.merge_and_unload().state_dict()
        adapters.append(root / f"adapter{i}")
        deltas.append({k: merged[k] - base_sd[k] for k in base_sd})  # PEFT's own ΔW
    return {"root": root, "base": root / "base", "base_sd": base_sd, "adapters": adapters, "deltas": deltas}


def _cli(*args: str) -> int:
    return main(["merge", *args, "--no-progress"])


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT).last_hidden_state


@pytest.mark.parametrize("method", METHODS)
def test_cli_merges_peft_adapters(family: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / "merged"
    rc = _cli("--base", str(family["base"]), "--models", *map(str, family["adapters"]), "--method", method,
              *METHODS[method], "--output", str(out))
    assert rc == 0
    merged = AutoModel.from_pretrained(out)
    assert isinstance(merged, BertModel)
    state = merged.state_dict()
    base_sd = family["base_sd"]
    adapted = {k for d in family["deltas"] for k, v in d.items() if bool(v.any())}
    assert adapted and all(not torch.equal(state[k], base_sd[k]) for k in adapted)
    for k in base_sd:  # modules no adapter touches keep the base value exactly
        if k not in adapted and k in state:
            assert torch.equal(state[k], base_sd[k]), k
    assert torch.isfinite(_outputs(merged)).all()
    if method == "task_arithmetic":  # θ₀ + λ Σ_t ΔW_t with PEFT's ΔW and the default λ = 0.3
        for k in adapted:
            expected = base_sd[k] + 0.3 * sum(d[k] for d in family["deltas"])
            torch.testing.assert_close(state[k], expected, rtol=0, atol=1e-6)


def test_knots_uses_the_low_rank_route_and_matches_the_dense_one(family: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = linalg.hstack_lowrank_svd
    monkeypatch.setattr(linalg, "hstack_lowrank_svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    base = open_checkpoint(family["base"])
    tasks = [open_checkpoint(a, base=base) for a in family["adapters"]]
    results = {}
    for route in (True, False):
        for merge in ("ties", "dare_ties"):
            req = MergeRequest.build("knots", {"merge": merge, "lowrank": route, "keep": 0.3})
            results[route, merge] = {n: t for n, _, t in iter_merged(base, tasks, req) if t is not None}
    assert calls  # the factors reached the method
    for merge in ("ties", "dare_ties"):
        low, dense = results[True, merge], results[False, merge]
        for name, t in dense.items():
            torch.testing.assert_close(low[name], t, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["task_arithmetic", "knots"])
def test_lora_output_round_trips_through_peft(family: dict, tmp_path: Path, method: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--base", str(family["base"]), "--models", *map(str, family["adapters"]), "--method", method]
    assert _cli(*common, "--output", str(tmp_path / "dense")) == 0
    # every merged update has rank ≤ 7 (the ranks of the adapters touching a module add up to at most 7)
    assert _cli(*common, "--output", str(tmp_path / "lora"), "--output-format", "lora", "--lora-rank", "8") == 0
    printed = capsys.readouterr().out
    assert "max relative truncation error" in printed
    error = float(printed.split("max relative truncation error: ")[1].split()[0])
    assert error < 1e-6
    config = (tmp_path / "lora" / "adapter_config.json").read_text()
    assert '"r": 8' in config and '"lora_alpha": 8' in config
    dense = AutoModel.from_pretrained(tmp_path / "dense")
    lora = PeftModel.from_pretrained(BertModel.from_pretrained(family["base"]), tmp_path / "lora")
    torch.testing.assert_close(_outputs(lora), _outputs(dense), rtol=0, atol=1e-5)
    merged_back = lora.merge_and_unload().state_dict()
    for k, v in dense.state_dict().items():
        torch.testing.assert_close(merged_back[k], v, rtol=0, atol=1e-6, msg=k)


def test_lora_output_reports_truncation(family: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = merge_checkpoints(family["base"], family["adapters"], tmp_path / "r1", "task_arithmetic", progress=False,
                             output_format="lora", lora_rank=1)
    sd = load_file(str(path / "adapter_model.safetensors"))
    assert all(v.shape[0] == 1 for k, v in sd.items() if "lora_A" in k)
    assert _cli("--base", str(family["base"]), "--models", *map(str, family["adapters"]), "--method",
                "task_arithmetic", "--output", str(tmp_path / "r2"), "--output-format", "lora", "--lora-rank", "2") == 0
    error = float(capsys.readouterr().out.split("max relative truncation error: ")[1].split()[0])
    assert 0.05 < error < 1.0
    # a rank-2 adapter of a module touched by one rank-2 adapter only is exact
    lora = PeftModel.from_pretrained(BertModel.from_pretrained(family["base"]), tmp_path / "r2")
    merged = lora.merge_and_unload().state_dict()
    key = "encoder.layer.0.attention.self.key.weight"
    torch.testing.assert_close(merged[key], family["base_sd"][key] + 0.3 * family["deltas"][1][key], rtol=0, atol=1e-6)


def _full_finetunes(root: Path, base: Path) -> list[Path]:
    paths = []
    for t in range(2):
        model = BertModel.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return paths


def test_lora_output_refuses_changed_biases_unless_dropped(family: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    models = _full_finetunes(tmp_path, family["base"])
    args = ["--base", str(family["base"]), "--models", *map(str, models), "--method", "task_arithmetic",
            "--output-format", "lora", "--lora-rank", "4"]
    assert _cli(*args, "--output", str(tmp_path / "refused")) == 2
    assert "--lora-drop-other" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    with caplog.at_level(logging.WARNING):
        assert _cli(*args, "--output", str(tmp_path / "dropped"), "--lora-drop-other") == 0
    assert "dropped" in capsys.readouterr().out
    assert any("cannot be stored in a LoRA adapter" in r.message for r in caplog.records)
    PeftModel.from_pretrained(BertModel.from_pretrained(family["base"]), tmp_path / "dropped")


def test_lora_output_needs_a_rank_and_a_folder(family: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--base", str(family["base"]), "--models", str(family["adapters"][0]), "--method", "task_arithmetic"]
    assert _cli(*args, "--output", str(tmp_path / "x"), "--output-format", "lora") == 2
    assert "lora_rank" in capsys.readouterr().err
    assert _cli(*args, "--output", str(tmp_path / "x.safetensors"), "--output-format", "lora", "--lora-rank", "2") == 2
    assert "folder" in capsys.readouterr().err
