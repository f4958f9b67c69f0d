"""Combining separate seed runs gives what one ``--seeds`` run gives (checked against the joint run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taskmerge.bench import combine as comb
from taskmerge.bench import runner
from taskmerge.errors import OptionError

TASKS = ["toy_letters", "toy_length"]
KW = dict(tasks=TASKS, recipe="full", steps=6, lam_grid=[0.5, 1.0], progress=False, n_boot=50)


@pytest.fixture(autouse=True)
def _no_matmul_timing(monkeypatch):
    monkeypatch.setattr(runner, "matmul_gflops", lambda *a, **k: 12.5)


def test_combined_seed_runs_equal_the_joint_run(tiny, cache, tmp_path) -> None:
    methods = ["task_arithmetic", "weight_averaging"]
    joint = runner.run_benchmark(methods, out_dir=None, backbone=tiny, seeds=[0, 1], **KW)
    out = tmp_path / "r"
    runner.run_benchmark(methods, out_dir=out, stem="s0", backbone=tiny, **KW)
    runner.run_benchmark(methods, out_dir=out, stem="s1", backbone=tiny, seeds=[1], **KW)

    assert comb.main([str(out / "s0.json"), str(out / "s1.json"), "--out", str(out), "--stem", "both"]) == 0
    both = json.loads((out / "both.json").read_text())
    assert both["meta"]["finetune_seeds"] == [0, 1]
    assert set(both["seed_runs"]) == {"0", "1"}
    for s in ("0", "1"):
        assert both["seed_runs"][s]["checkpoints"] == joint["seed_runs"][s]["checkpoints"]
        for m in methods:
            assert both["seed_runs"][s]["methods"][m]["avg_test"] == joint["seed_runs"][s]["methods"][m]["avg_test"]
            assert both["seed_runs"][s]["methods"][m]["lambda"] == joint["seed_runs"][s]["methods"][m]["lambda"]
    for label in ["finetuned", *methods]:
        values = [both["seed_runs"][s][label if label == "finetuned" else "methods"] for s in ("0", "1")]
        values = [v["avg_test"] if label == "finetuned" else v[label]["avg_test"] for v in values]
        row = both["across_seeds"][label]["avg_test"]
        assert row["values"] == values == joint["across_seeds"][label]["avg_test"]["values"]
        assert row["sd"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))
    md = (out / "both.md").read_text()
    assert "Across fine-tuning seeds 0, 1" in md and "Combined from separate runs" in md


def test_later_seeds_may_run_fewer_methods(tiny, cache, tmp_path) -> None:
    a = runner.run_benchmark(["task_arithmetic", "weight_averaging"], out_dir=None, backbone=tiny, **KW)
    b = runner.run_benchmark(["task_arithmetic"], out_dir=None, backbone=tiny, seeds=[1], **KW)
    both = comb.combine([a, b], ["a.json", "b.json"])
    assert set(both["methods"]) == {"task_arithmetic", "weight_averaging"}  # the first seed's rows, all kept
    assert set(both["across_seeds"]) == {"pretrained", "finetuned", "task_arithmetic"}
    assert both["across_seeds"]["task_arithmetic"]["avg_test"]["values"] == [
        a["methods"]["task_arithmetic"]["avg_test"], b["methods"]["task_arithmetic"]["avg_test"]]
    assert "Rows run with fine-tuning seed 0 only: weight_averaging." in runner.markdown_report(both)


def test_combine_refuses_a_different_configuration_or_a_repeated_seed(tiny, cache, tmp_path) -> None:
    a = runner.run_benchmark(["task_arithmetic"], out_dir=None, backbone=tiny, **KW)
    b = runner.run_benchmark(["task_arithmetic"], out_dir=None, backbone=tiny, seeds=[1], **{**KW, "n_boot": 60})
    c = runner.run_benchmark(["weight_averaging"], out_dir=None, backbone=tiny, seeds=[1], **KW)
    with pytest.raises(OptionError, match=r"b\.json differs from a\.json in n_boot"):
        comb.combine([a, b], ["a.json", "b.json"])
    with pytest.raises(OptionError, match="no method row is in every input"):
        comb.combine([a, c], ["a.json", "c.json"])
    with pytest.raises(OptionError, match="seed 0 is in both"):
        comb.combine([a, a], ["a.json", "a2.json"])
    with pytest.raises(OptionError, match="at least two"):
        comb.combine([a])
