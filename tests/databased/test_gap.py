"""Share of the merge-to-fine-tuned gap closed, next to MOMA's ceiling: hand-computed cases."""

from __future__ import annotations

import math

import pytest

from taskmerge.databased.gap import attach_ceiling, gap_closed, gap_section


def _results() -> dict:
    return {
        "meta": {"tasks": ["a", "b"]},
        "finetuned": {"avg_test": 0.90},
        "starts": {"task_arithmetic": {"lambda": 0.3, "avg_test": 0.70}},
        "methods": {"moma_ta": {"start_method": "task_arithmetic", "start_lambda": 0.3, "avg_test": 0.76,
                                "delta_ci95": {"avg_test": [0.06, 0.02, 0.10]}}},
    }


def _ceiling(lam: float = 0.3, tasks: tuple[str, ...] = ("a", "b")) -> dict:
    return {"meta": {"tasks": list(tasks), "fit_split": "train"},
            "methods": {"task_arithmetic": {"lambda": lam, "average": {
                "finetuned": 0.90, "identity": {"accuracy": 0.70},
                "orthogonal": {"accuracy": 0.74, "gap_closed": 0.2}, "linear": {"accuracy": 0.88, "gap_closed": 0.9}}}}}


def test_gap_closed_closed_form() -> None:
    assert gap_closed(0.7, 0.76, 0.9) == pytest.approx(0.3)
    assert gap_closed(0.7, 0.9, 0.9) == pytest.approx(1.0)
    assert math.isnan(gap_closed(0.9, 0.95, 0.9))  # nothing to close


def test_section_rows_against_hand_computation() -> None:
    res = attach_ceiling(_results(), _ceiling(), "c.json")
    row = next(line for line in gap_section(res) if line.startswith("| moma_ta"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # (0.76 − 0.70) / 0.20 = 30 %, interval 0.02 / 0.20 … 0.10 / 0.20; orthogonal 0.04 / 0.20; linear 0.18 / 0.20;
    # the row's gain 0.06 over the rotation's 0.04 = 150 %.
    assert cells == ["moma_ta", "task_arithmetic (0.3)", "70.0", "76.0", "30 % [10 %, 50 %]", "20 %", "90 %", "150 %"]


def test_rows_without_a_ceiling_show_only_their_own_share() -> None:
    res = _results()
    row = next(line for line in gap_section(res) if line.startswith("| moma_ta"))
    assert row.count("–") == 3 and "30 % [10 %, 50 %]" in row


@pytest.mark.parametrize("ceiling, match", [(_ceiling(lam=0.5), "λ"), (_ceiling(tasks=("a", "c")), "tasks")])
def test_a_ceiling_of_another_merge_is_refused(ceiling: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attach_ceiling(_results(), ceiling, "c.json")
