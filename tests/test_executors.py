"""Executors: the thread pool (order, errors, bounded work in flight, same bytes as a serial merge) and Ray."""

from __future__ import annotations

import importlib.util
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from taskmerge.cli import main
from taskmerge.errors import OptionError
from taskmerge.executors import SerialExecutor, ThreadExecutor, available_cores, default_workers, make_executor
from taskmerge.merge import merge_checkpoints, merged_task_vector


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(50, 24, generator=g)}
    for i in range(4):
        sd[f"layers.{i}.attn.weight"] = torch.randn(24, 24, generator=g)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(60, 24, generator=g)
        sd[f"layers.{i}.norm.weight"] = torch.randn(24, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("family")
    base = _model(0)
    save_file(base, str(root / "base.safetensors"))
    models = []
    for t in range(3):
        g = torch.Generator().manual_seed(10 + t)
        # low-rank-ish updates so SVD-based methods have well separated spectra
        ft = {k: (v.float() + 0.1 * (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[-1], generator=g)
                                     if v.ndim == 2 else 0.1 * torch.randn(v.shape, generator=g))).to(v.dtype)
              for k, v in base.items()}
        save_file(ft, str(root / f"ft{t}.safetensors"))
        models.append(root / f"ft{t}.safetensors")
    return root / "base.safetensors", models


def test_thread_executor_keeps_order_and_bounds_work_in_flight() -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(random.random() * 0.01)
        with lock:
            running[0] -= 1
        return x * x

    with ThreadExecutor(3, intra_op_threads=1) as ex:
        assert list(ex.map(work, range(40))) == [x * x for x in range(40)]
    assert 1 < peak[0] <= 3


def test_thread_executor_runs_items_side_by_side_only_within_the_budget() -> None:
    sizes = [10, 1, 2, 10, 3, 3, 4, 1, 10, 10, 2, 2]
    running, count, seen = [0], [0], []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            running[0] += sizes[i]
            count[0] += 1
            seen.append((running[0], count[0]))
        time.sleep(0.005)
        with lock:
            running[0] -= sizes[i]
            count[0] -= 1
        return i

    with ThreadExecutor(4, intra_op_threads=1) as ex:
        assert list(ex.map(work, range(len(sizes)), cost=lambda i: sizes[i], budget=10)) == list(range(len(sizes)))
    assert max(c for c, _ in seen) <= 10  # never more than the budget in flight ...
    assert max(n for _, n in seen) >= 2  # ... but small items did run side by side


def test_thread_executor_runs_items_over_half_the_budget_alone_with_every_thread() -> None:
    sizes = [2, 2, 9, 1, 6, 3, 5, 5, 10, 1, 1]
    running: list[int] = []
    log: list[tuple[int, int, tuple[int, ...], bool]] = []  # (item, intra-op threads, items in flight, in caller)
    lock = threading.Lock()
    caller = threading.current_thread()

    def work(i: int) -> int:
        with lock:
            running.append(i)
            log.append((i, torch.get_num_threads(), tuple(running), threading.current_thread() is caller))
        time.sleep(0.01)
        with lock:
            running.remove(i)
        return i

    with ThreadExecutor(3, intra_op_threads=1, alone_threads=3) as ex:
        assert list(ex.map(work, range(len(sizes)), cost=lambda i: sizes[i], budget=10)) == list(range(len(sizes)))
    # over half the budget (2, 4, 8), or no neighbour to share the pool with (3: between 9 and 6)
    runs_alone = {2, 3, 4, 8}
    for i, threads, in_flight, in_caller in log:
        if i in runs_alone:  # alone, in the calling thread, every thread
            assert threads == 3 and in_flight == (i,) and in_caller
            assert all(i not in other for j, _, other, _ in log if j != i)
        else:
            assert threads == 1 and not in_caller
    assert any(len(f) > 1 for _, _, f, _ in log)  # the small ones still ran side by side


def test_which_items_run_alone() -> None:
    from taskmerge.executors import _runs_alone

    # ViT-like order: in_proj (big), its bias (negligible), out_proj (no partner: its significant
    # neighbours are big), fc1, fc2 (big), then two mid-sized matrices that pair up
    costs = [1.77, 0.002, 0.59, 0.001, 2.36, 2.36, 0.59, 0.59, 0.003]
    assert _runs_alone(costs, 2.36) == [True, False, True, False, True, True, False, False, False]
    assert _runs_alone([1.0], 1.0) == [True]
    assert _runs_alone([0.2], 1.0) == [True]  # nothing to share with
    assert _runs_alone([0.001, 0.001], 1.0) == [False, False]  # negligible work never claims every core


