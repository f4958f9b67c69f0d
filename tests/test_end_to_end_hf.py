"""End to end: tiny Hugging Face models saved to folders, merged through the CLI with every data-free
method, loaded back with ``transformers.AutoModel``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from taskmerge.cli import main
from taskmerge.registry import list_methods

# Options a method needs beyond its defaults on these tiny models.
EXTRA_OPTIONS: dict[str, list[str]] = {"mda_ta": ["-o", "num_classes=[3, 4]"]}


def _tiny_bert() -> BertModel:
    return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=24))


def _tiny_clip() -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=8))


def _save_family(root: Path, make, n_tasks: int = 2) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    model = make()
    model.save_pretrained(root / "base")
    paths = []
    for t in range(n_tasks):
        ft = make()
        ft.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ft.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return root / "base", paths


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("hf")
    return {"bert": _save_family(root / "bert", _tiny_bert), "clip": _save_family(root / "clip", _tiny_clip)}


DATA_FREE = [s.name for s in list_methods() if s.data_free]


@pytest.mark.parametrize("family", ["bert", "clip"])
@pytest.mark.parametrize("method", DATA_FREE)
def test_merge_every_method_and_load_back(families, tmp_path: Path, family: str, method: str) -> None:
    base, models = families[family]
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", method,
               *EXTRA_OPTIONS.get(method, []), "--output", str(out), "--no-progress"])
    assert rc == 0
    assert (out / "config.json").is_file()
    merged = AutoModel.from_pretrained(out)
    expected_cls = BertModel if family == "bert" else CLIPVisionModel
    assert isinstance(merged, expected_cls)
    written = load_file(str(out / "model.safetensors"))
    state = merged.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    # the merge moved the weights away from the base, and the model runs
    base_sd = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(written[k], base_sd[k]) for k in written if k in base_sd)
    with torch.no_grad():
        if family == "bert":
            y = merged(input_ids=torch.tensor([[1, 2, 3, 4]])).last_hidden_state
        else:
            y = merged(pixel_values=torch.randn(1, 3, 16, 16)).last_hidden_state
    assert torch.isfinite(y).all()


def test_sharded_output_loads_back(families, tmp_path: Path) -> None:
    base, models = families["bert"]
    out = tmp_path / "sharded"
    assert main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--output", str(out), "--max-shard-size", "20KB", "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    merged = AutoModel.from_pretrained(out)
    assert isinstance(merged, BertModel)
