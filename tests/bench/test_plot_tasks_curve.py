"""The task-count figure script reads the runner's JSONs and writes a PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_tasks_curve.py"


def _script():
    spec = importlib.util.spec_from_file_location("plot_tasks_curve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(n: int, ta: float, ties: float | None) -> dict:
    methods = {"task_arithmetic": {"avg_normalized_test": ta, "ci95": {"avg_normalized_test": [ta - 0.01, ta + 0.02]}}}
    if ties is not None:
        methods["ties"] = {"avg_normalized_test": ties}  # no interval recorded: a zero-length error bar
    return {"meta": {"tasks": [f"t{i}" for i in range(n)]}, "pretrained": {"avg_normalized_test": 0.5},
            "methods": methods}


def test_curves_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    mod = _script()
    for n, ta, ties in ((8, 0.8, 0.82), (14, 0.7, None), (20, 0.6, 0.65)):
        (tmp_path / f"bench_minilm_v2_full_{n}tasks.json").write_text(json.dumps(_result(n, ta, ties)))
    paths = [tmp_path / f"bench_minilm_v2_full_{n}tasks.json" for n in (20, 8, 14)]
    curves = mod.load_curves(paths, ["task_arithmetic", "ties", "tsv_m"])
    expect = [(8, 0.8, 0.79, 0.82), (14, 0.7, 0.69, 0.72), (20, 0.6, 0.59, 0.62)]
    assert [p[0] for p in curves["task_arithmetic"]] == [8, 14, 20]
    assert [p[1:] for p in curves["task_arithmetic"]] == [pytest.approx(e[1:]) for e in expect]
    assert curves["ties"] == [(8, 0.82, 0.82, 0.82), (20, 0.65, 0.65, 0.65)]
    assert curves["pretrained"] == [(n, 0.5, 0.5, 0.5) for n in (8, 14, 20)] and "tsv_m" not in curves
    out = tmp_path / "fig.png"
    assert mod.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