def test_thread_executor_rejects_bad_thread_counts() -> None:
    with pytest.raises(OptionError, match="alone_threads"):
        ThreadExecutor(2, alone_threads=0)
    with pytest.raises(OptionError, match="intra_op_threads"):
        ThreadExecutor(2, intra_op_threads=-1)


def test_thread_executor_raises_the_first_error_and_sets_threads_back() -> None:
    before = torch.get_num_threads()

    def work(x: int) -> int:
        if x == 5:
            raise ValueError("boom")
        return x

    with ThreadExecutor(2, intra_op_threads=1) as ex:
        with pytest.raises(ValueError, match="boom"):
            list(ex.map(work, range(20)))
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_make_executor() -> None:
    assert isinstance(make_executor("thread", 1), SerialExecutor)
    ex = make_executor("thread", 2)
    assert isinstance(ex, ThreadExecutor) and ex.intra_op_threads * ex.workers <= max(available_cores(), ex.workers)
    assert default_workers(1) == 1 and default_workers(2) == 2 and default_workers(16) == 4
    with pytest.raises(OptionError, match="executor"):
        make_executor("dask")
    with pytest.raises(OptionError, match="workers"):
        make_executor("thread", 0)


@pytest.mark.parametrize(("method", "options"), [("task_arithmetic", {}), ("ties", {"keep": 0.3}),
                                                 ("dare", {"p": 0.5}), ("ties", {"scope": "global"})])
def test_thread_pool_gives_the_bytes_of_a_serial_merge(family, tmp_path: Path, method: str, options: dict) -> None:
    base, models = family
    serial = merge_checkpoints(base, models, tmp_path / "serial.safetensors", method, options, workers=1, progress=False)
    pooled = merge_checkpoints(base, models, tmp_path / "pooled.safetensors", method, options, workers=3, progress=False)
    assert pooled.read_bytes() == serial.read_bytes()


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_thread_pool_svd_methods_match_serial_with_the_same_intra_op_threads(family, tmp_path: Path, method: str) -> None:
    base, models = family
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = merge_checkpoints(base, models, tmp_path / "s.safetensors", method, workers=1, progress=False)
    finally:
        torch.set_num_threads(before)
    with ThreadExecutor(3, intra_op_threads=1, alone_threads=1) as ex:
        pooled = merge_checkpoints(base, models, tmp_path / "p.safetensors", method, progress=False, executor=ex)
    assert pooled.read_bytes() == serial.read_bytes()


def test_in_memory_merge_with_workers(family) -> None:
    from safetensors.torch import load_file

    base, models = family
    b, fts = load_file(str(base)), [load_file(str(m)) for m in models]
    one = merged_task_vector(b, fts, "ties", {"keep": 0.2})
    many = merged_task_vector(b, fts, "ties", {"keep": 0.2}, workers=2)
    assert list(one) == list(many) and all(torch.equal(one[k], many[k]) for k in one)


def test_cli_workers_and_executor_flags(family, tmp_path: Path) -> None:
    base, models = family
    common = ["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "a.safetensors"), "--workers", "2", "--executor", "thread"]) == 0
    assert main([*common, "--output", str(tmp_path / "b.safetensors"), "--workers", "1"]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert main([*common, "--output", str(tmp_path / "c.safetensors"), "--workers", "0"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'taskmerge[ray]')")
def test_ray_executor_on_a_local_two_worker_instance(family, tmp_path: Path) -> None:
    import os

    from taskmerge.executors.ray_executor import RayExecutor

    base, models = family
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray workers run with one intra-op thread
    try:
        serial = {m: merge_checkpoints(base, models, tmp_path / f"s-{m}.safetensors", m, workers=1, progress=False)
                  for m in ("ties", "tsv_m")}
    finally:
        torch.set_num_threads(before)
    def pid_after_a_nap(_: int) -> int:  # local: pickled by value for the workers
        time.sleep(0.3)
        return os.getpid()

    with RayExecutor(workers=2, num_cpus=2) as ex:
        pids = set(ex.map(pid_after_a_nap, range(8)))
        assert len(pids) == 2 and os.getpid() not in pids  # two worker processes did the work
        for m, ref in serial.items():
            out = merge_checkpoints(base, models, tmp_path / f"r-{m}.safetensors", m, progress=False, executor=ex)
            assert out.read_bytes() == ref.read_bytes()

