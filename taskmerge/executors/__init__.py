"""Executors: where the merge engine runs its per-tensor work.

An executor maps a function over the engine's work items (one tensor name each) and yields the
results **in input order**, holding at most a bounded number of items in flight, so that a streaming
merge stays streaming (peak memory ≈ workers × one tensor's working set) and the output is written in
the same order, hence to the same bytes, whatever the executor.

* :class:`SerialExecutor` — one tensor at a time in the calling thread.
* :class:`ThreadExecutor` — a CPU thread pool across tensors (torch releases the GIL in its kernels and
  safetensors in its reads). Tensors that run side by side get ``cores // workers`` intra-op threads
  each, so that ``intra-op threads × workers ≤ cores``; a tensor too large to share the size budget, or
  with no neighbour to share it with, runs alone with every core.
* :class:`taskmerge.executors.ray_executor.RayExecutor` — per-tensor merges spread over a Ray cluster
  (``pip install taskmerge[ray]``), the workers reading the checkpoints from shared storage.

Determinism: every per-tensor computation depends only on the tensor's inputs and its name (the
per-tensor seed), never on the order or thread it runs in. Elementwise methods (task arithmetic, TIES,
DARE, …) give the same bytes whatever the executor and thread count; LAPACK's SVD may differ in the
last bits between *intra-op thread counts*, so SVD-based methods give the same bytes as a serial run
with the same ``torch.set_num_threads`` (for the thread pool: ``intra_op_threads`` equal to
``alone_threads``). Which thread count a tensor gets depends only on its size, never on timing.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import torch

from taskmerge.errors import OptionError

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "available_cores", "default_workers", "make_executor",
           "EXECUTORS"]

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("thread", "ray")


class Executor(Protocol):
    """Maps a function over work items, yielding results in input order (see the module docstring)."""

    workers: int

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cost: Callable[[T], float] | None = None,
            budget: float | None = None) -> Iterator[R]:
        """``fn(item)`` for every item, in order, with a bounded number in flight (and, where supported,
        a bounded total ``cost`` in flight)."""

    def close(self) -> None:
        """Release the workers."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


MAX_DEFAULT_WORKERS = 4


def default_workers(cores: int | None = None) -> int:
    """The default thread-pool size: one worker per core up to 4 (each with ``cores // workers`` intra-op
    threads). Measured on 2 busy cores (LLaMA shapes, ~100M parameters, T = 4): 2 workers × 1 thread
    merged 1.8× (task arithmetic), 1.9× (TIES) and 3.5× (TSV-M) faster than 1 worker × 2 threads,
    whose OpenMP threads wait on each other when the cores are shared. Memory grows with the workers
    (each holds one tensor's working set), hence the cap."""
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


