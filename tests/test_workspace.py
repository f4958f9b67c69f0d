"""The engine's reusable stacks: buffers are reused, capped, and never leak into a result."""

from __future__ import annotations

import pytest
import torch

from taskmerge import registry
from taskmerge.merge import merged_task_vector
from taskmerge.registry import MethodOptions, MethodSpec
from taskmerge.selection import TensorPolicy
from taskmerge.workspace import StackPool

CPU = torch.device("cpu")


def test_a_given_back_buffer_is_reused_for_a_smaller_stack() -> None:
    pool = StackPool()
    a = pool.take((4, 10, 10), torch.float32, CPU)
    ptr = a.data_ptr()
    pool.give_back(a)
    b = pool.take((4, 5, 5), torch.float32, CPU)
    assert b.data_ptr() == ptr and b.shape == (4, 5, 5)
    c = pool.take((4, 5, 5), torch.float32, CPU)  # the only free buffer is lent out: a new one
    assert c.data_ptr() != ptr
    d = pool.take((2, 3), torch.float64, CPU)  # another dtype never gets a float32 buffer
    assert d.dtype == torch.float64 and d.shape == (2, 3)


def test_held_buffers_never_exceed_the_largest_stack() -> None:
    import random

    rng = random.Random(0)
    pool = StackPool()
    lent: list[torch.Tensor] = []
    largest = 0
    for _ in range(300):
        if lent and (len(lent) >= 3 or rng.random() < 0.5):
            pool.give_back(lent.pop(rng.randrange(len(lent))))
            free = sum(b.numel() * 4 for b in pool._free)
            out = sum(t.numel() * 4 for t in lent)
            assert free == 0 or free + out <= largest  # what it keeps fits in the largest stack
        else:
            n = rng.choice([5, 20, 30, 100, 7])
            largest = max(largest, 4 * n)
            lent.append(pool.take((n,), torch.float32, CPU))
    assert pool._free  # and it did keep buffers


def test_holds_sees_views_of_lent_buffers_only() -> None:
    pool = StackPool()
    s = pool.take((3, 4), torch.float32, CPU)
    assert pool.holds(s[1]) and not pool.holds(s[1].clone())
    pool.give_back(s)
    assert not pool.holds(s[1])


def test_pool_pickles_empty() -> None:
    import pickle

    pool = StackPool()
    pool.give_back(pool.take((8,), torch.float32, CPU))
    assert pickle.loads(pickle.dumps(pool))._free == []


class _NoOptions(MethodOptions):
    pass


def _first_task(deltas: torch.Tensor, options: MethodOptions, ctx: registry.LayerContext) -> torch.Tensor:
    return deltas[0]  # a view of the engine's stack


@pytest.fixture()
def first_task_method(monkeypatch: pytest.MonkeyPatch) -> str:
    name = "_test_first_task"
    monkeypatch.setitem(registry._REGISTRY, name, MethodSpec(name, _first_task, _NoOptions, paper="test", summary="τ_1"))
    return name


def test_a_method_returning_a_view_of_its_input_gets_its_own_result(first_task_method: str) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {f"layer.{i}.weight": (16, 8) for i in range(4)}  # same size: every stack reuses one buffer
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tasks = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    tau = merged_task_vector(base, tasks, first_task_method, policy=TensorPolicy(exclude=()))
    for name in shapes:  # each result is τ_1 of its own tensor, not the last stack's contents
        torch.testing.assert_close(tau[name], tasks[0][name] - base[name], rtol=0, atol=0)
