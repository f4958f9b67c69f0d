"""The engine's one-pass route for linear methods: ``scale · Σ_t w_t (θ_t − θ₀)`` without a stacked copy.

Task arithmetic (``Σ_t Δ_t``) and weight averaging (``(1/T) Σ_t Δ_t``) are linear in the task updates. The
stacked route (:func:`taskmerge.merge._task_updates`, then the per-layer function) writes the T updates into
a ``(T, *shape)`` buffer, checks each for NaN / Inf and then sums it: three passes over T tensors where a sum
needs one. Here the tensor is cut into cache-sized chunks and, chunk by chunk, every task's
``θ_t − θ₀`` is formed (``torch.sub`` converts the stored dtype on the fly) and added to the result, so
each input is read from memory once and the result written once; no T-sized buffer exists.

The arithmetic is the stacked route's, operation by operation: ``Δ_t = fl(θ_t − θ₀)`` in the compute
dtype, ``Δ_t · w_t`` when a per-model weight is not 1, a sum over t and, for the mean, a division by T.
The sum runs left to right, bitwise the paper's ``Σ_t``; ``torch.sum(dim=0)`` on a stack does the same on
large tensors but may pair the tasks otherwise on small ones, so the two routes agree to the last bits
(``tests/test_linear_stream.py`` checks both).

The finite-value check is folded in: NaN / Inf in any input reaches the sum (``Inf − Inf`` and ``0·Inf``
are NaN), so the sum alone is checked, once; only when it is not finite are the inputs examined, to blame
the file that holds the bad value, as the stacked route does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taskmerge.errors import CheckpointError, OptionError
from taskmerge.io.readers import TensorSource

__all__ = ["CHUNK", "linear_combination", "stream_linear"]

#: Entries per chunk on the CPU: 512K (2 MiB in float32), 16 × torch's intra-op grain size, so each op splits
#: over the intra-op threads while the chunk's result, base and one task's difference stay in cache as the T
#: tasks are added. Measured (ViT-B/32 shapes, 8 tasks, 88M entries a model, 2 threads, idle 2-core machine,
#: 275 GFLOPS): 0.68–0.83 s a TA / WA pass with 512K–2M chunks against 1.1–1.9 s with 32K chunks (one thread
#: per op). The trade-off: an OpenMP region per chunk waits on a descheduled thread when another job holds a
#: core (as every multi-threaded torch op does); ``torch.set_num_threads(1)`` keeps each op on the caller.
CHUNK = 1 << 19


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def linear_combination(base: torch.Tensor, tasks: Sequence[torch.Tensor], *, divisor: float = 1.0,
                       weights: Sequence[float] | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", chunk: int = CHUNK) -> torch.Tensor:
    """``(Σ_t w_t · (tasks[t] − base)) / divisor`` in ``dtype`` on ``device``, one chunk of entries at a time.

    ``tasks`` may be stored in any floating dtype (converted on the fly); ``weights`` (default all 1) as in
    :class:`taskmerge.merge.MergeRequest`. On a CPU the chunks are ``chunk`` entries; elsewhere the whole
    tensor is one chunk (each task is moved to ``device`` once). The result has ``base``'s shape.
    """
    if not tasks:
        raise ValueError("linear_combination needs at least one task tensor")
    dev = torch.device(device)
    n = base.numel()
    out = torch.empty(n, dtype=dtype, device=dev)
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tasks]
    step = max(1, chunk) if dev.type == "cpu" else max(n, 1)
    diff = torch.empty(min(step, n), dtype=dtype, device=dev)
    for start in range(0, n, step):
        stop = min(n, start + step)
        b = flat_base[start:stop].to(device=dev, dtype=dtype)
        acc = out[start:stop]
        for t, x in enumerate(flats):
            target = acc if t == 0 else diff[: stop - start]
            torch.sub(x[start:stop].to(dev), b, out=target)
            if weights is not None and weights[t] != 1.0:
                target.mul_(weights[t])
            if t:
                acc.add_(target)
        if divisor != 1.0:  # while the chunk is in cache
            acc.div_(divisor)
    return out.view(base.shape)


def stream_linear(name: str, base: torch.Tensor, tasks: Sequence[TensorSource], *, divisor: float,
                  weights: Sequence[float] | None, dtype: torch.dtype, device: torch.device,
                  base_location: str, method: str) -> torch.Tensor:
    """The merged update of tensor ``name`` of a linear method, read from ``tasks`` and checked to be finite.

    A non-finite result is traced to its cause with the stacked route's messages: the base's file
    (``base_location``) when θ₀ is not finite, else the first fine-tuned model whose update is not, else
    the method (``method``: a sum that overflows the compute dtype).
    """
    values = [src.get(name) for src in tasks]
    merged = linear_combination(base, values, divisor=divisor, weights=weights, dtype=dtype, device=device)
    if _finite(merged):
        return merged
    if not _finite(base):
        raise CheckpointError(f"{base_location}: tensor {name!r} of the base model contains NaN or Inf")
    for src, x in zip(tasks, values):
        if not _finite(x.to(dtype) - base.to(dtype)):
            raise CheckpointError(f"{src.location(name)}: task vector of tensor {name!r} contains NaN or Inf")
    raise OptionError(f"method {method!r} produced NaN or Inf for tensor {name!r}; check its options")
