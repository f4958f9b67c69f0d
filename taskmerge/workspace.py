"""Reusable scratch memory for the merge engine's stacked task updates.

Every tensor the engine merges needs a fresh ``(T, *shape)`` stack of task updates. Allocating it anew
each time costs more than filling it: a large CPU allocation is a fresh memory mapping, and the kernel
zeroes every page on first touch (on CLIP ViT-B/32 shapes, 8 tasks: 21 ms to fill a fresh stack of
the 3072×768 weights, 4 ms to refill a used one). :class:`StackPool` keeps the buffers of finished
tensors for the next ones, so long as the buffers it holds, free and lent out together, stay within the
largest stack taken so far: the engine's peak memory (one largest stack, as the executor's size budget
allows) does not grow.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["StackPool"]


class StackPool:
    """Free CPU buffers handed out as ``(T, *shape)`` stacks and taken back when a tensor is merged.

    Thread-safe. :meth:`take` returns the smallest free buffer large enough (or a new one) viewed to
    the requested shape; :meth:`give_back` returns it. A returned buffer is kept only while the free and
    lent-out buffers together stay within the largest stack taken so far; otherwise the smallest free
    ones are dropped.
    Buffers on other devices are not pooled (CUDA's caching allocator already reuses its memory).
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._cap = 0  # bytes: the largest stack taken so far
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        """Pickles as an empty pool (a Ray worker gets its own)."""
        return (StackPool, ())

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, ``dtype`` on ``device`` (its contents are garbage)."""
        n = math.prod(shape)
        if device.type != "cpu" or n == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            self._cap = max(self._cap, n * dtype.itemsize)
            fits = [i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= n]
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if flat is None:
            flat = torch.empty(n, dtype=dtype)
        stack = flat[:n].view(shape)
        with self._lock:
            self._lent[stack.data_ptr()] = flat
        return stack

    def give_back(self, stack: torch.Tensor) -> None:
        """Return a tensor from :meth:`take`; nothing may use it afterwards. Others are ignored."""
        with self._lock:
            flat = self._lent.pop(stack.data_ptr(), None)
            if flat is None:
                return
            self._free.append(flat)
            self._free.sort(key=_nbytes)
            held = sum(map(_nbytes, self._free)) + sum(map(_nbytes, self._lent.values()))
            while self._free and held > self._cap:
                held -= _nbytes(self._free.pop(0))

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares memory with a buffer currently lent out (a method returned a view of its input)."""
        if t.device.type != "cpu":
            return False
        ptr = t.untyped_storage().data_ptr()
        with self._lock:
            return any(flat.untyped_storage().data_ptr() == ptr for flat in self._lent.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
