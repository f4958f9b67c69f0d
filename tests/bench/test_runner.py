"""End-to-end smoke run of the benchmark on a tiny random BERT and two toy tasks.

Uses taskmerge's merge core (never a stand-in: a broken merge core must fail here). The reported numbers
are checked against an independent recomputation (task arithmetic = θ₀ + λ Σ_t (θ_t − θ₀), evaluated one
example at a time).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bench_helpers import load_into, reference_accuracy, reference_features
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.bench import runner
from taskmerge.bench.datasets import load_task
from taskmerge.bench.stats import bootstrap_average_ci, paired_bootstrap_diff_ci

TASKS = ["toy_letters", "toy_length"]
GRID = [0.25, 0.5, 1.0]


@pytest.fixture(autouse=True)
def _no_matmul_timing(monkeypatch):
    """The 2048² matmul rate takes seconds; the smoke runs record a stand-in."""
    monkeypatch.setattr(runner, "matmul_gflops", lambda *a, **k: 12.5)


def _reference_correct(model, tokenizer, head, examples) -> np.ndarray:
    feats = reference_features(model, tokenizer, [t for t, _ in examples])
    return np.array([int((f @ head.weight.T + head.bias).argmax()) == y for f, (_, y) in zip(feats, examples)])


@pytest.fixture()
def api():
    """The real merge core's API (no stand-in that would hide a broken merge core)."""
    return runner.merge_api()


def test_smoke_benchmark(tiny, cache, tmp_path, api) -> None:
    from taskmerge.bench import finetune as ft

    recipe = ft.get_recipe("full", steps=40, lr=1e-3)  # protocol v2: frozen zero-shot heads
    out = tmp_path / "results"
    res = runner.run_benchmark(["task_arithmetic", "weight_averaging"], tasks=TASKS, recipe=recipe, lam_grid=GRID,
                               out_dir=out, backbone=tiny, progress=False, stem="smoke", n_boot=300)

    # files
    js = json.loads((out / "smoke.json").read_text())
    md = (out / "smoke.md").read_text()
    assert js["meta"]["tasks"] == TASKS and set(js["methods"]) == {"task_arithmetic", "weight_averaging"}
    assert js["meta"]["split_protocol"] == "v2" and js["meta"]["head"] == "zeroshot"
    assert js["meta"]["machine"]["matmul_gflops_2048"] == 12.5
    for needle in ("ToyLet", "ToyLen", "task_arithmetic", "weight_averaging", "Pretrained (zero-shot heads)",
                   "Fine-tuned (individual)", "Normalized", res["meta"]["machine"]["torch"], "12 GFLOPS",
                   "| *test examples* | 150 | 180 | 330 | – |", "Paired differences to task_arithmetic"):
        assert needle in md, needle
    assert res["meta"]["machine"]["cpu_count"] >= 1

    # references recomputed independently, example by example
    data = {n: load_task(n, 0) for n in TASKS}
    cks = {n: ft.finetune(tiny, data[n], recipe, progress=False) for n in TASKS}
    base = tiny.state_dict()
    sds = {n: cks[n].state_dict() for n in TASKS}

    def acc(sd, n, split="test"):
        return reference_accuracy(load_into(tiny.model, sd), tiny.tokenizer, cks[n].head.weight, cks[n].head.bias,
                                  data[n].split(split))

    for n in TASKS:
        assert res["pretrained"]["test"][n] == pytest.approx(acc(base, n), abs=1e-9)
        assert res["finetuned"]["test"][n] == pytest.approx(acc(sds[n], n), abs=1e-9)
        assert res["finetuned"]["test"][n] > 1 / len(data[n].labels) + 0.2  # learnable toy tasks: well above chance
        assert torch.equal(cks[n].head.weight, ft.task_head(tiny, data[n], recipe).weight)  # the zero-shot head

    ta = res["methods"]["task_arithmetic"]
    # λ is the (first) maximiser of the average normalised validation accuracy over the grid
    assert [p["lambda"] for p in ta["val_curve"]] == GRID
    scores = [p["avg_normalized_val"] for p in ta["val_curve"]]
    assert ta["lambda"] == GRID[scores.index(max(scores))]
    for p in ta["val_curve"]:
        expect = sum(p["val"][n] / res["finetuned"]["val"][n] for n in TASKS) / len(TASKS)
        assert p["avg_normalized_val"] == pytest.approx(expect)

    lam = ta["lambda"]
    merged = {k: (v + lam * sum(sds[n][k] - v for n in TASKS)) if v.is_floating_point() else v for k, v in base.items()}
    for n in TASKS:
        assert ta["test"][n] == pytest.approx(acc(merged, n), abs=1e-9)
        assert ta["normalized_test"][n] == pytest.approx(ta["test"][n] / res["finetuned"]["test"][n])
    assert ta["avg_test"] == pytest.approx(sum(ta["test"].values()) / 2)

    # per-example correctness (recomputed one example at a time), intervals and paired differences from it
    ft_correct = {n: _reference_correct(load_into(tiny.model, sds[n]), tiny.tokenizer, cks[n].head, data[n].test)
                  for n in TASKS}
    wa = res["methods"]["weight_averaging"]
    merged_wa = {k: (v + wa["lambda"] * sum(sds[n][k] - v for n in TASKS) / 2) if v.is_floating_point() else v
                 for k, v in base.items()}
    correct = {m: {n: _reference_correct(load_into(tiny.model, sd), tiny.tokenizer, cks[n].head, data[n].test)
                   for n in TASKS} for m, sd in (("ta", merged), ("wa", merged_wa))}
    for n in TASKS:
        assert runner.unpack_correct(ta["correct_test"][n], len(data[n].test)).tolist() == correct["ta"][n].tolist()
        assert runner.unpack_correct(js["finetuned"]["correct_test"][n], len(data[n].test)).tolist() == \
            ft_correct[n].tolist()
    est, lo, hi = bootstrap_average_ci(correct["ta"], ft_correct, 300)
    assert ta["avg_normalized_test"] == pytest.approx(est) and ta["ci95"]["avg_normalized_test"] == [lo, hi]
    assert lo <= est <= hi
    assert ta["ci95"]["avg_test"] == list(bootstrap_average_ci(correct["ta"], None, 300)[1:])
    diff = wa["paired"]["task_arithmetic"]["avg_normalized_test"]
    assert diff == list(paired_bootstrap_diff_ci(correct["wa"], correct["ta"], ft_correct, 300))
    assert diff[0] == pytest.approx(wa["avg_normalized_test"] - ta["avg_normalized_test"])
    assert "paired" in ta and ta["paired"] == {}  # no reference other than itself in this run

    # one validation point recomputed too
    point = ta["val_curve"][0]
    merged0 = {k: (v + point["lambda"] * sum(sds[n][k] - v for n in TASKS)) if v.is_floating_point() else v
               for k, v in base.items()}
    assert point["val"]["toy_length"] == pytest.approx(acc(merged0, "toy_length", "val"), abs=1e-9)


