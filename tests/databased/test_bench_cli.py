"""The benchmark hook (taskmerge.databased.bench) and ``taskmerge merge`` with a data section, on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from taskmerge.bench.backbone import tiny_bert
from taskmerge.bench.finetune import Recipe
from taskmerge.bench.pairwise import pairwise_differences
from taskmerge.cli import main
from taskmerge.databased.bench import combine_results, run_databased
from taskmerge.databased.loop import count_parameters


def test_run_databased_on_the_tiny_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows, files, and the adaptation protocol: the methods get the unlabeled texts of the adaptation split
    (test by default, transductive; val for the inductive variant), no label unless a variant asks for the
    validation labels, while validation only chooses the starts' λ."""
    from taskmerge import databased
    from taskmerge.bench.datasets import load_task

    monkeypatch.setenv("TASKMERGE_CACHE", str(tmp_path / "cache"))
    calls: dict[str, list[dict]] = {}
    for name, spec in list(databased.DATA_METHODS.items()):
        def spy(*args, _fn=spec.fn, _name=name, **kwargs):
            calls.setdefault(_name, []).append({"inputs": args[3], "kwargs": kwargs})
            return _fn(*args, **kwargs)
        monkeypatch.setitem(databased.DATA_METHODS, name, spec._replace(fn=spy))
    configs = [
        {"name": "ada", "method": "adamerging", "options": {"steps": 2, "lr": 0.01}},
        {"name": "mda", "method": "mda_am", "options": {"steps": 2}},
        {"name": "mda-labels", "method": "mda_am", "options": {"steps": 2, "class_means": "labels"}},
        {"name": "moma-ties", "method": "moma", "options": {"steps": 2, "base": "ties"}},
        {"name": "ada-val", "method": "adamerging", "options": {"steps": 12}, "adapt_split": "val"},
    ]
    tasks = ["toy_letters", "toy_length"]
    grids = {m: [0.5, 1.0] for m in ("task_arithmetic", "mda_ta", "ties")}
    bb = tiny_bert(seed=0)
    res = run_databased(configs, tasks=tasks, recipe=Recipe(steps=10, lr=1e-3), backbone=bb, lam_grids=grids,
                        patience=None, out_dir=tmp_path / "out", stem="t", progress=False)
    assert set(res["starts"]) == {"task_arithmetic", "mda_ta", "ties"}
    for start in res["starts"].values():  # validation chooses λ: the best point of the validation curve
        best = max(start["val_curve"], key=lambda p: p["avg_normalized_val"])
        assert start["lambda"] == best["lambda"] and [p["lambda"] for p in start["val_curve"]] == [0.5, 1.0]
    data = {n: load_task(n, 0, res["meta"]["split_protocol"]) for n in tasks}

    def ids(split: str) -> list[list[int]]:
        return [list(x) for n in tasks for x in bb.tokenizer([t for t, _ in data[n].split(split)], truncation=True,
                                                             max_length=48)["input_ids"]]

    seen = [c for cs in calls.values() for c in cs]
    assert len(seen) == 5
    for call in seen:  # unlabeled token ids only; labels only for the variant that asks, from validation
        assert all(type(x).__name__ == "TokenInputs" for x in call["inputs"])
    assert [list(r) for x in calls["moma"][0]["inputs"] for r in x.ids] == ids("test")
    assert [list(r) for x in calls["adamerging"][1]["inputs"] for r in x.ids] == ids("val")
    assert "labeled" not in calls["mda_am"][0]["kwargs"]
    labeled = calls["mda_am"][1]["kwargs"]["labeled"]
    assert [lab.labels.tolist() for lab in labeled] == [[y for _, y in data[n].val] for n in tasks]
    rows = res["methods"]
    assert rows["ada"]["protocol"] == "transductive" and rows["ada-val"]["protocol"] == "inductive"
    assert rows["mda"]["uses_labels"] is False and rows["mda-labels"]["uses_labels"] is True
    assert rows["mda"]["diagnostics_split"] == "val"
    for name, r in rows.items():
        assert set(r["test"]) == set(tasks)
        assert r["start_lambda"] in (0.5, 1.0) and len(r["loss"]) == r["options"]["steps"]
        # drop-in rows for taskmerge.bench.runner's results["methods"] (its markdown_report reads these keys)
        assert {"test", "normalized_test", "avg_test", "avg_normalized_test", "lambda", "unseen_test"} <= set(r)
        assert r["delta_avg_test"] == pytest.approx(r["avg_test"] - res["starts"][r["start_method"]]["avg_test"])
        d, lo, hi = r["delta_ci95"]["avg_test"]
        assert d == pytest.approx(r["delta_avg_test"]) and lo <= d <= hi
        for t, acc in r["test"].items():
            assert r["normalized_test"][t] == pytest.approx(acc / res["finetuned"]["test"][t])
        curve = json.loads(Path(r["curve"]["json"]).read_text())
        assert curve["loss"] == r["loss"] and Path(r["curve"]["png"]).stat().st_size > 1000
    assert rows["ada-val"]["convergence"]["still_falling"] in (True, False)  # 12 steps: the check runs
    assert rows["moma-ties"]["masking_rate"] >= 0 and "lambda_stats" in rows["ada"]
    saved = json.loads((tmp_path / "out" / "t.json").read_text())
    assert set(saved["methods"]) == {c["name"] for c in configs}
    md = (tmp_path / "out" / "t.md").read_text()
    assert "| moma-ties | ties" in md and "Normalized" in md
    assert "val (inductive)" in md and "test (transductive)" in md and "val (class means)" in md
    both = combine_results([tmp_path / "out" / "t.json"] * 2, tmp_path / "out", "all", order=["moma-ties"])
    assert list(both["methods"])[0] == "moma-ties" and (tmp_path / "out" / "all.md").is_file()
    # the saved table carries its test sizes, so the pairwise tool compares its rows (starts included)
    assert saved["meta"]["test_counts"] == {n: len(data[n].test) for n in tasks}
    diffs = pairwise_differences(saved, ["moma-ties", "ties"])
    assert diffs["moma-ties"]["ties"][0] == pytest.approx(rows["moma-ties"]["delta_avg_normalized_test"], abs=1e-12)


