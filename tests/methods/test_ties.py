"""TIES-Merging: hand-worked examples, a brute-force re-implementation, and global vs per-tensor trimming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.errors import OptionError
from taskmerge.methods.ties import (
    TiesGlobalState,
    disjoint_mean,
    ties_elect_sign,
    ties_merge,
    ties_trim,
)
from taskmerge.registry import LayerContext, get_method

SPEC = get_method("ties")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- hand-worked example (keep 50 % of 6 → 3)
DELTAS = [
    [4.0, -1.0, 0.5, -3.0, 2.0, 0.2],
    [-2.0, 3.0, 1.0, 3.5, -0.5, 0.3],
    [1.0, -5.0, 2.0, 6.0, 0.1, -2.5],
]
# trim (top 3 magnitudes per row):
TRIMMED = [
    [4.0, 0.0, 0.0, -3.0, 2.0, 0.0],
    [-2.0, 3.0, 0.0, 3.5, 0.0, 0.0],
    [0.0, -5.0, 0.0, 6.0, 0.0, -2.5],
]
# column sums 2, -2, 0, 6.5, 2, -2.5 → signs +, -, 0, +, +, -; the 0 takes the majority sign (sum of signs = 1 → +)
SIGNS = [1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
# disjoint mean over agreeing non-zero entries: {4}, {-5}, {}, {3.5, 6}, {2}, {-2.5}
MERGED = [4.0, -5.0, 0.0, 4.75, 2.0, -2.5]


def test_ties_hand_worked_example() -> None:
    d = _t(DELTAS)
    trimmed = ties_trim(d, 0.5)
    torch.testing.assert_close(trimmed, _t(TRIMMED), rtol=0, atol=0)
    torch.testing.assert_close(ties_elect_sign(trimmed), torch.tensor(SIGNS, dtype=torch.float64), rtol=0, atol=0)
    expected = torch.tensor(MERGED, dtype=torch.float64)
    torch.testing.assert_close(disjoint_mean(trimmed, ties_elect_sign(trimmed)), expected)
    torch.testing.assert_close(ties_merge(d, keep=0.5), torch.tensor(MERGED, dtype=torch.float64))
    out = SPEC.fn(d, SPEC.parse({"keep": 0.5}), LayerContext(name="w"))
    torch.testing.assert_close(out, torch.tensor(MERGED, dtype=torch.float64))


def test_ties_trim_is_over_all_non_task_dims() -> None:
    d = _t(DELTAS).reshape(3, 2, 3)
    torch.testing.assert_close(ties_trim(d, 0.5), _t(TRIMMED).reshape(3, 2, 3), rtol=0, atol=0)


def test_trim_ties_go_to_the_lowest_index() -> None:
    d = _t([[1.0, -1.0, 1.0, 1.0], [0.0, 2.0, 2.0, -2.0]])
    torch.testing.assert_close(ties_trim(d, 0.5), _t([[1.0, -1.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0]]), rtol=0, atol=0)


def test_exact_cancellation_takes_the_majority_sign() -> None:
    # column 0: +2 and -2 cancel → majority sign (+, from column 1) → only the +2 is averaged
    d = _t([[2.0, 1.0], [-2.0, 1.0]])
    torch.testing.assert_close(ties_merge(d, keep=1.0), torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_keep_at_least_one_entry_and_keep_one_means_no_trim() -> None:
    d = _t([[0.1, -0.3, 0.2]])
    torch.testing.assert_close(ties_trim(d, 0.01), _t([[0.0, -0.3, 0.0]]), rtol=0, atol=0)
    assert ties_trim(d, 1.0) is d


def _brute_ties(d: np.ndarray, keep: float) -> np.ndarray:
    """TIES by plain loops: stable top-k per task (ties → lower index), sign by mass, disjoint mean."""
    t, n = d.shape
    k = n if keep >= 1 else max(1, min(n, math.floor(keep * n + 0.5)))
    trimmed = np.zeros_like(d)
    for i in range(t):
        order = sorted(range(n), key=lambda j: (-abs(d[i, j]), j))
        for j in order[:k]:
            trimmed[i, j] = d[i, j]
    signs = []
    for j in range(n):
        s = sum(trimmed[i, j] for i in range(t))
        signs.append(1.0 if s > 0 else (-1.0 if s < 0 else 0.0))
    total = sum(signs)
    majority = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
    signs = [majority if s == 0 else s for s in signs]
    out = np.zeros(n)
    for j in range(n):
        vals = [trimmed[i, j] for i in range(t) if trimmed[i, j] * signs[j] > 0]
        out[j] = sum(vals) / len(vals) if vals else 0.0
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    t=st.integers(1, 4),
    n=st.integers(1, 12),
    keep=st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.8, 1.0]),
)
def test_ties_matches_a_brute_force_implementation(data, t: int, n: int, keep: float) -> None:
    # small integers: many exact ties, zeros and cancellations
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=t * n, max_size=t * n))
    d = np.array(vals, dtype=np.float64).reshape(t, n)
    got = ties_merge(torch.tensor(d), keep=keep).numpy()
    np.testing.assert_allclose(got, _brute_ties(d, keep), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- global vs per-tensor scope
A = [[10.0, 9.0, 8.0, 7.0], [-1.0, 1.0, -1.0, 1.0]]
B = [[1.0, 2.0, 3.0, 4.0], [5.0, -6.0, 7.0, -8.0]]


def _run_global(tensors: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    opts = SPEC.parse({"keep": keep, "scope": "global"})
    stat = SPEC.statistic_for(opts)
    assert stat is not None
    state = None
    for _ in range(2):  # a histogram pass, then the threshold's bucket (the engine's loop over AnotherPass)
        collected = {name: stat.collect(name, d, opts, LayerContext(name=name, state=state)) for name, d in tensors.items()}
        state = stat.finalize(collected, opts)
        if isinstance(state, TiesGlobalState):
            break
    assert isinstance(state, TiesGlobalState)
    return {name: SPEC.fn(d, opts, LayerContext(name=name, state=state)) for name, d in tensors.items()}


def test_global_and_tensor_scope_differ_on_a_crafted_example() -> None:
    a, b = _t(A), _t(B)
    tensor_opts = SPEC.parse({"keep": 0.5})
    assert SPEC.statistic_for(tensor_opts) is None
    # per tensor, keep 2 of 4 per task:
    #   a: task 1 → [10, 9, 0, 0]; task 2 (all |1|, ties → first two) → [-1, 1, 0, 0];
    #      signs [+, +, 0, 0] → zeros take majority + → disjoint means [10, (9+1)/2, 0, 0]
    #   b: task 1 → [0, 0, 3, 4]; task 2 → [0, 0, 7, -8]; sums [0, 0, 10, -4], majority 0
    #      → [0, 0, (3+7)/2, -8]
    out_a = SPEC.fn(a, tensor_opts, LayerContext(name="a"))
    out_b = SPEC.fn(b, tensor_opts, LayerContext(name="b"))
    torch.testing.assert_close(out_a, torch.tensor([10.0, 5.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out_b, torch.tensor([0.0, 0.0, 5.0, -8.0], dtype=torch.float64))
    # globally, keep 4 of 8 per task: task 1's top 4 are all in a, task 2's all in b
    out = _run_global({"a": a, "b": b}, 0.5)
    torch.testing.assert_close(out["a"], torch.tensor([10.0, 9.0, 8.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([5.0, -6.0, 7.0, -8.0], dtype=torch.float64))


def test_global_ties_at_the_threshold_are_allotted_by_name_then_index() -> None:
    out = _run_global({"b": _t([[1.0, 1.0]]), "a": _t([[1.0, -1.0, 0.5]])}, 0.4)  # 5 entries, keep 2
    torch.testing.assert_close(out["a"], torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.0], dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), t=st.integers(1, 3), n1=st.integers(1, 6), n2=st.integers(1, 6),
       keep=st.sampled_from([0.2, 0.5, 0.7]))
def test_global_scope_equals_per_tensor_trim_of_the_concatenation(data, t: int, n1: int, n2: int, keep: float) -> None:
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=t * (n1 + n2), max_size=t * (n1 + n2)))
    d = np.array(vals, dtype=np.float64).reshape(t, n1 + n2)
    # name order "a" < "b" = concatenation order, so the global trim is the brute-force trim of the concatenation
    out = _run_global({"b": torch.tensor(d[:, n1:]), "a": torch.tensor(d[:, :n1])}, keep)
    kept = np.zeros_like(d)
    k = max(1, min(d.shape[1], math.floor(keep * d.shape[1] + 0.5)))
    for i in range(t):
        for j in sorted(range(d.shape[1]), key=lambda j: (-abs(d[i, j]), j))[:k]:
            kept[i, j] = d[i, j]
    for name, sl in (("a", slice(0, n1)), ("b", slice(n1, None))):
        part = torch.tensor(kept[:, sl])
        expected = disjoint_mean(part, ties_elect_sign(part))
        torch.testing.assert_close(out[name], expected)


def test_options_are_validated() -> None:
    with pytest.raises(OptionError, match="keep"):
        SPEC.parse({"keep": 0.0})
    with pytest.raises(OptionError, match="scope"):
        SPEC.parse({"scope": "model"})
    assert SPEC.default_lambda == 1.0 and 0.8 in SPEC.lambda_grid and 2.5 in SPEC.lambda_grid


def test_global_scope_through_the_merge_engine() -> None:
    # the engine's statistics pass feeds the model-wide threshold to every tensor (same crafted example)
    from taskmerge.merge import merged_task_vector
    from taskmerge.selection import TensorPolicy

    base = {"a.weight": torch.zeros(4, dtype=torch.float64), "b.weight": torch.zeros(4, dtype=torch.float64)}
    tasks = [{"a.weight": _t(A)[i], "b.weight": _t(B)[i]} for i in range(2)]
    tau = merged_task_vector(base, tasks, "ties", {"keep": 0.5, "scope": "global"},
                             policy=TensorPolicy(exclude=()), compute_dtype=torch.float64)
    torch.testing.assert_close(tau["a.weight"], torch.tensor([10.0, 9.0, 8.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(tau["b.weight"], torch.tensor([5.0, -6.0, 7.0, -8.0], dtype=torch.float64))


# ---------------------------------------------------------------- the memory-lean k-th largest
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 1_000_003, 5_000_000])
def test_kth_largest_on_long_rows_matches_a_full_sort(dtype: torch.dtype, k: int) -> None:
    """Above the direct-kthvalue size the histogram route runs; it must equal the sorted order statistic,
    with heavy ties (rounded values) and zeros in the row."""
    from taskmerge.methods import ties as ties_module

    g = torch.Generator().manual_seed(k)
    n = ties_module._KTHVALUE_MAX + 1_000_001
    values = torch.randn(n, generator=g, dtype=torch.float64).abs()
    values[: n // 10] = torch.round(values[: n // 10] * 8) / 8  # many exact ties
    values[-1000:] = 0.0
    values = values.to(dtype)
    expected = np.sort(values.numpy())[::-1][k - 1]
    assert float(ties_module.kth_largest(values, k)) == float(expected)


def test_lean_trim_keeps_exactly_k_on_a_long_tied_row() -> None:
    """Per-task trimming of a row long enough for the histogram route: exactly k survivors, the largest."""
    from taskmerge.methods import ties as ties_module

    n = ties_module._KTHVALUE_MAX + 12_345
    g = torch.Generator().manual_seed(3)
    d = torch.round(torch.randn(2, n, generator=g) * 4) / 4  # coarse values: thousands tied at the threshold
    out = ties_trim(d, 0.2)
    k = round(0.2 * n)
    for t in range(2):
        kept = out[t] != 0
        assert int(kept.sum()) == k
        mags = d[t].abs()
        assert float(mags[kept].min()) >= float(mags[~kept].max())
        torch.testing.assert_close(out[t][kept], d[t][kept])


# ---------------------------------------------------------------- the streaming global statistic
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_threshold_matches_a_full_sort_of_the_model(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    sizes = {"w1": (300, 200), "w2": (50,), "w3": (400, 100)}
    tensors = {n: torch.randn(3, *s, generator=g, dtype=dtype) for n, s in sizes.items()}
    tensors["w2"][:, :10] = 0.25  # exact ties across tensors, some at the threshold
    tensors["w3"][:, :500] = 0.25
    out = _run_global(tensors, 0.3)
    names = sorted(tensors)
    flat = torch.cat([tensors[n].reshape(3, -1) for n in names], dim=1)
    k = max(1, math.floor(0.3 * flat.shape[1] + 0.5))
    kept = torch.zeros_like(flat)
    for t in range(3):  # brute force: stable sort by magnitude, ties to the lower position in name order
        order = sorted(range(flat.shape[1]), key=lambda j: (-abs(float(flat[t, j])), j))[:k]
        kept[t, order] = flat[t, order]
    start = 0
    for n in names:
        size = tensors[n][0].numel()
        part = kept[:, start:start + size].reshape(tensors[n].shape)
        torch.testing.assert_close(out[n], disjoint_mean(part, ties_elect_sign(part)), rtol=0, atol=0)
        start += size


def test_global_statistic_summaries_are_small() -> None:
    # what the statistics passes hold is a histogram and one bucket's entries, not T × P magnitudes
    opts = SPEC.parse({"keep": 0.2, "scope": "global"})
    stat = SPEC.statistic_for(opts)
    d = torch.randn(2, 1000, 1000, generator=torch.Generator().manual_seed(0))
    first = stat.collect("w", d, opts, LayerContext(name="w"))
    assert sum(idx.numel() + cnt.numel() for idx, cnt in first) < 0.05 * d.numel()
    state = stat.finalize({"w": first}, opts)
    second = stat.collect("w", d, opts, LayerContext(name="w", state=state))
    assert sum(v.numel() + c.numel() for v, c in second) < 0.02 * d.numel()
    assert isinstance(stat.finalize({"w": second}, opts), TiesGlobalState)


def test_global_threshold_on_coarsely_rounded_updates() -> None:
    # bf16-rounded updates: few distinct magnitudes, so thousands of entries tie in the threshold's bucket
    g = torch.Generator().manual_seed(5)
    tensors = {n: torch.randn(2, 60, 70, generator=g).bfloat16().float() for n in ("a", "b", "c")}
    out = _run_global(tensors, 0.25)
    flat = torch.cat([tensors[n].reshape(2, -1) for n in sorted(tensors)], dim=1)
    k = math.floor(0.25 * flat.shape[1] + 0.5)
    kept = torch.zeros_like(flat)
    for t in range(2):
        order = torch.tensor(sorted(range(flat.shape[1]), key=lambda j: (-abs(float(flat[t, j])), j))[:k])
        kept[t, order] = flat[t, order]
    for i, n in enumerate(sorted(tensors)):
        part = kept[:, i * 4200:(i + 1) * 4200].reshape(2, 60, 70)
        torch.testing.assert_close(out[n], disjoint_mean(part, ties_elect_sign(part)), rtol=0, atol=0)
