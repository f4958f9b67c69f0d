"""The linear algebra every merging method shares.

One place for the thin SVD, the exact truncated (top-k) SVD, the orthogonal polar factor, the SVD of
a low-rank product ``B @ A`` (and of sums and concatenations of such products, kept factored as
:class:`LowRank`), the numerical rank and subspace projections. Methods call these; none re-implements them.

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
    "lowrank_sum",
    "numerical_rank",
    "polar",
    "project",
    "project_out",
    "orthonormal_basis",
]

# Below this ratio k / min(m, n) the truncated SVD goes through the Gram matrix instead of a full SVD.
_GRAM_RATIO = 0.5
# The Gram route squares the condition number, and an eigenvector's error is ~ eps · λ_1 / gap (the gap to
# the next eigenvalue): in float32 that is ~1e-3 for the top-96 of a 768 × 768 update with a power-law
# spectrum (measured against a float64 reference, where a float32 SVD gives ~1e-5). So it always runs in
# float64 (whatever the input's precision), while the k-th kept singular value stays above this fraction
# of the largest (~1e-8 relative error at the floor); else a full SVD in the input's precision is taken.
_GRAM_RELATIVE_FLOOR = 1e-6
# The Gram route of ``polar`` (in float64) is used while λ_min(AᵀA) / λ_max(AᵀA) stays above this
# (cond(A) < 1e5, error ~1e-8); a float32 Gram would lose ~eps·cond(A)² and fail its check on most
# merging inputs anyway (TSV-M's concatenated bases), costing an eigendecomposition for nothing.
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
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK is markedly faster on the tall orientation
        U, S, Vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return SVD(Vh.T, S, U.T)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return SVD(U, S, Vh)


def truncated_svd(matrix: torch.Tensor, k: int) -> SVD:
    """Exact top-``k`` singular triplets of ``matrix``.

    When ``k`` is at most half of ``min(m, n)`` the triplets come from the symmetric eigenproblem of
    the smaller Gram matrix (``AᵀA`` or ``AAᵀ``) in float64, cheaper than a full SVD, unless the kept
    spectrum spans too many orders of magnitude for it; then by a full SVD (see ``_GRAM_RELATIVE_FLOOR``).
    The result equals the first ``k`` triplets of :func:`svd` up to the sign of each singular pair.
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
        result = _gram_top_k(matrix.to(torch.float64), k, _GRAM_RELATIVE_FLOOR)
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

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LowRank:
        """The same matrix with both factors moved to ``dtype`` and ``device`` (``None``: unchanged)."""
        return LowRank(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype), self.scale)

    def transpose(self) -> LowRank:
        """The transposed matrix ``(s B A)ᵀ = s Aᵀ Bᵀ`` in factored form (no copy)."""
        return LowRank(self.A.T, self.B.T, self.scale)

    def norm(self) -> float:
        """Frobenius norm ``‖s B A‖_F``, from the r × r Gram matrices: ``‖B A‖²_F = Σ (BᵀB) ⊙ (A Aᵀ)``."""
        if self.rank == 0:
            return 0.0
        gram = (self.B.T @ self.B) * (self.A @ self.A.T)
        return abs(self.scale) * float(gram.sum().clamp_min(0).sqrt())

    def svd(self, k: int | None = None) -> SVD:
        """Top-``k`` (default: all ``r``) singular triplets of ``s B A`` by :func:`lowrank_svd`, never forming it.

        At most ``min(k, r, m, n)`` triplets; trailing singular values may be (numerically) zero when
        ``B`` or ``A`` is rank-deficient. Computed in the factors' dtype.
        """
        return lowrank_svd(self.B * self.scale, self.A, k)


def lowrank_sum(parts: list[LowRank] | tuple[LowRank, ...], dtype: torch.dtype | None = None) -> LowRank:
    """The sum ``Σ_t s_t B_t A_t`` in factored form, ``[s_1 B_1 … s_T B_T] @ [A_1; …; A_T]`` (inner dim ``Σ r_t``).

    Computed in ``dtype`` (default: the first part's ``B`` dtype) on the first part's device.
    """
    if not parts:
        raise ValueError("lowrank_sum needs at least one part")
    m, n = parts[0].shape
    dtype = dtype or parts[0].B.dtype
    device = parts[0].B.device
    if any(p.shape != (m, n) for p in parts):
        raise ValueError(f"lowrank_sum: parts of shapes {[p.shape for p in parts]} differ")
    b = torch.cat([p.B.to(device=device, dtype=dtype) * p.scale for p in parts], dim=1)
    a = torch.cat([p.A.to(device=device, dtype=dtype) for p in parts], dim=0)
    return LowRank(b, a, 1.0)


def numerical_rank(matrix: torch.Tensor, rtol: float | None = None) -> int:
    """The number of singular values of ``matrix`` above ``rtol · σ_max`` (default ``max(m, n) · eps``).

    The usual numerical rank (``numpy.linalg.matrix_rank``'s tolerance); 0 for a zero or empty matrix.
    """
    if matrix.ndim != 2:
        raise ValueError(f"numerical_rank expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if m == 0 or n == 0:
        return 0
    if rtol is None:
        rtol = max(m, n) * torch.finfo(matrix.dtype).eps
    s = torch.linalg.svdvals(matrix if m >= n else matrix.T)  # LAPACK prefers the tall orientation
    return int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0


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
    root from the eigendecomposition of the n×n Gram matrix in float64, cheaper than an SVD, while
    ``λ_min(AᵀA) / λ_max(AᵀA)`` stays above ``_POLAR_CONDITION_FLOOR``; an ill-conditioned ``A`` goes through an SVD in
    float64 (the polar factor's error grows like eps / σ_min: a float32 SVD loses ~1e-2 on a direction
    with σ_min / σ_max ~ 1e-5, which Iso-CTS's stacked bases do reach).

    A rank-deficient ``A`` has no unique polar factor (any completion of ``P`` on the null space is
    one). Singular values at most ``rtol·σ_max`` (default ``max(m, n)·eps`` of the dtype) are treated
    as zero and their pairs dropped, giving the partial isometry ``P₊ Q₊ᵀ``: deterministic, and equal
    to the polar factor whenever ``A`` has full rank. ``rtol=0`` keeps every non-zero singular pair (the
    plain ``U Vᵀ`` of the reference implementations). A zero matrix gives zeros.
    """
    if matrix.ndim != 2:
        raise ValueError(f"polar expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if m < n:
        return polar(matrix.T, rtol).T
    if n == 0:
        return matrix.clone()
    a = matrix.to(torch.float64)
    evals, evecs = torch.linalg.eigh(a.T @ a)
    if evals[0] > _POLAR_CONDITION_FLOOR * evals[-1] > 0:
        return (a @ ((evecs * evals.rsqrt()) @ evecs.T)).to(matrix.dtype)
    dec = svd(matrix.to(torch.float64) if matrix.dtype in (torch.float32, torch.float64) else matrix)
    if rtol is None:
        rtol = max(m, n) * torch.finfo(matrix.dtype).eps
    keep = dec.S > rtol * dec.S[0]
    return (dec.U[:, keep] @ dec.Vh[keep]).to(matrix.dtype)


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
