"""The benchmark's sweep of a method's own hyper-parameter (``option_grid``) instead of λ, with a fake merge
and a fake validation scorer (no model): the choice is checked against a brute-force argmax of the scorer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from taskmerge.bench.option_sweep import sweep_option, swept_option
from taskmerge.registry import get_method

VALUES = (1.0, 1.4, 1.8, 2.2, 3.0)


def _fake(peak: float, table: dict[float, float] | None = None):
    """merge(v) -> τ = {"w": [v]}; score(τ) peaks at ``peak`` (or reads ``table``), per-task dict alongside."""
    merged: list[float] = []

    def merge(value: float) -> dict[str, torch.Tensor]:
        merged.append(value)
        return {"w": torch.tensor([value], dtype=torch.float64)}

    def score(tau: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        v = float(tau["w"][0])
        s = table[v] if table is not None else 1.0 - (v - peak) ** 2
        return s, {"task": s}

    return merge, score, merged


@pytest.mark.parametrize("peak", [0.0, 1.7, 2.3, 9.0])
def test_sweep_option_keeps_the_best_value_its_tau_and_the_whole_curve(peak):
    merge, score, merged = _fake(peak)
    found = sweep_option("alpha", VALUES, merge, score)
    expected = max(VALUES, key=lambda v: 1.0 - (v - peak) ** 2)  # brute force over the grid
    assert found.option == "alpha" and found.value == expected
    assert float(found.tau["w"][0]) == expected  # the τ merged with the chosen value, not the last one
    assert found.score == pytest.approx(1.0 - (expected - peak) ** 2)
    assert merged == list(VALUES)  # one merge per value, in grid order
    assert [p["alpha"] for p in found.curve] == list(VALUES)
    assert [p["avg_normalized_val"] for p in found.curve] == pytest.approx([1.0 - (v - peak) ** 2 for v in VALUES])
    assert all(p["val"] == {"task": p["avg_normalized_val"]} and p["merge_seconds"] >= 0 for p in found.curve)
    assert found.merge_seconds == pytest.approx(sum(p["merge_seconds"] for p in found.curve) / len(VALUES))


def test_sweep_option_ties_go_to_the_first_value_and_an_empty_grid_is_an_error():
    table = {1.0: 0.5, 1.4: 0.8, 1.8: 0.8, 2.2: 0.1, 3.0: 0.8}
    merge, score, _ = _fake(0.0, table)
    assert sweep_option("alpha", VALUES, merge, score).value == 1.4
    with pytest.raises(ValueError, match="alpha"):
        sweep_option("alpha", (), merge, score)


def test_swept_option_only_for_a_single_unit_lambda_grid_and_an_unfixed_option():
    spec = SimpleNamespace(option_grid=("alpha", VALUES))
    assert swept_option(spec, [1.0], {}) == ("alpha", VALUES)
    assert swept_option(spec, (1,), None) == ("alpha", VALUES)
    assert swept_option(spec, [0.5, 1.0], {}) is None  # an explicit λ grid: a plain λ sweep
    assert swept_option(spec, [0.3], {}) is None
    assert swept_option(spec, [1.0], {"alpha": 2.0}) is None  # the option is fixed by the caller
    assert swept_option(SimpleNamespace(), [1.0], {}) is None  # a spec without option_grid (stand-in API)
    assert swept_option(SimpleNamespace(option_grid=None), [1.0], {}) is None


def test_registered_methods_alignmerge_b_sweeps_alpha_and_task_arithmetic_sweeps_lambda():
    b = get_method("alignmerge_b")
    assert b.lambda_grid == (1.0,) and b.default_lambda == 1.0
    assert swept_option(b, b.lambda_grid, {}) == ("alpha", VALUES)  # resolved.md §AlignMerge 2
    ta = get_method("task_arithmetic")
    assert swept_option(ta, ta.lambda_grid, {}) is None
    wa = get_method("weight_averaging")  # λ grid (1.0,) but no option of its own to sweep
    assert swept_option(wa, wa.lambda_grid, {}) is None


def test_table_names_the_swept_option_beside_lambda():
    from taskmerge.bench.report import choice_cell as _choice_cell

    assert _choice_cell({"lambda": 0.25}) == "0.25"
    assert _choice_cell({"lambda": 1.0, "chosen_option": {"alpha": 1.8}}) == "1 (alpha = 1.8)"
