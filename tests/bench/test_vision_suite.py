"""The vision suite offline: a tiny random CLIP built here, three tiny fine-tuned towers, three tiny image
datasets in the loader's folder format, and the whole command end to end (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from taskmerge.bench.vision.images import carve_validation, read_image_folder
from taskmerge.bench.vision.loaders import Sources, load_encoder_checkpoint, load_task_splits, make_sources
from taskmerge.bench.vision.tasks import TASK_ORDER, TASKS, apply_overrides, resolve_tasks
from taskmerge.bench.vision.zeroshot import zeroshot_weights
from taskmerge.errors import CheckpointError, OptionError, TaskmergeError

# the three tasks of the fake suite: two with one template (CLIP's own logits are then the zero-shot head's),
# one with several templates; rendered_sst2 ships its own val/ folder, the others have validation carved.
FAKE_TASKS = ("pcam", "fer2013", "rendered_sst2")
SIZES = {"train": 8, "test": 6, "val": 4}  # images per class


def _tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges (every byte one token), built without any download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def _tiny_clip(tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def _image(task: int, label: int, rng: np.random.Generator) -> Image.Image:
    """A 20×20 image whose colour and stripe pattern depend on the class (and the task)."""
    hue = (label * 97 + task * 41) % 256
    base = np.array([hue, 255 - hue, (hue * 3) % 256], dtype=np.float64)
    img = base + rng.normal(0, 20, size=(20, 20, 3))
    img[:: 2 + label % 3] *= 0.6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_split(root: Path, task_index: int, classes: int, per_class: int, rng: np.random.Generator) -> None:
    for label in range(classes):
        d = root / str(label)
        d.mkdir(parents=True)
        for i in range(per_class):
            _image(task_index, label, rng).save(d / f"{i:03d}.png")


def _pixels(processor: Any, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values and labels of an image folder, read here with PIL (independently of the loader)."""
    files = sorted((int(p.parent.name), p.name, p) for p in folder.glob("*/*.png"))
    images = [Image.open(p).convert("RGB") for _, _, p in files]
    return processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor([lab for lab, _, _ in files])


