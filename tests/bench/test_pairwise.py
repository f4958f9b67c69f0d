"""Pairwise paired differences between a table's rows, from the per-example correctness in its JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taskmerge.bench import pairwise
from taskmerge.bench.report import excludes_zero
from taskmerge.bench.runner import pack_correct

SIZES = {"t1": 200, "t2": 150}


def _row(correct: dict[str, np.ndarray], ft: dict[str, np.ndarray]) -> dict:
    norm = {t: c.mean() / ft[t].mean() for t, c in correct.items()}
    return {"correct_test": {t: pack_correct(c) for t, c in correct.items()},
            "avg_normalized_test": float(np.mean(list(norm.values())))}


def _results(rates: dict[str, float], seed: int = 0) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    ft = {t: rng.random(n) < 0.9 for t, n in SIZES.items()}
    rows = {m: {t: rng.random(n) < p for t, n in SIZES.items()} for m, p in rates.items()}
    res = {"meta": {"tasks": list(SIZES), "n_boot": 400, "recipe": {"kind": "full"}, "split_protocol": "v2",
                    "manifests": {t: {"counts": {"test": n}} for t, n in SIZES.items()}},
           "finetuned": {"correct_test": {t: pack_correct(c) for t, c in ft.items()}},
           "methods": {m: _row(c, ft) for m, c in rows.items()}}
    return res, {"ft": ft, **rows}


def test_point_difference_is_the_difference_of_normalized_averages_and_antisymmetric() -> None:
    res, c = _results({"a": 0.5, "b": 0.8, "c": 0.75})
    diffs = pairwise.pairwise_differences(res)
    assert list(diffs) == ["b", "c", "a"]  # ranked best first

    def norm_avg(m: str) -> float:  # closed form: mean over tasks of (accuracy / fine-tuned accuracy)
        return float(np.mean([c[m][t].mean() / c["ft"][t].mean() for t in SIZES]))

    for a in diffs:
        for b in diffs:
            if a == b:
                continue
            d, lo, hi = diffs[a][b]
            assert d == pytest.approx(norm_avg(a) - norm_avg(b), abs=1e-12)
            assert lo <= d <= hi
            assert diffs[b][a] == pytest.approx((-d, -hi, -lo))
    assert excludes_zero(diffs["b"]["a"])  # 30 points on 350 examples: far outside the noise
    assert "a" not in pairwise.tied_with_best(diffs)


def test_identical_rows_are_tied_and_the_report_says_so(tmp_path, capsys) -> None:
    res, _ = _results({"a": 0.7})
    res["methods"]["a_copy"] = dict(res["methods"]["a"])
    diffs = pairwise.pairwise_differences(res)
    assert diffs["a"]["a_copy"] == (0.0, 0.0, 0.0) or diffs["a_copy"]["a"] == (0.0, 0.0, 0.0)
    assert set(pairwise.tied_with_best(diffs)) == {"a", "a_copy"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    assert pairwise.main([str(path), "--out", str(tmp_path / "p.md")]) == 0
    text = (tmp_path / "p.md").read_text()
    assert "Tied with the best" in text and "+0.0 [+0.0, +0.0]" in text


def test_unknown_row_is_named() -> None:
    res, _ = _results({"a": 0.7})
    with pytest.raises(KeyError, match="'zz'"):
        pairwise.pairwise_differences(res, ["a", "zz"])


def test_data_based_table_its_starts_are_rows_and_the_fine_tuned_accuracy_normalizes() -> None:
    """A ``taskmerge.databased.bench`` table: sizes in ``meta.test_counts``, the data-free starts as rows, and
    only the fine-tuned accuracies (no per-example correctness) to normalize by."""
    res, c = _results({"moma": 0.8, "moma_orth": 0.78})
    meta = res["meta"]
    meta["test_counts"] = {t: n for t, n in SIZES.items()}
    del meta["manifests"]
    ft_acc = {t: float(c["ft"][t].mean()) for t in SIZES}
    res["finetuned"] = {"test": ft_acc}
    res["starts"] = {"task_arithmetic": _row({t: np.random.default_rng(5).random(n) < 0.6 for t, n in SIZES.items()},
                                             c["ft"]),
                     "no_correctness": {"avg_normalized_test": 0.99}}
    diffs = pairwise.pairwise_differences(res)
    assert set(diffs) == {"moma", "moma_orth", "task_arithmetic"}  # a start without correctness is no row
    starts = pairwise.correctness(res, res["starts"]["task_arithmetic"])
    d, lo, hi = diffs["moma"]["task_arithmetic"]
    closed = float(np.mean([(c["moma"][t].mean() - starts[t].mean()) / ft_acc[t] for t in SIZES]))
    assert d == pytest.approx(closed, abs=1e-12) and lo <= d <= hi and excludes_zero((d, lo, hi))
    with pytest.raises(KeyError, match="test_counts"):
        pairwise.pairwise_differences({**res, "meta": {k: v for k, v in meta.items() if k != "test_counts"}})
