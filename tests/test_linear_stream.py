"""The one-pass route of linear methods (task arithmetic, weight averaging) against the stacked arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmerge.errors import CheckpointError, OptionError
from taskmerge.io.readers import DictSource
from taskmerge.linear_stream import linear_combination, stream_linear
from taskmerge.merge import _linear_divisor, MergeRequest, merged_task_vector
from taskmerge.selection import TensorClass


def _family(shape: tuple[int, ...], tasks: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    models = [(base.float() + 1e-2 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(tasks)]
    return base, models


def _stacked(base: torch.Tensor, models: list[torch.Tensor], weights=None) -> torch.Tensor:
    """The arithmetic written out: Δ_t = fl(θ_t − θ₀) in float32, times w_t, summed over t from left to right."""
    total = None
    for t, m in enumerate(models):
        d = m.float() - base.float()
        if weights is not None:
            d = d * weights[t]
        total = d if total is None else total + d
    return total


@settings(max_examples=25, deadline=None)
@given(
    numel=st.integers(1, 700),
    tasks=st.integers(1, 6),
    chunk=st.integers(1, 300),
    bf16=st.booleans(),
    weighted=st.booleans(),
)
def test_linear_combination_is_the_stacked_sum_bitwise(numel, tasks, chunk, bf16, weighted):
    base, models = _family((numel,), tasks, torch.bfloat16 if bf16 else torch.float32, seed=numel)
    weights = [0.5 + 0.25 * t for t in range(tasks)] if weighted else None
    got = linear_combination(base, models, weights=weights, chunk=chunk)
    assert torch.equal(got, _stacked(base, models, weights))
    mean = linear_combination(base, models, divisor=float(tasks), weights=weights, chunk=chunk)
    assert torch.equal(mean, _stacked(base, models, weights).div(tasks))


@pytest.mark.parametrize("method,divide", [("task_arithmetic", False), ("weight_averaging", True)])
def test_engine_streams_linear_methods_with_the_stacked_result(method, divide):
    shapes = {"w": (17, 23), "b": (23,), "e": (5, 3, 2)}
    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    models = [{k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    req = MergeRequest.build(method)
    assert _linear_divisor(req, TensorClass.MATRIX, [DictSource(m) for m in models]) == (3.0 if divide else 1.0)
    merged = merged_task_vector(base, models, method, workers=2)
    for k in shapes:
        want = _stacked(base[k], [m[k] for m in models])
        assert torch.equal(merged[k], want / 3 if divide else want), k
        # the stacked route (the per-layer function on the (T, *shape) stack) agrees to float rounding
        stack = torch.stack([m[k] - base[k] for m in models])
        torch.testing.assert_close(merged[k], req.spec.fn(stack, req.options, None), rtol=1e-6, atol=1e-7)


def test_weights_multiply_each_update():
    base, models = _family((40,), 3)
    got = merged_task_vector({"x": base}, [{"x": m} for m in models], "task_arithmetic", weights=[1.0, -2.0, 0.5])
    assert torch.equal(got["x"], _stacked(base, models, [1.0, -2.0, 0.5]))


def test_non_finite_inputs_are_blamed_on_their_file():
    base, models = _family((10,), 3)
    sources = [DictSource({"x": m}, f"model{i}.safetensors") for i, m in enumerate(models)]
    kwargs = dict(divisor=1.0, weights=None, dtype=torch.float32, device=torch.device("cpu"),
                  base_location="base.safetensors", method="task_arithmetic")
    models[1][4] = float("inf")
    with pytest.raises(CheckpointError, match="model1.safetensors.*'x'"):
        stream_linear("x", base, sources, **kwargs)
    models[1][4] = 0.0
    bad_base = base.clone()
    bad_base[2] = float("nan")
    with pytest.raises(CheckpointError, match="base.safetensors.*base model"):
        stream_linear("x", bad_base, sources, **kwargs)
    # a zero weight does not hide a NaN: 0 · NaN is NaN
    models[2][0] = float("nan")
    with pytest.raises(CheckpointError, match="model2.safetensors"):
        stream_linear("x", base, sources, **dict(kwargs, weights=[1.0, 1.0, 0.0]))


def test_a_sum_that_overflows_is_the_methods_fault():
    big = torch.full((4,), 3e38)
    sources = [DictSource({"x": big}, f"m{i}") for i in range(2)]
    with pytest.raises(OptionError, match="task_arithmetic.*NaN or Inf"):
        stream_linear("x", torch.zeros(4), sources, divisor=1.0, weights=None, dtype=torch.float32,
                      device=torch.device("cpu"), base_location="base", method="task_arithmetic")


def test_non_linear_methods_and_exact_sources_take_the_stacked_route():
    models = [DictSource({"x": torch.zeros(2)})]
    assert _linear_divisor(MergeRequest.build("ties"), TensorClass.MATRIX, models) is None

    class Exact(DictSource):
        def task_update(self, name, dtype=torch.float32):
            return torch.zeros(2, dtype=dtype)

    assert _linear_divisor(MergeRequest.build("task_arithmetic"), TensorClass.MATRIX, [Exact({"x": torch.zeros(2)})]) is None
