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
    "LowRank",
    "hstack_lowrank_svd",
    "polar",
    "project",
    "project_out",
    "orthonormal_basis",
]

# Below this ratio k / min(m, n) the truncated SVD goes through the Gram matrix instead of a full SVD.
_GRAM_RATIO = 0.5
# The Gram route squares the condition number. It runs in the input's precision while the k-th kept
# singular value stays above this fraction of the largest (float32: relative error of the kept
# triplets ~1e-5 at the floor, ~1e-6 typically), else in float64 above the float64 floor (~1e-8
# relative error), else a full SVD is taken: the accuracy check of ``truncated_svd``.
_GRAM_RELATIVE_FLOOR = {torch.float32: 1e-2, torch.float64: 1e-6}
# The Gram route of ``polar`` is used while λ_min(AᵀA) / λ_max(AᵀA) stays above this
# (float32: cond(A) < 30, error ~1e-6; float64: cond(A) < 1e5, error ~1e-8).
_POLAR_CONDITION_FLOOR = {torch.float32: 1e-3, torch.float64: 1e-10}


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
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK is markedly faster on the tall orientation
        U, S, Vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return SVD(Vh.T, S, U.T)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return SVD(U, S, Vh)


def truncated_svd(matrix: torch.Tensor, k: int) -> SVD:
    """Exact top-``k`` singular triplets of ``matrix``.

    When ``k`` is at most half of ``min(m, n)`` the triplets come from the symmetric eigenproblem of
    the smaller Gram matrix (``AᵀA`` or ``AAᵀ``), several times cheaper than a full SVD: first in the
    input's precision, then in float64 when the kept spectrum spans too many orders of magnitude for
    that precision, then by a full SVD (see ``_GRAM_RELATIVE_FLOOR``). The result equals the first
    ``k`` triplets of :func:`svd` up to the sign of each singular pair.
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
    if k <= _GRAM_RATIO * r:
        for dtype in dict.fromkeys((matrix.dtype, torch.float64)):
            floor = _GRAM_RELATIVE_FLOOR.get(dtype)
            if floor is None:
                continue
            result = _gram_top_k(matrix.to(dtype), k, floor)
            if result is not None:
                return SVD(*(t.to(matrix.dtype) for t in result))
    full = svd(matrix)
    return SVD(full.U[:, :k], full.S[:k], full.Vh[:k])


def _gram_top_k(a: torch.Tensor, k: int, floor: float) -> SVD | None:
    """Top-``k`` triplets from the Gram matrix's eigenpairs, or ``None`` below the accuracy floor."""
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    top = evals[-k:].flip(0)
    if top[0] <= 0 or top[-1] < (floor**2) * top[0]:
        return None
    s = top.sqrt()
    vecs = evecs[:, -k:].flip(1)
    if tall:
        return SVD((a @ vecs) / s, s, vecs.T.contiguous())
    return SVD(vecs, s, ((a.T @ vecs) / s).T.contiguous())


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


class LowRank(NamedTuple):
    """A low-rank matrix ``scale · B @ A`` kept in factored form (a LoRA update ``ΔW``).

    ``B`` is (m, r) and ``A`` is (r, n); ``r = 0`` is the zero matrix (a module an adapter leaves alone).
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        """The inner dimension ``r`` (an upper bound on the rank)."""
        return int(self.B.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the dense matrix."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense matrix ``(B @ A) · scale`` (in ``dtype``, default the factors' dtype)."""
        b = self.B if dtype is None else self.B.to(dtype)
        a = self.A if dtype is None else self.A.to(dtype)
        return (b @ a) * self.scale


