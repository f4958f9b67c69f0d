"""Per-tensor merges on a Ray cluster (``pip install taskmerge[ray]``).

The driver (the ``taskmerge merge`` process) plans the output, runs the model-level statistics pass
and writes every shard; Ray tasks compute the merged tensors. Each task receives the engine's
per-tensor function once per map (``ray.put``, cached in the worker process) and a tensor name; the
function re-opens the checkpoints *by path* in the worker, so every node must see the inputs at the
same paths (shared storage: NFS, a parallel file system, or identical copies). Results come back to
the driver in input order, at most ``2 × workers`` in flight.

On one machine, ``--executor ray`` starts a local Ray instance. On a cluster, start Ray on every node
(``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others), then on the head::

    RAY_ADDRESS=auto taskmerge merge merge.yaml --executor ray --workers 64 --resume

Each task takes one CPU (``num_cpus=1``; Ray sets ``OMP_NUM_THREADS=1`` in its workers), so
``--workers`` tensors are merged at once. The ``cuda`` device is not supported with Ray.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from taskmerge.errors import OptionError

__all__ = ["RayExecutor"]

T = TypeVar("T")
R = TypeVar("R")

_FN_CACHE: collections.OrderedDict[str, Callable[[Any], Any]] = collections.OrderedDict()
_REMOTE: Any = None


def _call(key: str, boxed: list[Any], item: Any) -> Any:
    """Run in a Ray worker: the cached function (fetched once per worker and map) on one item."""
    fn = _FN_CACHE.get(key)
    if fn is None:
        import ray

        fn = ray.get(boxed[0])
        _FN_CACHE[key] = fn
        while len(_FN_CACHE) > 4:
            _FN_CACHE.popitem(last=False)
    return fn(item)


def _remote() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=1, max_retries=2)(_call)
    return _REMOTE


class RayExecutor:
    """Maps over a Ray cluster (see the module docstring).

    Args:
        workers: tasks in flight at once (default: the cluster's CPU count).
        address: a Ray cluster address; default: ``RAY_ADDRESS`` if set, else a new local instance.
        **init: further ``ray.init`` arguments for a local instance (e.g. ``num_cpus=2``).
    """

    def __init__(self, workers: int | None = None, address: str | None = None, **init: Any) -> None:
        try:
            import ray
        except ImportError:
            raise OptionError("option executor: 'ray' needs Ray (pip install 'taskmerge[ray]')") from None
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            init.setdefault("include_dashboard", False)
            init.setdefault("log_to_driver", False)
            ray.init(address=address, **init)
            self._owns = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if workers is not None and workers < 1:
            raise OptionError(f"option workers: must be at least 1, got {workers}")
        self.workers = workers or max(1, cpus)

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cost: Callable[[T], float] | None = None,
            budget: float | None = None) -> Iterator[R]:
        """As :meth:`taskmerge.executors.ThreadExecutor.map`; ``cost`` / ``budget`` are ignored (each task
        runs in its own worker process; the driver holds only finished results)."""
        ray = self._ray
        ref = ray.put(fn)
        key = ref.hex()
        remote = _remote()
        window: collections.deque[Any] = collections.deque()
        it = iter(items)
        limit = 2 * self.workers
        try:
            for item in it:
                window.append(remote.remote(key, [ref], item))
                if len(window) >= limit:
                    break
            while window:
                result = ray.get(window.popleft())
                for item in it:
                    window.append(remote.remote(key, [ref], item))
                    break
                yield result
                del result
        finally:
            for r in window:
                ray.cancel(r)
            del ref

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
