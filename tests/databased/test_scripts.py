"""benchmarks/databased_step.py and scripts/moma_ceiling.py on the tiny backbone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(relative: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = _load("benchmarks/databased_step.py")
    out = tmp_path / "step.json"
    assert step.main(["--backbone", "tiny", "--methods", "adamerging,moma", "--steps", "2", "--warmup", "1",
                      "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backbone"] == "tiny" and res["tasks"] == ["toy_letters", "toy_length"]
    assert set(res["floors"]) == {"16", "24"}  # AdaMerging's batch and MOMA's (text)
    for name, r in res["methods"].items():
        floor = res["floors"][str(r["batch_size"])]
        assert r["floor"] == floor and all(v > 0 for v in floor.values())
        assert r["ratio_to_floor"] == pytest.approx(r["median_step_seconds"] / floor["packed"])
        assert r["default_steps"] == {"adamerging": 500, "moma": 1000}[name]
    assert "| moma | 24 |" in capsys.readouterr().out


def test_synthetic_tasks_move_every_floating_tensor() -> None:
    step = _load("benchmarks/databased_step.py")
    base = {"w": torch.randn(4, 3), "n": torch.arange(3)}
    (sd,) = step.synthetic_tasks(base, 1)
    assert not torch.equal(sd["w"], base["w"]) and torch.equal(sd["n"], base["n"])
    assert float((sd["w"] - base["w"]).std()) == pytest.approx(1e-3 * float(base["w"].std()), rel=0.8)


def test_moma_ceiling_script_on_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKMERGE_CACHE", str(tmp_path / "cache"))
    ceiling = _load("scripts/moma_ceiling.py")
    from taskmerge.bench.finetune import Recipe

    res = ceiling.run("tiny", "toy_letters,toy_length", Recipe(steps=10, lr=1e-3),
                      lambdas={"task_arithmetic": 0.5, "ties": 1.0}, methods=["task_arithmetic", "ties"],
                      progress=False)
    for m, r in res["methods"].items():
        avg = r["average"]
        for t, row in r["tasks"].items():
            # the exact maps fit at least as well as the merge as is; least squares at least as well as a rotation
            assert row["linear"]["residual_fit"] <= row["orthogonal"]["residual_fit"] + 1e-9
            assert 0.0 <= row["orthogonal"]["accuracy"] <= 1.0
        assert avg["identity"]["accuracy"] == pytest.approx(sum(x["identity"]["accuracy"] for x in r["tasks"].values()) / 2)
    text = ceiling.markdown(res)
    assert "| task_arithmetic (0.5) |" in text and "gap closed" in text
    with pytest.raises(ValueError, match="no λ"):
        ceiling.run("tiny", "toy_letters", Recipe(steps=10, lr=1e-3), methods=["weight_averaging"], progress=False)
