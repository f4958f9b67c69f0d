"""Simplex equiangular tight frames (ETF) and the Gram operators MDA projects onto.

A simplex ETF is a set of ``C`` unit vectors ``w_1..w_C`` in ``R^d`` with pairwise inner products
``-1/(C-1)`` (MDA, Chen et al., Def. 1, Eqs. 1–2, App. B.1). Stacked as rows, ``W_ETF`` is ``(C, d)``,
its Gram matrix ``W_ETF W_ETFᵀ`` has 1 on the diagonal and ``-1/(C-1)`` off it, and the *direction
alignment matrix* of MDA is the ``(d, d)`` operator ``P_ETF = W_ETFᵀ W_ETF``.

Construction (the two branches of MDA App. B.1, with the corrections of the MDA specs):

* ``d >= C`` (QR branch): ``Q`` (d×C) from the QR decomposition of a seeded Gaussian d×C matrix and
  ``W_ETFᵀ = sqrt(C/(C-1)) · Q (I_C − 11ᵀ/C)``. The paper writes the centring as a *left* product
  ``(I − 11ᵀ/C) Q``, which does not type-check (nor give an ETF); it acts on the C columns. The paper
  switches branches at ``d = C − 1``, but C orthonormal columns need ``d >= C``, so the QR branch is used
  iff ``d >= C`` (spec flag A4). Then ``P_ETF = C/(C−1) · Π_S`` with ``Π_S`` the orthogonal projector onto
  the (C−1)-dimensional subspace ``S = span(Q (I − 11ᵀ/C))``.
* ``d <= C − 1`` (SVD branch): ``W_ETF = sqrt(C/(C-1)) · U[:, :d]`` with ``U`` the left singular vectors of
  the centring matrix ``I_C − 11ᵀ/C``. Any orthonormal basis of ``1^⊥`` is such a ``U``; we use the
  Helmert basis (closed form, deterministic on every platform). Then ``P_ETF = C/(C−1) · I_d`` exactly:
  the "projection" is a pure rescaling. For ``d = C − 1`` the rows are an exact simplex ETF; for
  ``d < C − 1`` no simplex ETF with C vertices exists and the rows are neither unit-norm nor equiangular.

Which ``C`` a caller passes decides the branch: MDA-TA's default ``etf_size="table"`` takes
``C = max(Σ_t C_t, d + 1)``, always the SVD branch (a scalar), and ``etf_size="literal"`` takes ``C = Σ_t C_t``
(:func:`taskmerge.methods.mda.frame_classes`).

The frame is deterministic: the Gaussian comes from a CPU :class:`torch.Generator` seeded with
``seed`` (default 0), generated in float64. Projectors are cached per ``(d, C, seed)`` so every layer with
the same dimension shares one frame (MDA spec flag A5).

:class:`GramProjector` holds a scaled orthogonal projector ``scale · Π`` in factored form (an orthonormal
basis of its range, or of the complement, whichever is smaller), so applying it to an ``m×n`` update
costs ``O(m n rank)`` rather than forming the ``d×d`` matrix. Besides the ETF, MDA's Table 15 compares
two other alignment targets; :func:`orthogonal_projector` and :func:`low_rank_projector` build them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from taskmerge import linalg

__all__ = [
    "GramProjector",
    "etf_branch",
    "helmert_basis",
    "gaussian_qr",
    "simplex_etf",
    "etf_gram",
    "etf_projector",
    "orthogonal_projector",
    "low_rank_projector",
]

Side = Literal["out", "in"]


def _check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got C = {num_classes}")


def etf_branch(dim: int, num_classes: int) -> Literal["qr", "svd"]:
    """Which construction :func:`simplex_etf` uses: ``"qr"`` iff ``dim >= num_classes``."""
    return "qr" if dim >= num_classes else "svd"


def helmert_basis(
    num_classes: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """An orthonormal basis of ``1^⊥`` in ``R^C``, as a ``(C, C−1)`` matrix (the Helmert contrasts).

    Column ``j`` (0-based) is ``(1, …, 1, −(j+1), 0, …, 0) / sqrt((j+1)(j+2))`` with ``j+1`` leading ones.
    ``H Hᵀ = I_C − 11ᵀ/C`` and ``HᵀH = I_{C−1}``, so ``[H, 1/√C]`` is a left singular basis of the
    centring matrix.
    """
    _check_classes(num_classes)
    c = num_classes
    rows = torch.arange(c, dtype=dtype, device=device)[:, None]
    cols = torch.arange(1, c, dtype=dtype, device=device)[None, :]  # j + 1
    norm = torch.sqrt(cols * (cols + 1))
    basis = torch.where(rows < cols, 1.0 / norm, torch.zeros((), dtype=dtype, device=device))
    return torch.where(rows == cols, -cols / norm, basis)


def etf_gram(
    num_classes: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The Gram matrix of a simplex ETF: ``C/(C−1) · I − 11ᵀ/(C−1)`` (1 on the diagonal, −1/(C−1) off it)."""
    _check_classes(num_classes)
    c = num_classes
    eye = torch.eye(c, dtype=dtype, device=device)
    return (c * eye - torch.ones(c, c, dtype=dtype, device=device)) / (c - 1)