def test_markdown_report_layout() -> None:
    meta = {
        "tasks": ["a", "b"], "unseen_tasks": ["c"], "date": "2026-01-01", "protocol": "p", "seed": 0,
        "machine": {"platform": "Linux", "cpu": "X", "cpu_count": 2, "torch_threads": 2, "torch": "2.13.0",
                    "transformers": "5", "python": "3.11", "matmul_gflops_2048": 55.4},
        "backbone": {"name": "minilm", "identity": "0" * 64, "source": "pkg"},
        "recipe": {"kind": "full", "steps": 1, "batch_size": 16, "lr": 5e-5, "max_length": 48, "seed": 0,
                   "head": "zeroshot", "logit_scale": 20.0},
        "timings_seconds": {"total": 1.0}, "split_protocol": "v2", "head": "zeroshot", "finetune_seeds": [0, 1],
        "n_boot": 1000, "references": ["ta"],
        "manifests": {"a": {"counts": {"test": 1000}, "test_target": 1000},
                      "b": {"counts": {"test": 414}, "test_target": 1000},
                      "c": {"counts": {"test": 1000}, "test_target": 1000}},
    }
    res = {
        "meta": meta,
        "pretrained": {"test": {"a": 0.5, "b": 0.25}, "avg_test": 0.375, "normalized_test": {"a": 0.5, "b": 0.5},
                       "avg_normalized_test": 0.5, "unseen_test": {"c": 0.4}},
        "finetuned": {"test": {"a": 1.0, "b": 0.5}, "avg_test": 0.75},
        "methods": {"ta": {"test": {"a": 0.75, "b": 0.5}, "avg_test": 0.625, "lambda": 0.3,
                           "normalized_test": {"a": 0.75, "b": 1.0}, "avg_normalized_test": 0.875,
                           "ci95": {"avg_test": [0.6, 0.65], "avg_normalized_test": [0.85, 0.9]},
                           "unseen_test": {"c": 0.45}, "paired": {}},
                    "ties": {"test": {"a": 0.8, "b": 0.5}, "avg_test": 0.65, "lambda": 0.5,
                             "normalized_test": {"a": 0.8, "b": 1.0}, "avg_normalized_test": 0.9,
                             "unseen_test": {"c": 0.5},
                             "paired": {"ta": {"avg_normalized_test": [0.025, 0.011, 0.04],
                                               "avg_test": [0.025, -0.004, 0.05]}}}},
        "across_seeds": {"ta": {"avg_test": {"mean": 0.62, "sd": 0.01, "values": [0.625, 0.615]},
                                "avg_normalized_test": {"mean": 0.87, "sd": 0.005, "values": [0.875, 0.865]}}},
    }
    md = runner.markdown_report(res)
    assert "| ta | 75.0 | 50.0 | 62.5 [60.0, 65.0] | 0.3 |" in md
    assert "| ta | 75.0 | 100.0 | 87.5 [85.0, 90.0] |" in md
    assert "| Fine-tuned (individual) | 100.0 | 50.0 | 75.0 | – |" in md
    assert "| Pretrained (zero-shot heads) | 50.0 | 25.0 | 37.5 | – |" in md
    assert "| *test examples* | 1000 | 414 | 1414 | – |" in md
    assert "| ties | +2.5 [+1.1, +4.0] * | +2.5 [-0.4, +5.0] |" in md
    assert "| ta | 62.0 ± 1.0 | 87.0 ± 0.5 | 87.5 / 86.5 |" in md
    assert "| ta | 45.0 | 45.0 |" in md
    assert "55 GFLOPS" in md and "seeds 0, 1" in md and "b (414 of 1000)" in md


