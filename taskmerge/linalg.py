"""The linear algebra every merging method shares.

One place for the thin SVD, the exact truncated (top-k) SVD, the orthogonal polar factor, the SVD of
a low-rank product ``B @ A`` and subspace projections. Methods call these; none re-implements them.

All routines take and return :class:`torch.Tensor` on the input's device. They compute in the
input's floating dtype (callers pass float32 or float64 task vectors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "SVD",
    "svd",
    "truncated_svd",
    "lowrank_svd",
    "polar",
    "project",
    "project_out",
    "orthonormal_basis",
]

# Below this ratio k / min(m, n) the truncated SVD goes through the Gram matrix instead of a full SVD.
_GRAM_RATIO = 0.5
# The Gram route squares the condition number; singular values below this fraction of the largest
# are recomputed by a full SVD (the accuracy check of ``truncated_svd``).
_GRAM_RELATIVE_FLOOR = 1e-4
# The Gram route of ``polar`` is used while λ_min(AᵀA) / λ_max(AᵀA) stays above this.
_POLAR_CONDITION_FLOOR = 1e-10


class SVD(NamedTuple):
    """A (possibly truncated) singular value decomposition ``A ≈ U diag(S) Vh``.

    ``U`` is (m, k), ``S`` is (k,) in non-increasing order, ``Vh`` is (k, n).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """Return ``U diag(S) Vh``."""
        return (self.U * self.S) @ self.Vh


def svd(matrix: torch.Tensor) -> SVD:
    """Thin SVD of a 2-D tensor (``full_matrices=False``)."""
    if matrix.ndim != 2:
        raise ValueError(f"svd expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return SVD(U, S, Vh)


def truncated_svd(matrix: torch.Tensor, k: int) -> SVD:
    """Exact top-``k`` singular triplets of ``matrix``.

    When ``k`` is small relative to ``min(m, n)`` the triplets come from the symmetric eigenproblem of
    the smaller Gram matrix (``A Aᵀ`` or ``Aᵀ A``) solved in float64, which is several times cheaper than
    a full SVD. The Gram route loses accuracy for singular values far below the largest one, so it
    checks that the k-th kept value is above ``1e-4 · σ₁`` (float64 then leaves ~1e-8 relative error in
    the kept triplets) and otherwise falls back to the full SVD. The result equals the first ``k``
    triplets of :func:`svd` up to the sign of each singular pair.
    """
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    r = min(m, n)
    if k < 0:
        raise ValueError(f"truncated_svd: k must be non-negative, got {k}")
    k = min(k, r)
    if k == 0:
        return SVD(matrix.new_zeros(m, 0), matrix.new_zeros(0), matrix.new_zeros(0, n))
    if k > _GRAM_RATIO * r:
        full = svd(matrix)
        return SVD(full.U[:, :k], full.S[:k], full.Vh[:k])
    a = matrix.double()
    tall = m >= n
    gram = a.T @ a if tall else a @ a.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals = evals.flip(0)[:k].clamp_min(0.0)
    evecs = evecs.flip(1)[:, :k]
    s = evals.sqrt()
    if s[0] == 0 or s[-1] < _GRAM_RELATIVE_FLOOR * s[0]:
        full = svd(matrix)
        return SVD(full.U[:, :k], full.S[:k], full.Vh[:k])
    if tall:
        v = evecs
        u = (a @ v) / s
    else:
        u = evecs
        v = (a.T @ u) / s
    dtype = matrix.dtype
    return SVD(u.to(dtype), s.to(dtype), v.T.contiguous().to(dtype))


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, k: int | None = None) -> SVD:
    """SVD of the low-rank product ``B @ A`` without forming it.

    ``B`` is (m, r) and ``A`` is (r, n) (a LoRA update ``ΔW = B A``). With ``B = Q_b R_b`` and
    ``Aᵀ = Q_a R_a`` (reduced QR), ``B A = Q_b (R_b R_aᵀ) Q_aᵀ`` and only the r×r core is decomposed.
    Returns the top ``k`` triplets (all ``r`` by default).
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lowrank_svd expects B (m, r) and A (r, n), got {tuple(B.shape)} and {tuple(A.shape)}")
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    core = svd(rb @ ra.T)
    k = core.S.shape[0] if k is None else min(k, core.S.shape[0])
    return SVD(qb @ core.U[:, :k], core.S[:k], (qa @ core.Vh[:k].T).T.contiguous())


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ``.

    The closest matrix with orthonormal columns (rows, if wide) to ``matrix`` in Frobenius norm (the
    orthogonal Procrustes solution). Column order is kept: for a matrix whose columns are already
    orthonormal the result is the matrix itself.

    For a tall ``A`` (m ≥ n) of full column rank, ``P Qᵀ = A (AᵀA)^{-1/2}``; the inverse square root
    comes from the eigendecomposition of the n×n Gram matrix in float64, several times cheaper than
    an SVD. If ``A`` is ill-conditioned (``λ_min(AᵀA) < 1e-10 λ_max``, i.e. cond(A) > 1e5) the
    float64 route would lose accuracy and the SVD route is used instead.
    """
    if matrix.ndim != 2:
        raise ValueError(f"polar expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if m < n:
        return polar(matrix.T).T
    a = matrix.double()
    evals, evecs = torch.linalg.eigh(a.T @ a)
    if n > 0 and evals[0] > _POLAR_CONDITION_FLOOR * evals[-1] > 0:
        inv_sqrt = (evecs * evals.rsqrt()) @ evecs.T
        return (a @ inv_sqrt).to(matrix.dtype)
    dec = svd(matrix)
    return dec.U @ dec.Vh


def project(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Project the columns of ``x`` onto the span of ``basis`` (orthonormal columns): ``B Bᵀ x``."""
    return basis @ (basis.T @ x)


def project_out(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Remove from the columns of ``x`` their component in ``span(basis)``: ``(I − B Bᵀ) x``."""
    return x - project(basis, x)


def orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column space of ``matrix`` (reduced QR)."""
    q, _ = torch.linalg.qr(matrix)
    return q