def gaussian_qr(rows: int, cols: int, seed: int) -> torch.Tensor:
    """The complete orthogonal factor ``Q`` (rows × rows, float64) of the QR decomposition of a seeded
    standard-Gaussian ``rows × cols`` matrix (drawn on the CPU from ``torch.Generator().manual_seed(seed)``).

    Its first ``min(rows, cols)`` columns are the random orthonormal directions of the QR branch of MDA App. B.1
    (:func:`simplex_etf` with ``rows = d``, ``cols = C``); with ``rows == cols`` it is a seeded random orthogonal
    matrix. The same ``(rows, cols, seed)`` gives the same bits on every call.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(x, mode="complete")
    return q


def simplex_etf(
    num_classes: int,
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The frame ``W_ETF`` as a ``(C, dim)`` matrix whose rows are the class directions.

    QR branch (``dim >= C``): rows are unit vectors with pairwise inner product ``−1/(C−1)``. SVD branch
    (``dim < C``): ``sqrt(C/(C−1))`` times the first ``dim`` Helmert columns (a true ETF iff ``dim = C−1``).
    """
    _check_classes(num_classes)
    if dim < 1:
        raise ValueError(f"simplex_etf: dim must be positive, got {dim}")
    c = num_classes
    scale = math.sqrt(c / (c - 1))
    if etf_branch(dim, c) == "qr":
        q = gaussian_qr(dim, c, seed)[:, :c]
        centred = q - q.mean(dim=1, keepdim=True)  # Q (I − 11ᵀ/C)
        w = scale * centred.T
    else:
        w = scale * helmert_basis(c)[:, :dim]
    return w.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class GramProjector:
    """The operator ``scale · Π`` with ``Π`` the orthogonal projector onto a subspace of ``R^dim``.

    Exactly one representation is used: ``basis`` (dim × rank, orthonormal columns spanning the range),
    ``complement`` (dim × (dim − rank), orthonormal columns spanning the null space), or neither (the
    range is all of ``R^dim``: ``scale · I``).
    """

    dim: int
    scale: float
    rank: int
    basis: torch.Tensor | None = None
    complement: torch.Tensor | None = None

    @property
    def is_scalar(self) -> bool:
        """True when the operator is ``scale · I`` (e.g. the SVD branch of the ETF)."""
        return self.basis is None and self.complement is None

    def to(self, dtype: torch.dtype, device: torch.device | str) -> GramProjector:
        """A copy with the bases in ``dtype`` on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype=dtype, device=device)

        return GramProjector(self.dim, self.scale, self.rank, move(self.basis), move(self.complement))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``Π x`` for the columns of ``x`` (``x`` has ``dim`` rows)."""
        if self.basis is not None:
            return linalg.project(self.basis, x)
        if self.complement is not None:
            return linalg.project_out(self.complement, x)
        return x

    def apply(self, x: torch.Tensor, side: Side = "out") -> torch.Tensor:
        """``scale · Π x`` (``side="out"``: acts on the rows, ``x`` is dim × n) or ``scale · x Π``
        (``side="in"``: acts on the columns, ``x`` is m × dim)."""
        if side == "out":
            if x.shape[0] != self.dim:
                raise ValueError(f"projector of size {self.dim} applied on the row side of {tuple(x.shape)}")
            return self.scale * self._project(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"projector of size {self.dim} applied on the column side of {tuple(x.shape)}")
        return self.scale * self._project(x.T).T

    def residual(self, x: torch.Tensor, side: Side = "out") -> torch.Tensor:
        """The part of ``x`` outside the projector's range: ``(I − Π) x`` or ``x (I − Π)``."""
        if side == "out":
            return x - self._project(x)
        return x - self._project(x.T).T

    def matrix(self) -> torch.Tensor:
        """The dense ``dim × dim`` operator (for tests and diagnostics)."""
        ref = self.basis if self.basis is not None else self.complement
        dtype = ref.dtype if ref is not None else torch.float64
        device = ref.device if ref is not None else "cpu"
        return self.scale * self._project(torch.eye(self.dim, dtype=dtype, device=device))


