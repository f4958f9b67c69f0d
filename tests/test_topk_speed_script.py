"""benchmarks/topk_speed.py: a FusionBench failure is a row of the report, not a crash, and rows are saved as they come."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("topk_speed", ROOT / "benchmarks" / "topk_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task_vectors(source, n_tasks, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(24, 16, generator=gen), "b": torch.randn(16, generator=gen)} for _ in range(n_tasks)]


def test_a_fusionbench_linalg_failure_is_recorded_and_the_run_goes_on(monkeypatch) -> None:
    topk = _load()
    calls = []

    def failing(method, tvs, device):
        calls.append(tvs[0]["w"].dtype)
        if tvs[0]["w"].dtype == torch.float32:  # the float64 reference succeeds, the float32 run does not
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return topk._ours(method, tvs, "exact", "float64")

    monkeypatch.setattr(topk, "load_source", _task_vectors)
    monkeypatch.setattr(topk, "_run_fusionbench", failing)
    saved = []
    args = argparse.Namespace(tasks=3, layers=1, seed=0)
    rows = topk.run_source("vit-power", ["tsv_m", "iso_c"], args, have_fb=True, on_row=saved.append)
    assert saved == rows and [r["method"] for r in rows] == ["tsv_m", "iso_c"]
    assert calls == [torch.float64, torch.float32] * 2
    for row in rows:
        assert row["fusionbench_error"].startswith("LinAlgError: linalg.svd") and "fusionbench_s" not in row
        assert row["exact_vs_float64"] < 1e-5  # our float32 exact route against the float64 run
    table = topk.markdown({"machine": {"cpu": "x", "cpus": 2, "torch": "t", "threads": 2, "load_before": [],
                                       "load_after": []}, "workers": 1, "results": rows})
    assert table.count("failed (LinAlgError) | – | – |") == 2


def test_main_saves_a_partial_report_after_every_row(monkeypatch, tmp_path) -> None:
    topk = _load()
    monkeypatch.setattr(topk, "load_source", _task_vectors)
    seen = []
    real_run_source = topk.run_source

    def spy(*a, **kw):
        inner = kw["on_row"]

        def on_row(row):
            inner(row)
            seen.append(json.loads((tmp_path / "r.json").read_text()))
        return real_run_source(*a, **{**kw, "on_row": on_row})

    monkeypatch.setattr(topk, "run_source", spy)
    monkeypatch.setattr("sys.argv", ["topk_speed.py", "--sources", "vit-power", "--methods", "iso_c", "tsv_m",
                                     "--tasks", "2", "--no-fusionbench", "--json", str(tmp_path / "r.json"),
                                     "--md", str(tmp_path / "r.md")])
    topk.main()
    assert [len(r["results"]) for r in seen] == [1, 2] and not any(r["complete"] for r in seen)
    final = json.loads((tmp_path / "r.json").read_text())
    assert final["complete"] and [r["method"] for r in final["results"]] == ["iso_c", "tsv_m"]
    assert "partial" not in (tmp_path / "r.md").read_text()