def test_sweep_lambda_picks_first_maximum_and_stops_with_patience() -> None:
    values = {0.1: 0.5, 0.2: 0.7, 0.3: 0.9, 0.4: 0.9, 0.5: 0.6, 0.6: 0.5, 0.7: 0.95}
    calls = []

    def score(lam):
        calls.append(lam)
        return values[lam], {"t": values[lam]}

    lam, best, curve = runner.sweep_lambda(list(values), score)
    assert (lam, best) == (0.7, 0.95) and len(curve) == 7
    calls.clear()
    lam, best, curve = runner.sweep_lambda(list(values), score, patience=3)
    assert (lam, best) == (0.3, 0.9) and calls == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert [p["lambda"] for p in curve] == calls
    with pytest.raises(ValueError):
        runner.sweep_lambda([], score)


def test_command_line_runs_tiny_suite(tmp_path, cache, capsys, api) -> None:
    out = tmp_path / "cli"
    code = runner.main(["--backbone", "tiny", "--tasks", "toy_letters,toy_length", "--methods", "task_arithmetic",
                        "--steps", "5", "--lam-grid", "0.5,1.0", "--out", str(out), "--no-progress", "--patience", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| task_arithmetic |" in printed
    js = json.loads((out / "bench_tiny_v2_full_2tasks.json").read_text())
    assert js["meta"]["recipe"]["steps"] == 5 and js["methods"]["task_arithmetic"]["grid"] == [0.5, 1.0]
    assert js["meta"]["head"] == "zeroshot" and js["meta"]["split_protocol"] == "v2"
    # the command line's head follows the protocol, also with a logit scale given
    code = runner.main(["--backbone", "tiny", "--tasks", "toy_letters", "--methods", "task_arithmetic", "--steps",
                        "2", "--lam-grid", "1.0", "--out", str(out), "--no-progress", "--protocol", "v1",
                        "--logit-scale", "10", "--n-boot", "20"])
    assert code == 0
    js = json.loads((out / "bench_tiny_full_1tasks.json").read_text())
    assert js["meta"]["head"] == "probe" and js["meta"]["split_protocol"] == "v1"


def test_protocol_v1_reuses_the_first_benchmarks_checkpoints(tiny, tmp_path, cache, api) -> None:
    """v1: v1 splits, 16-shot probe heads, the first benchmark's checkpoint folders and file names."""
    from taskmerge.bench import finetune as ft

    out = tmp_path / "v1"
    res = runner.run_benchmark(["task_arithmetic"], tasks=TASKS, recipe="full", steps=5, lam_grid=[1.0],
                               out_dir=out, backbone=tiny, progress=False, protocol="v1", n_boot=50)
    assert (out / "bench_tiny_full_2tasks.json").exists()
    assert res["meta"]["head"] == "probe" and "head" not in res["meta"]["recipe"]
    v1_recipe = ft.Recipe(steps=5)  # the first benchmark's "full" recipe
    for n in TASKS:
        task = load_task(n, 0, "v1")
        assert res["meta"]["manifests"][n]["sha256"] == task.manifest["sha256"]
        assert res["meta"]["checkpoints"][n] == str(ft.checkpoint_path(task, v1_recipe, tiny))
    assert "Pretrained (LP heads)" in (out / "bench_tiny_full_2tasks.md").read_text()


def test_seeds_fine_tune_per_seed_and_report_mean_and_sd(tiny, tmp_path, cache, api) -> None:
    from taskmerge.bench import finetune as ft

    res = runner.run_benchmark(["task_arithmetic", "weight_averaging"], tasks=TASKS, recipe="full", steps=6,
                               lam_grid=[0.5, 1.0], out_dir=None, backbone=tiny, progress=False, seeds=[0, 1],
                               n_boot=50)
    runs = res["seed_runs"]
    assert set(runs) == {"0", "1"} and res["meta"]["finetune_seeds"] == [0, 1]
    # seed 0 keeps the key it has without --seeds; seed 1 has checkpoints of its own
    r0 = ft.get_recipe("full", steps=6)
    for n in TASKS:
        assert runs["0"]["checkpoints"][n] == str(ft.checkpoint_path(load_task(n), r0, tiny))
        assert runs["1"]["checkpoints"][n] == str(ft.checkpoint_path(load_task(n), ft.get_recipe(r0, seed=1), tiny))
    assert res["methods"] == runs["0"]["methods"]
    for label in ("task_arithmetic", "weight_averaging", "finetuned"):
        get = (lambda r: r["finetuned"]) if label == "finetuned" else (lambda r, m=label: r["methods"][m])
        values = [get(runs[s])["avg_test"] for s in ("0", "1")]
        row = res["across_seeds"][label]["avg_test"]
        assert row["values"] == values
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["sd"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))


def test_variants_run_a_method_with_options_under_a_label(tmp_path, cache, capsys, api) -> None:
    """``--variant LABEL=METHOD:k=v`` adds a row; with DARE at p=0 (nothing dropped) it must reproduce the task
    arithmetic row exactly, and its options must be recorded."""
    out = tmp_path / "variants"
    code = runner.main(["--backbone", "tiny", "--tasks", "toy_letters,toy_length", "--methods", "task_arithmetic",
                        "--variant", "dare_p0=dare:p=0.0,combine=task_arithmetic", "--steps", "5",
                        "--lam-grid", "0.5,1.0", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "| dare_p0 |" in capsys.readouterr().out
    js = json.loads(next(out.glob("*.json")).read_text())
    row, ta = js["methods"]["dare_p0"], js["methods"]["task_arithmetic"]
    assert row["method"] == "dare" and row["options"] == {"p": 0.0, "combine": "task_arithmetic"}
    assert row["val_curve"] == ta["val_curve"] and row["test"] == ta["test"]


def test_parse_variant() -> None:
    from taskmerge.errors import OptionError

    assert runner.parse_variant("x=dc_merge:smoothing=linear,rho=5") == ("x", ("dc_merge", {"smoothing": "linear", "rho": 5}))
    assert runner.parse_variant("ties") == ("ties", ("ties", {}))
    with pytest.raises(OptionError, match="key=value"):
        runner.parse_variant("x=ties:keep")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), peak=st.integers(0, 39), stride=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_coarse_to_fine_sweep_finds_the_full_grids_maximum_on_unimodal_curves(n, peak, stride, seed) -> None:
    """On a strictly unimodal validation curve, the coarse-to-fine sweep picks the brute-force arg-max of the
    full grid, with at most ⌈n / s⌉ + 2(s − 1) evaluations."""
    peak = peak % n
    rng = np.random.default_rng(seed)
    up = np.cumsum(rng.random(peak + 1) + 0.01)  # strictly increasing up to the peak, then strictly decreasing
    down = up[-1] - np.cumsum(rng.random(n - peak - 1) + 0.01)
    values = list(np.concatenate([up, down]))
    grid = [round(0.1 * (i + 1), 10) for i in range(n)]
    calls: list[float] = []

    def score(lam):
        calls.append(lam)
        v = values[grid.index(lam)]
        return v, {"t": v}

    lam, best, curve = runner.sweep_lambda(grid, score, stride=stride)
    assert lam == grid[int(np.argmax(values))] and best == max(values)
    assert len(calls) == len(set(calls)) <= -(-n // stride) + 2 * (stride - 1)
    assert [p["lambda"] for p in curve] == calls


def test_coarse_to_fine_sweep_returns_a_point_that_beats_its_neighbours() -> None:
    values = {0.1: 0.5, 0.2: 0.7, 0.3: 0.9, 0.4: 0.95, 0.5: 0.6, 0.6: 0.5, 0.7: 0.99}
    grid = list(values)
    lam, best, curve = runner.sweep_lambda(grid, lambda x: (values[x], {}), stride=2)
    # coarse pass 0.1, 0.3, 0.5, 0.7 -> best 0.7 (0.99); its neighbour 0.6 is evaluated, 0.4 never is
    assert (lam, best) == (0.7, 0.99) and [p["lambda"] for p in curve] == [0.1, 0.3, 0.5, 0.7, 0.6]
    lam, _, _ = runner.sweep_lambda(grid, lambda x: (values[x], {}), patience=1, stride=2)
    # stops after 0.5 (no gain over 0.3), then refines around 0.3: 0.2 and 0.4 -> 0.4
    assert lam == 0.4
    with pytest.raises(ValueError, match="stride"):
        runner.sweep_lambda(grid, lambda x: (values[x], {}), stride=0)