def _factored(
    dim: int, scale: float, range_basis: torch.Tensor | None, null_basis: torch.Tensor | None
) -> GramProjector:
    """Keep whichever of the range / null-space bases is narrower (both given, float64)."""
    rank = dim if range_basis is None else range_basis.shape[1]
    if rank == dim:
        return GramProjector(dim, scale, rank)
    if null_basis is not None and null_basis.shape[1] < rank:
        return GramProjector(dim, scale, rank, complement=null_basis.contiguous())
    return GramProjector(dim, scale, rank, basis=range_basis.contiguous())


@lru_cache(maxsize=64)
def _etf_projector64(dim: int, num_classes: int, seed: int) -> GramProjector:
    c = num_classes
    scale = c / (c - 1)
    if etf_branch(dim, c) == "svd":
        return GramProjector(dim, scale, dim)
    q_full = gaussian_qr(dim, c, seed)
    q = q_full[:, :c]
    range_basis = q @ helmert_basis(c)  # dim × (C−1), orthonormal, spans Q (I − 11ᵀ/C)
    null_basis = torch.cat([q.sum(dim=1, keepdim=True) / math.sqrt(c), q_full[:, c:]], dim=1)
    return _factored(dim, scale, range_basis, null_basis)


@lru_cache(maxsize=64)
def _etf_projector_on(dim: int, num_classes: int, seed: int, dtype: torch.dtype, device: str) -> GramProjector:
    return _etf_projector64(dim, num_classes, seed).to(dtype, device)


def etf_projector(
    dim: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> GramProjector:
    """``P_ETF = W_ETFᵀ W_ETF`` for :func:`simplex_etf` ``(num_classes, dim, seed=seed)``, factored.

    QR branch: ``C/(C−1) · Π_S`` of rank ``C − 1``; SVD branch: ``C/(C−1) · I_dim``. Cached.
    """
    _check_classes(num_classes)
    if dim < 1:
        raise ValueError(f"etf_projector: dim must be positive, got {dim}")
    return _etf_projector_on(dim, num_classes, seed, dtype, str(torch.device(device)))


@lru_cache(maxsize=64)
def _random_subspace64(dim: int, rank: int, seed: int) -> GramProjector:
    if rank >= dim:
        return GramProjector(dim, 1.0, dim)
    q_full = gaussian_qr(dim, rank, seed)
    return _factored(dim, 1.0, q_full[:, :rank], q_full[:, rank:])


def orthogonal_projector(
    dim: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> GramProjector:
    """The "orthogonal" alignment target of MDA Table 15: ``WᵀW`` for C orthonormal class directions.

    [INFERRED] ``W`` (C×dim) has orthonormal rows spanning a seeded random subspace when ``C <= dim``;
    when ``C > dim`` orthonormal class directions do not exist and ``W`` spans ``R^dim`` (``P = I``).
    """
    if num_classes < 1 or dim < 1:
        raise ValueError(f"orthogonal_projector: dim and num_classes must be positive, got {dim}, {num_classes}")
    return _random_subspace64(dim, min(num_classes, dim), seed).to(dtype, device)


def low_rank_projector(
    dim: int,
    rank: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> GramProjector:
    """The "low-rank" alignment target of MDA Table 15: the projector onto a seeded random ``rank``-dim
    subspace (the paper uses rank ``d_out/4``) [INFERRED: the paper gives only the rank]."""
    if rank < 1 or dim < 1:
        raise ValueError(f"low_rank_projector: dim and rank must be positive, got {dim}, {rank}")
    return _random_subspace64(dim, min(rank, dim), seed).to(dtype, device)