def hstack_lowrank_svd(parts: list[LowRank] | tuple[LowRank, ...], dtype: torch.dtype | None = None) -> SVD:
    """Thin SVD of the concatenation ``[M_1 | M_2 | … | M_T]`` (m × Σ n_t) of low-rank ``M_t = s_t B_t A_t``.

    Never forms the concatenation. With the stacked left factors ``[s_1 B_1 … s_T B_T] = Q_b R_b`` and
    the per-part QR ``A_tᵀ = Q_t R_t``, the concatenation is
    ``Q_b · (R_b · blockdiag(R_1ᵀ … R_Tᵀ)) · blockdiag(Q_1ᵀ … Q_Tᵀ)``; only the core (at most R × R,
    ``R = Σ r_t``) is decomposed. Returns ``U`` (m, K), ``S`` (K,) and ``Vh`` (K, Σ n_t) with
    ``K = min(m, R, Σ min(n_t, r_t))``; trailing singular values may be (numerically) zero.
    Computed in ``dtype`` (default: the first part's ``B`` dtype).
    """
    if not parts:
        raise ValueError("hstack_lowrank_svd needs at least one part")
    m = parts[0].shape[0]
    dtype = dtype or parts[0].B.dtype
    device = parts[0].B.device
    widths = [p.shape[1] for p in parts]
    bs, qas, ras_t = [], [], []
    for p in parts:
        if p.shape[0] != m or p.A.shape[0] != p.B.shape[1]:
            raise ValueError(f"hstack_lowrank_svd: part of shape B {tuple(p.B.shape)}, A {tuple(p.A.shape)} "
                             f"does not fit m = {m}")
        b = p.B.to(device=device, dtype=dtype) * p.scale
        a = p.A.to(device=device, dtype=dtype)
        if p.rank == 0:
            qa, ra = a.new_zeros(a.shape[1], 0), a.new_zeros(0, 0)
        else:
            qa, ra = torch.linalg.qr(a.T)  # (n_t, q_t), (q_t, r_t)
        bs.append(b)
        qas.append(qa)
        ras_t.append(ra.T)  # (r_t, q_t)
    total = sum(widths)
    big_r = sum(b.shape[1] for b in bs)
    q_total = sum(q.shape[1] for q in qas)
    if big_r == 0 or q_total == 0:
        empty = torch.zeros(0, dtype=dtype, device=device)
        return SVD(empty.new_zeros(m, 0), empty, empty.new_zeros(0, total))
    qb, rb = torch.linalg.qr(torch.cat(bs, dim=1))  # (m, p), (p, R)
    core = rb @ torch.block_diag(*ras_t)  # (p, Q)
    cu, cs, cvh = torch.linalg.svd(core, full_matrices=False)
    blocks, start = [], 0
    for qa in qas:
        q = qa.shape[1]
        blocks.append(cvh[:, start:start + q] @ qa.T)  # (K, n_t)
        start += q
    return SVD(qb @ cu, cs, torch.cat(blocks, dim=1))


def polar(matrix: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ``.

    The closest matrix with orthonormal columns (rows, if wide) to ``matrix`` in Frobenius norm (the
    orthogonal Procrustes solution). Column order is kept: for a matrix whose columns are already
    orthonormal the result is the matrix itself.

    For a tall ``A`` (m ≥ n) of full column rank, ``P Qᵀ = A (AᵀA)^{-1/2}``, with the inverse square
    root from the eigendecomposition of the n×n Gram matrix, several times cheaper than an SVD. The
    Gram route runs in the input's precision while ``λ_min(AᵀA) / λ_max(AᵀA)`` stays above
    ``_POLAR_CONDITION_FLOOR`` for it, then in float64; an ill-conditioned ``A`` goes through the SVD.

    A rank-deficient ``A`` has no unique polar factor (any completion of ``P`` on the null space is
    one). Singular values at most ``rtol·σ_max`` (default ``max(m, n)·eps`` of the dtype) are treated
    as zero and their pairs dropped, giving the partial isometry ``P₊ Q₊ᵀ``: deterministic, and equal
    to the polar factor whenever ``A`` has full rank. A zero matrix gives zeros.
    """
    if matrix.ndim != 2:
        raise ValueError(f"polar expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if m < n:
        return polar(matrix.T, rtol).T
    if n == 0:
        return matrix.clone()
    for dtype in dict.fromkeys((matrix.dtype, torch.float64)):
        floor = _POLAR_CONDITION_FLOOR.get(dtype)
        if floor is None:
            continue
        a = matrix.to(dtype)
        evals, evecs = torch.linalg.eigh(a.T @ a)
        if evals[0] > floor * evals[-1] > 0:
            return (a @ ((evecs * evals.rsqrt()) @ evecs.T)).to(matrix.dtype)
    dec = svd(matrix)
    if rtol is None:
        rtol = max(m, n) * torch.finfo(matrix.dtype).eps
    keep = dec.S > rtol * dec.S[0]
    return dec.U[:, keep] @ dec.Vh[keep]


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