def _finetune(clip: Any, head: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A few Adam steps of the vision tower through the frozen zero-shot head (the papers' recipe, tiny)."""
    import copy

    model = copy.deepcopy(clip).train()
    params = list(model.vision_model.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(1)
    for _ in range(30):
        feats = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        loss = F.cross_entropy(feats @ head.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("vision_model.")}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny CLIP folder, three fine-tuned towers in three checkpoint formats, image folders, sources YAML."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModel

    root = tmp_path_factory.mktemp("vision")
    tok = _tokenizer()
    clip = _tiny_clip(tok)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")

    rng = np.random.default_rng(0)
    data = root / "data"
    finetuned: dict[str, dict[str, torch.Tensor]] = {}
    checkpoints: dict[str, str] = {}
    for i, name in enumerate(FAKE_TASKS):
        task = TASKS[name]
        for split, per_class in SIZES.items():
            if split != "val" or name == "rendered_sst2":
                _write_split(data / name / split, i, task.num_classes, per_class, rng)
        head = zeroshot_weights(clip, tok, task.classnames, task.templates)
        pixels, labels = _pixels(processor, data / name / "train")
        finetuned[name] = ft = _finetune(clip, head, pixels, labels)
        if i == 0:  # a CLIPVisionModel folder (FusionBench's format)
            vis = CLIPVisionModel(clip.config.vision_config)
            vis.load_state_dict({k.removeprefix("vision_model."): v for k, v in ft.items()})
            vis.save_pretrained(root / f"ft_{name}")
            checkpoints[name] = str(root / f"ft_{name}")
        elif i == 1:  # a bare safetensors file with vision_model.* keys
            save_file({k: v.contiguous() for k, v in ft.items()}, str(root / f"ft_{name}.safetensors"))
            checkpoints[name] = str(root / f"ft_{name}.safetensors")
        else:  # a whole CLIPModel folder
            whole = _tiny_clip(tok)
            whole.load_state_dict({**whole.state_dict(), **ft})
            whole.save_pretrained(root / f"ft_{name}")
            checkpoints[name] = str(root / f"ft_{name}")
    sources = root / "sources.yaml"
    sources.write_text(yaml.safe_dump({"pretrained": str(root / "clip"), "checkpoints": checkpoints,
                                       "data_dir": str(data)}), encoding="utf-8")
    return {"root": root, "clip": clip, "tok": tok, "processor": processor, "data": data, "sources": sources,
            "finetuned": finetuned, "checkpoints": checkpoints}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


# ---------------------------------------------------------------------------------------------- the tasks


def test_task_order_and_published_class_counts() -> None:
    """The papers' order (8 ⊂ 14 ⊂ 20) and the datasets' published class counts."""
    assert TASK_ORDER[:8] == ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    assert TASK_ORDER[8:14] == ("flowers102", "pcam", "fer2013", "oxford_pets", "stl10", "cifar100")
    assert len(set(TASK_ORDER)) == 20
    counts = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
              "mnist": 10, "dtd": 47, "flowers102": 102, "pcam": 2, "fer2013": 7, "oxford_pets": 37, "stl10": 10,
              "cifar100": 100, "cifar10": 10, "food101": 101, "fashion_mnist": 10, "emnist_letters": 26,
              "kmnist": 10, "rendered_sst2": 2}
    assert {n: t.num_classes for n, t in TASKS.items()} == counts
    for t in TASKS.values():
        assert len(set(t.classnames)) == t.num_classes and t.templates
        assert all(tpl.format("X").count("X") == 1 for tpl in t.templates)
    assert resolve_tasks(14) == list(TASK_ORDER[:14]) and resolve_tasks("mnist,dtd") == ["mnist", "dtd"]
    with pytest.raises(OptionError, match="12"):
        resolve_tasks(12)
    with pytest.raises(OptionError, match="nope"):
        resolve_tasks("mnist,nope")


def test_overrides_and_sources() -> None:
    table = apply_overrides({"svhn": {"hub_config": None}, "toy": {"classnames": ["a", "b"], "templates": ["{}!"]}})
    assert table["svhn"].hub_config is None and table["toy"].prompts("a") == ["a!"]
    with pytest.raises(OptionError, match="tasks.svhn: unknown field"):
        apply_overrides({"svhn": {"colour": 1}})
    with pytest.raises(OptionError, match="classnames and templates"):
        apply_overrides({"toy": {"title": "T"}})
    tasks = {n: TASKS[n] for n in ("stanford_cars", "mnist")}
    src = make_sources("vit-l-14", tasks)
    assert src.pretrained == "openai/clip-vit-large-patch14"
    assert src.checkpoints["stanford_cars"] == "tanganke/clip-vit-large-patch14_stanford-cars"
    src = make_sources("ViT-B/32", tasks, {"checkpoint_pattern": "/ft/{task}", "checkpoints": {"mnist": "/m"}},
                       data_dir="/d")
    assert src.checkpoints == {"stanford_cars": "/ft/stanford_cars", "mnist": "/m"} and src.data_dir == Path("/d")
    with pytest.raises(OptionError, match="ViT-H"):
        make_sources("ViT-H/14", tasks)


# ------------------------------------------------------------------------------------------- the images


def test_validation_carve_is_random_splits_second_part(tmp_path: Path) -> None:
    """The carve equals torch.utils.data.random_split(train, [N − n, n]) under a seed-0 generator."""
    rng = np.random.default_rng(1)
    _write_split(tmp_path / "train", 0, 3, 7, rng)
    train = read_image_folder(tmp_path / "train", "t", "train", 3)
    assert train.labels.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    val = carve_validation(train, fraction=0.3, max_size=5000, seed=0)
    _, ref = torch.utils.data.random_split(range(21), [15, 6], generator=torch.Generator().manual_seed(0))
    assert len(val) == 6 and val.labels.tolist() == [i // 7 for i in ref.indices]
    assert len(carve_validation(train, fraction=0.3, max_size=4)) == 4
    first = np.asarray(val.image(0))
    again = np.asarray(Image.open(sorted((tmp_path / "train").glob("*/*.png"))[ref.indices[0]]).convert("RGB"))
    assert np.array_equal(first, again)


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    (tmp_path / "test" / "cats").mkdir(parents=True)
    with pytest.raises(TaskmergeError, match="cats"):
        read_image_folder(tmp_path / "test", "t", "test", 2)
    (tmp_path / "test" / "cats").rmdir()
    (tmp_path / "test" / "5").mkdir()
    with pytest.raises(TaskmergeError, match="label 5 but task 't' has 2 classes"):
        read_image_folder(tmp_path / "test", "t", "test", 2)


def test_missing_dataset_is_one_line_naming_what_to_fetch(tmp_path: Path) -> None:
    src = Sources("ViT-B/32", "x", {}, data_dir=tmp_path, offline=True)
    with pytest.raises(TaskmergeError) as err:
        load_task_splits(TASKS["mnist"], src)
    msg = str(err.value)
    assert "\n" not in msg and "mnist" in msg and str(tmp_path / "mnist") in msg and "/test" in msg


# ------------------------------------------------------------------------------------------- the models


def test_zeroshot_head_matches_a_direct_computation(fake: dict[str, Any]) -> None:
    """Per class: CLIP's text feature of each prompt alone (no padding), normalised, averaged, renormalised,
    times exp(logit_scale) — against the batched, padded construction."""
    clip, tok = fake["clip"], fake["tok"]
    task = TASKS["fer2013"]
    got = zeroshot_weights(clip, tok, task.classnames, task.templates, batch_size=5)
    rows = []
    with torch.no_grad():
        for c in task.classnames:
            feats = []
            for prompt in task.prompts(c):
                out = clip.get_text_features(**tok([prompt], return_tensors="pt"))
                feat = out if isinstance(out, torch.Tensor) else out.pooler_output
                feats.append(feat[0] / feat[0].norm())
            mean = torch.stack(feats).mean(0)
            rows.append(mean / mean.norm() * clip.logit_scale.exp())
    assert got.shape == (task.num_classes, clip.config.projection_dim)
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_checkpoint_formats_and_errors(fake: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = {k: v for k, v in fake["clip"].state_dict().items() if k.startswith("vision_model.")}
    src = Sources("ViT-B/32", "x", offline=True)
    for name, ref in fake["checkpoints"].items():  # folder of a CLIPVisionModel, bare file, whole CLIPModel
        got = load_encoder_checkpoint(ref, name, base, src)
        assert set(got) == set(base)
        for k, v in fake["finetuned"][name].items():
            assert torch.equal(got[k], v), (name, k)
    partial = dict(fake["finetuned"]["pcam"])
    key = "vision_model.post_layernorm.weight"
    partial.pop(key)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=key):
        load_encoder_checkpoint(str(tmp_path / "partial.safetensors"), "pcam", base, src)
    partial[key] = torch.ones(3)
    save_file(partial, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \(3,\)"):
        load_encoder_checkpoint(str(tmp_path / "shape.safetensors"), "pcam", base, src)


def test_missing_checkpoint_offline_is_one_line_naming_what_to_fetch(fake: dict[str, Any]) -> None:
    base = {k: v for k, v in fake["clip"].state_dict().items() if k.startswith("vision_model.")}
    src = Sources("ViT-B/32", "x", offline=True, cache_dir=fake["root"] / "empty-cache")
    with pytest.raises(CheckpointError) as err:
        load_encoder_checkpoint("tanganke/clip-vit-base-patch32_mnist", "mnist", base, src)
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-cli download tanganke/clip-vit-base-patch32_mnist" in msg


# ------------------------------------------------------------------------------------------ end to end


def _accuracy_by_clip(clip: Any, tok: Any, processor: Any, folder: Path, task: Any,
                      tower: dict[str, torch.Tensor] | None = None) -> float:
    """Zero-shot accuracy through CLIPModel's own forward (logits_per_image), for a single-template task."""
    import copy

    model = copy.deepcopy(clip)
    if tower is not None:
        model.load_state_dict({**model.state_dict(), **tower})
    pixels, labels = _pixels(processor, folder)
    text = tok([task.prompts(c)[0] for c in task.classnames], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                       pixel_values=pixels).logits_per_image
    return float((logits.argmax(1) == labels).float().mean())


def test_end_to_end_command_tables(fake: dict[str, Any], tmp_path: Path) -> None:
    from taskmerge.bench.vision.runner import main

    out = tmp_path / "out"
    rc = main(["--sources", str(fake["sources"]), "--tasks", ",".join(FAKE_TASKS),
               "--methods", "task_arithmetic,tsv_m", "--lam-grid", "0.5,1.0",
               "--data-method", "ada=adamerging:steps=2,batch_size=4,granularity=task",
               "--data-method", "moma=moma:steps=2,batch_size=4",
               "--data-method", "mda=mda_am:steps=2,batch_size=4,class_means=labels",
               "--val-fraction", "0.25", "--n-boot", "200", "--device", "cpu", "--workers", "2", "--batch-size", "16",
               "--offline", "--no-progress", "--out", str(out), "--stem", "fake"])
    assert rc == 0
    res = json.loads((out / "fake.json").read_text())
    md = (out / "fake.md").read_text()
    clip, tok, processor, data = fake["clip"], fake["tok"], fake["processor"], fake["data"]

    # data: the carve (25 % of train) and rendered_sst2's own val/ folder; test sizes
    n_data = res["meta"]["data"]
    assert n_data["pcam"]["n_val"] == int(0.25 * 2 * SIZES["train"])
    assert n_data["rendered_sst2"]["n_val"] == 2 * SIZES["val"]
    assert n_data["fer2013"]["n_test"] == 7 * SIZES["test"]

    # the pretrained row equals CLIP's own zero-shot logits on the single-template tasks
    for name in ("pcam", "rendered_sst2"):
        want = _accuracy_by_clip(clip, tok, processor, data / name / "test", TASKS[name])
        assert res["pretrained"]["test"][name] == pytest.approx(want)
        ft = _accuracy_by_clip(clip, tok, processor, data / name / "test", TASKS[name], fake["finetuned"][name])
        assert res["finetuned"]["test"][name] == pytest.approx(ft)

    # Task Arithmetic at its chosen λ: θ₀ + λ Σ_t (θ_t − θ₀), computed here
    ta = res["methods"]["task_arithmetic"]
    assert ta["lambda"] in (0.5, 1.0)
    best = max(p["avg_normalized_val"] for p in ta["val_curve"])
    chosen = next(p for p in ta["val_curve"] if p["lambda"] == ta["lambda"])
    assert ta["avg_normalized_val"] == best == chosen["avg_normalized_val"]
    base = {k: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    merged = {k: v + ta["lambda"] * sum(fake["finetuned"][n][k] - v for n in FAKE_TASKS) for k, v in base.items()}
    for name in ("pcam", "rendered_sst2"):
        want = _accuracy_by_clip(clip, tok, processor, data / name / "test", TASKS[name], merged)
        assert ta["test"][name] == pytest.approx(want)

    # normalised accuracy, intervals, paired differences
    for label, row in res["methods"].items():
        for name in FAKE_TASKS:
            assert row["normalized_test"][name] == pytest.approx(row["test"][name] / res["finetuned"]["test"][name])
        assert row["avg_test"] == pytest.approx(np.mean([row["test"][n] for n in FAKE_TASKS]))
        lo, hi = row["ci95"]["avg_test"]
        assert lo <= row["avg_test"] <= hi
        if label != "task_arithmetic":
            assert "task_arithmetic" in row["paired"]
    ta_vs_tsv = res["methods"]["task_arithmetic"]["paired"]["tsv_m"]
    for key in ("avg_test", "avg_normalized_test"):
        assert ta_vs_tsv[key][0] == pytest.approx(
            res["methods"]["task_arithmetic"][key] - res["methods"]["tsv_m"][key])
    d = [100 * x for x in ta_vs_tsv["avg_normalized_test"]]
    assert f"| task_arithmetic | – | {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] |" in md  # the JSON's normalised Δ

    # data-based rows: started from their data-free start's λ, adapted on the unlabeled test images
    assert res["methods"]["ada"]["start"] == "task_arithmetic" and res["methods"]["moma"]["start"] == "task_arithmetic"
    assert res["methods"]["mda"]["start"] == "mda_ta" and "mda_ta" in res["methods"]
    for name in ("ada", "moma", "mda"):
        row = res["methods"][name]
        assert row["kind"] == "data-based" and row["steps"] == 2
        assert row["lambda"] == res["methods"][row["start"]]["lambda"]

    for heading in ("## Absolute test accuracy (%)", "## Normalized test accuracy", "## Paired differences"):
        assert heading in md
    assert res["methods"]["mda"]["uses_labels"] and not res["methods"]["ada"]["uses_labels"]
    assert "| Pretrained (zero-shot) |" in md and "| ada (data-based, from task_arithmetic) |" in md
    assert "| mda (data-based, from mda_ta, validation labels) |" in md
    assert "PCAM = `pcam`" in md
    ta_row = res["methods"]["task_arithmetic"]  # its average cell carries the interval of the JSON's ci95
    lo, hi = ta_row["ci95"]["avg_normalized_test"]
    assert f"{100 * ta_row['avg_normalized_test']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in md


def test_command_errors_are_one_line(fake: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from taskmerge.bench.vision.runner import main

    rc = main(["--sources", str(fake["sources"]), "--tasks", "pcam,mnist", "--offline", "--device", "cpu",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert "mnist" in errors[0] and "huggingface-cli download" in errors[0]


@pytest.fixture(scope="module")
def suite(fake: dict[str, Any]) -> Any:
    from taskmerge.bench.vision.loaders import read_sources_yaml
    from taskmerge.bench.vision.suite import load_suite

    names = list(FAKE_TASKS)
    sources = make_sources("ViT-B/32", {n: TASKS[n] for n in names}, read_sources_yaml(fake["sources"]), offline=True)
    return load_suite(names, TASKS, sources, val_fraction=0.25)


def test_option_grid_is_swept_at_lambda_one(suite: Any) -> None:
    """A method registered with an option_grid and the λ grid (1.0,) (AlignMerge-B's α) has its option chosen
    on validation instead of λ: one merge per value, the best average normalised validation accuracy kept."""
    from taskmerge.bench.vision.runner import run_vision_benchmark
    from taskmerge.registry import get_method

    res = run_vision_benchmark(suite, ["alignmerge_b"], n_boot=50, out_dir=None, progress=False)
    row = res["methods"]["alignmerge_b"]
    key, values = get_method("alignmerge_b").option_grid
    assert row["lambda"] == 1.0 and [p[key] for p in row["val_curve"]] == list(values)
    scores = [p["avg_normalized_val"] for p in row["val_curve"]]
    assert row["chosen_option"] == {key: values[scores.index(max(scores))]}
    assert row["options"][key] == row["chosen_option"][key]



def test_class_names_in_the_wrong_order_are_caught(suite: Any) -> None:
    """A head whose classes are swapped (class names not in the dataset's label order) makes the fine-tuned
    tower score 0 % on validation: an error naming the task's checkpoint, before anything is merged."""
    import dataclasses

    from taskmerge.bench.vision.runner import run_vision_benchmark
    from taskmerge.databased import LinearHead

    swapped = {**suite.heads, "pcam": LinearHead(suite.heads["pcam"].weight.flip(0))}
    with pytest.raises(CheckpointError, match="fine-tuned checkpoint of task 'pcam'.*label order"):
        run_vision_benchmark(dataclasses.replace(suite, heads=swapped), ["task_arithmetic"], out_dir=None,
                             progress=False)

class _Features(dict):
    """``datasets.Features`` stand-in: column → feature object whose class name is what the loader reads."""


def _fake_datasets(splits: dict[str, list[dict[str, Any]]], num_classes: int, calls: list[tuple]) -> Any:
    import types

    image_type = type("Image", (), {})
    label_type = type("ClassLabel", (), {"num_classes": num_classes})

    class Dataset:
        features = _Features(img=image_type(), label=label_type(), extra=object())

        def __init__(self, rows: list[dict[str, Any]]) -> None:
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, key: int | str) -> Any:
            return [r[key] for r in self.rows] if isinstance(key, str) else self.rows[key]

    def load_dataset(repo: str, config: str | None, split: str, cache_dir: str | None = None) -> Dataset:
        calls.append((repo, config, split))
        return Dataset(splits[split])

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hub_datasets_route_with_a_stand_in_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a data folder the loader reads the task's hub dataset through ``datasets`` (stood in for here):
    its repo, config and split names, the image / class-label columns, and the papers' carve of train."""
    import sys

    rng = np.random.default_rng(2)
    rows = {split: [{"img": _image(0, i % 10, rng), "label": i % 10, "extra": "x"} for i in range(n)]
            for split, n in (("train", 30), ("test", 7))}
    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, 10, calls))
    svhn = TASKS["svhn"]
    val, test = load_task_splits(svhn, Sources("ViT-B/32", "x"), val_fraction=0.2)
    assert calls == [("ufldl-stanford/svhn", "cropped_digits", split) for split in ("test", "train")]
    assert test.labels.tolist() == [i % 10 for i in range(7)]
    _, ref = torch.utils.data.random_split(range(30), [24, 6], generator=torch.Generator().manual_seed(0))
    assert val.labels.tolist() == [i % 10 for i in ref.indices]
    assert np.array_equal(np.asarray(val.image(1)), np.asarray(rows["train"][ref.indices[1]]["img"]))
    with pytest.raises(TaskmergeError, match="--offline"):
        load_task_splits(svhn, Sources("ViT-B/32", "x", offline=True))
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, 3, calls))
    with pytest.raises(TaskmergeError, match="column 'label' has 3 classes, task 'svhn' has 10"):
        load_task_splits(svhn, Sources("ViT-B/32", "x"))


def test_taskmerge_bench_suite_vit_dispatches_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from taskmerge.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("checkpoint_pattern: /ft/{checkpoint}\ncheckpoints: {dtd: /mine/dtd}\n", encoding="utf-8")
    assert main(["bench", "--suite", "vit", "--backbone", "B/16", "--tasks", "8", "--sources", str(cfg),
                 "--print-sources"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrained"] == "openai/clip-vit-base-patch16"
    assert list(printed["checkpoints"]) == list(TASK_ORDER[:8])
    assert printed["checkpoints"]["stanford_cars"] == "/ft/stanford-cars" and printed["checkpoints"]["dtd"] == "/mine/dtd"
    assert main(["bench", "--suite", "vit", "--tasks", "9", "--print-sources"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --tasks 9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_end_to_end_on_cuda_matches_cpu(fake: dict[str, Any], tmp_path: Path) -> None:
    """Evaluation and merges on the GPU (data-based loop on the CPU) give the CPU run's tables."""
    from taskmerge.bench.vision.runner import main

    args = ["--sources", str(fake["sources"]), "--tasks", ",".join(FAKE_TASKS), "--methods", "task_arithmetic,tsv_m",
            "--lam-grid", "0.5,1.0", "--data-method", "moma=moma:steps=2,batch_size=4", "--val-fraction", "0.25",
            "--n-boot", "50", "--offline", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--device", "cpu", "--stem", "cpu"]) == 0
    assert main([*args, "--device", "cuda", "--stem", "cuda"]) == 0
    cpu, gpu = (json.loads((tmp_path / f"{s}.json").read_text())["methods"] for s in ("cpu", "cuda"))
    for label in cpu:
        assert gpu[label]["lambda"] == cpu[label]["lambda"]
        for name in FAKE_TASKS:
            assert gpu[label]["test"][name] == pytest.approx(cpu[label]["test"][name], abs=1.5 / 42)