class SerialExecutor:
    """One item at a time, in the calling thread."""

    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cost: Callable[[T], float] | None = None,
            budget: float | None = None) -> Iterator[R]:
        for item in items:
            yield fn(item)

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadExecutor:
    """A thread pool of ``workers`` threads. Items that share the pool run with ``intra_op_threads``
    torch intra-op threads each (default ``max(1, cores // workers)``); an item that runs alone (see
    :meth:`map`) with ``alone_threads`` (default: every core), so that the largest tensors do not leave
    cores idle."""

    def __init__(self, workers: int, intra_op_threads: int | None = None, alone_threads: int | None = None) -> None:
        if workers < 1:
            raise OptionError(f"option workers: must be at least 1, got {workers}")
        for name, value in (("intra_op_threads", intra_op_threads), ("alone_threads", alone_threads)):
            if value is not None and value < 1:
                raise OptionError(f"option {name}: must be at least 1, got {value}")
        self.workers = workers
        self.intra_op_threads = intra_op_threads or max(1, available_cores() // workers)
        self.alone_threads = alone_threads or available_cores()
        self._pool: ThreadPoolExecutor | None = None
        self._saved_threads: int | None = None

    def _start(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.intra_op_threads)
            threads = self.intra_op_threads
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="taskmerge",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        return self._pool

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cost: Callable[[T], float] | None = None,
            budget: float | None = None) -> Iterator[R]:
        """``fn`` over ``items`` on the pool, in order; at most ``workers`` items in flight (not counting
        negligible ones, below :data:`NEGLIGIBLE` of the budget: a bias beside a matrix) and, with
        ``cost`` and ``budget``, a new item starts only while the items in flight cost at most ``budget``
        together (one item always may). The engine passes tensor sizes and the largest size: small tensors
        run side by side, the largest one alone, so the peak memory stays one largest tensor's working
        set whatever the number of workers.

        Some items run *alone* (:func:`_runs_alone`, decided from the costs only, so an item always gets the
        same thread count and SVD-based results do not depend on timing): once the items before it are
        done, in the calling thread, with ``alone_threads`` intra-op threads instead of ``intra_op_threads``
        (otherwise it would hold one core's share of threads while the others idle). The calling thread, because MKL's
        LAPACK runs its threads at full speed only there: a 768-wide ``eigh`` with 2 threads took 0.05 s in
        the main thread and 0.10 s in a pool thread, slower than 1 thread (0.08 s), on the 2-core machine."""
        pool = self._start()
        todo = list(items)
        costs = [float(cost(item)) if cost is not None else 0.0 for item in todo]
        alone = _runs_alone(costs, budget) if budget is not None and self.workers > 1 else [False] * len(todo)
        window: collections.deque[tuple[Future[R], float]] = collections.deque()
        nxt = 0  # the next item to start

        small = budget * NEGLIGIBLE if budget is not None else -1.0

        def fill() -> None:
            nonlocal nxt
            while nxt < len(todo) and not alone[nxt]:
                load = sum(c for _, c in window)
                busy = sum(c >= small for _, c in window)  # negligible items (a bias) do not hold a worker
                if window and (len(window) >= MAX_IN_FLIGHT * self.workers
                               or (costs[nxt] >= small and busy >= self.workers)
                               or (budget is not None and load + costs[nxt] > budget)):
                    return
                window.append((pool.submit(fn, todo[nxt]), costs[nxt]))
                nxt += 1

        try:
            while True:
                fill()
                if window:
                    result = window.popleft()[0].result()
                    fill()  # keep the workers busy while the caller consumes this result
                elif nxt < len(todo):  # runs alone: in this thread, where LAPACK's threads run at full speed
                    torch.set_num_threads(self.alone_threads)
                    try:
                        result = fn(todo[nxt])
                    finally:
                        torch.set_num_threads(self.intra_op_threads)
                    nxt += 1
                else:
                    return
                yield result
                del result
        finally:
            for fut, _ in window:
                fut.cancel()
            for fut, _ in window:
                if not fut.cancelled():
                    try:
                        fut.result()
                    except BaseException:  # noqa: BLE001 - the first error has been raised already
                        pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            if self._saved_threads is not None:
                torch.set_num_threads(self._saved_threads)

    def __enter__(self) -> ThreadExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NEGLIGIBLE = 1 / 64  # items costing less than this fraction of the budget hardly count as work
MAX_IN_FLIGHT = 4  # items in flight per worker, counting negligible ones


def _runs_alone(costs: list[float], budget: float) -> list[bool]:
    """Which items the thread pool runs alone with every core: those costing more than half the budget
    (nothing else fits beside them), and those with no neighbour to share the pool with (the nearest
    non-negligible items before and after it run alone themselves, or there are none), which would
    otherwise run on one core's share of threads while the other cores idle. Items costing less than
    :data:`NEGLIGIBLE` of the budget never run alone and are skipped when looking for neighbours."""
    big = [c > budget / 2 for c in costs]
    significant = [i for i, c in enumerate(costs) if c >= budget * NEGLIGIBLE]
    alone = list(big)
    for pos, i in enumerate(significant):
        if big[i]:
            continue
        before = pos > 0 and not big[significant[pos - 1]]
        after = pos + 1 < len(significant) and not big[significant[pos + 1]]
        alone[i] = not (before or after)
    return alone


def make_executor(kind: str = "thread", workers: int | None = None, **options: Any) -> Executor:
    """An executor by name: ``thread`` (``workers`` threads; serial for one) or ``ray``.

    ``workers=None`` picks :func:`default_workers` for threads and the cluster's CPU count for Ray.
    """
    if kind == "thread":
        n = default_workers() if workers is None else workers
        if n < 1:
            raise OptionError(f"option workers: must be at least 1, got {n}")
        return SerialExecutor() if n == 1 and not options else ThreadExecutor(n, **options)
    if kind == "ray":
        from taskmerge.executors.ray_executor import RayExecutor

        return RayExecutor(workers, **options)
    raise OptionError(f"option executor: expected one of {', '.join(EXECUTORS)}, got {kind!r}")
