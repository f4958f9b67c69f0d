"""Shared by the low-rank-route tests of the SVD-based methods: random LoRA factors, a relative comparison and
a spy on the decompositions that ``torch.linalg`` is asked for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from taskmerge import linalg


def lora_factors(m: int, n: int, ranks: Sequence[int], seed: int, dtype: torch.dtype = torch.float64,
                 std: float = 1.0) -> tuple[linalg.LowRank, ...]:
    """One ``LowRank(B, A, 0.5 + t)`` per rank, B (m, r_t) and A (r_t, n) Gaussian with deviation ``std``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(linalg.LowRank(std * torch.randn(m, r, generator=g, dtype=dtype),
                                std * torch.randn(r, n, generator=g, dtype=dtype), 0.5 + t)
                 for t, r in enumerate(ranks))


def dense(factors: Sequence[linalg.LowRank]) -> torch.Tensor:
    """The stacked dense updates (T, m, n), ``factors[t].dense()``."""
    return torch.stack([f.dense() for f in factors])


def assert_relatively_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """``max |got − want| ≤ rtol · max |want|`` (and a non-trivial ``want``)."""
    scale = float(want.abs().max())
    assert scale > 0
    err = float((got - want).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} × {scale:.3e}"


@contextlib.contextmanager
def decomposition_shapes() -> Iterator[list[tuple[int, ...]]]:
    """Record the shape of every matrix handed to ``torch.linalg``'s svd, svdvals, eigh and qr."""
    shapes: list[tuple[int, ...]] = []
    originals = {name: getattr(torch.linalg, name) for name in ("svd", "svdvals", "eigh", "qr")}

    def spy(fn):
        def wrapped(a, *args, **kwargs):
            shapes.append(tuple(a.shape))
            return fn(a, *args, **kwargs)
        return wrapped

    try:
        for name, fn in originals.items():
            setattr(torch.linalg, name, spy(fn))
        yield shapes
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)


def stride_zero_updates(t: int, m: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (t, m, n) stand-in for the dense updates that takes no memory (a stride-0 view of one zero): for
    low-rank routes, which read only its shape, dtype and device. Touching it densely allocates t·m·n."""
    return torch.zeros(1, 1, 1, dtype=dtype).expand(t, m, n)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