def _tiny_folder(path: Path, sd: dict[str, torch.Tensor] | None = None) -> None:
    bb = tiny_bert(seed=0, hidden_size=16, num_layers=1, intermediate_size=32)
    if sd is not None:
        bb.model.load_state_dict(sd)
    bb.model.save_pretrained(str(path))
    bb.tokenizer.save_pretrained(str(path))


def test_cli_merge_with_a_data_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel

    _tiny_folder(tmp_path / "base")
    base = AutoModel.from_pretrained(str(tmp_path / "base")).state_dict()
    gen = torch.Generator().manual_seed(0)
    models, texts = [], []
    for i, classes in enumerate((3, 2)):
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
        folder = tmp_path / f"ck{i}"
        _tiny_folder(folder / "model", sd)
        save_file({"weight": torch.randn(classes, 16, generator=gen), "bias": torch.zeros(classes)},
                  str(folder / "head.safetensors"), metadata={"normalize": "true"})
        models.append(str(folder / "model"))
        (tmp_path / f"t{i}.txt").write_text("\n".join(f"example {j} of task {i}" for j in range(12)) + "\n")
        texts.append(str(tmp_path / f"t{i}.txt"))
    cfg = {"base": str(tmp_path / "base"), "models": models, "method": "moma", "lambda": 0.5,
           "options": {"steps": 2, "batch_size": 4}, "output": str(tmp_path / "out"), "data": {"inputs": texts}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    merged = AutoModel.from_pretrained(str(tmp_path / "out"))
    assert count_parameters(merged.state_dict()) == count_parameters(base)
    heads = sorted((tmp_path / "out" / "heads").glob("*.safetensors"))
    assert [h.name for h in heads] == ["0-ck0.safetensors", "1-ck1.safetensors"]
    # a data-based method without data, and a data-free method with data, are errors
    cfg2 = {**cfg, "output": str(tmp_path / "o2")}
    del cfg2["data"]
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg2))
    assert main(["merge", str(tmp_path / "c2.yaml")]) == 2
    cfg3 = {**cfg, "method": "task_arithmetic", "options": {}, "output": str(tmp_path / "o3")}
    (tmp_path / "c3.yaml").write_text(yaml.safe_dump(cfg3))
    assert main(["merge", str(tmp_path / "c3.yaml")]) == 2
    # labelled files are refused unless MDA-AM's class_means=labels variant asks for them
    (tmp_path / "l0.txt").write_text("0\texample\n1\tother\n")
    cfg4 = {**cfg, "output": str(tmp_path / "o4"), "data": {"inputs": texts, "labeled": [str(tmp_path / "l0.txt")] * 2}}
    (tmp_path / "c4.yaml").write_text(yaml.safe_dump(cfg4))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "c4.yaml")]) == 2
    assert "class_means" in capsys.readouterr().err and not (tmp_path / "o4").exists()
