"""The linear algebra every merging method shares.

One place for the thin SVD, the exact truncated (top-k) SVD, the orthogonal polar factor, the SVD of
a low-rank product ``B @ A`` (and of sums and concatenations of such products, kept factored as
:class:`LowRank`), the numerical rank and subspace projections. Methods call these; none re-implements them.

All routines take and return :class:`torch.Tensor` on the input's device. They compute in the
input's floating dtype (callers pass float32 or float64 task vectors).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import torch

__all__ = [
    "SVD",
    "SvdRoute",
    "SVD_ROUTE_DESCRIPTION",
    "CERTIFIED_TOL",
    "TopKInfo",
    "svd",
    "truncated_svd",
    "certified_top_k",
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

# The truncated SVD goes through the Gram matrix's eigenpairs in float64, whatever k and the input's
# precision. The Gram route squares the condition number, and an eigenvector's error is ~ eps · λ_1 / gap (the
# gap to the next eigenvalue): in float32 that is ~1e-3 for the top-96 of a 768 × 768 update with a power-law
# spectrum, hence float64. A float32 full SVD is no better for large k: the top-80 % subspace of a 3072 × 768
# power-law matrix (Iso-CTS's common subspace) is 1.8e-3 off (spectral norm of the projector difference) where
# the float64 Gram route is 2e-10, at about the same time on 2 cores. The Gram route is taken while the k-th
# kept singular value stays above this fraction of the largest (~1e-8 relative error at the floor); else a
# full SVD in the input's precision.
_GRAM_RELATIVE_FLOOR = 1e-6
# The Gram route of ``polar`` (in float64) is used while λ_min(AᵀA) / λ_max(AᵀA) stays above this
# (cond(A) < 1e5, error ~1e-8); a float32 Gram would lose ~eps·cond(A)² and fail its check on most
# merging inputs anyway (TSV-M's concatenated bases), costing an eigendecomposition for nothing.
_POLAR_CONDITION_FLOOR = 1e-10

logger = logging.getLogger(__name__)

#: How a top-k SVD is computed: ``exact`` (:func:`truncated_svd`'s dense route) or ``certified``
#: (:func:`certified_top_k`: an iterative top-k whose every triplet is checked, else the exact route).
SvdRoute = Literal["exact", "certified"]
#: The ``svd`` option's description, shared by the methods that take it (TSV-M, Iso-CTS, DC-Merge, AlignMerge-O, KnOTS).
SVD_ROUTE_DESCRIPTION = (
    "how the top-k SVDs are computed: 'exact' (dense: float64 Gram eigenpairs or a full SVD) or 'certified' "
    "(randomized subspace iteration until every kept triplet's residuals are below 1e-5·σ₁, float64 Gram "
    "eigenpairs with the same check where k is large, else the exact route: linalg.certified_top_k)"
)
#: The certified route's default tolerance: every kept triplet's residuals at most this times σ₁.
CERTIFIED_TOL = 1e-5
# The certified route's iteration budget, and the largest block (k + oversampling) relative to min(m, n)
# for which an iteration is tried at all: beyond it one iteration costs about as much as a dense decomposition.
_CERTIFIED_MAX_ITER = 30
_CERTIFIED_MAX_BLOCK = 0.5
_CERTIFIED_ITER_WEIGHT = 2.0  # an iteration's time over its flop estimate, relative to the exact route's (below)


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


def truncated_svd(matrix: torch.Tensor, k: int, route: SvdRoute = "exact", *, seed: int = 0) -> SVD:
    """Top-``k`` singular triplets of ``matrix``, by the exact route or the certified one (``route``).

    ``exact``: the triplets come from the symmetric eigenproblem of the smaller Gram matrix (``AᵀA`` or
    ``AAᵀ``) in float64, more accurate than a float32 SVD at about its cost, unless the kept spectrum spans too
    many orders of magnitude for it; then from a full SVD in the input's precision (see
    ``_GRAM_RELATIVE_FLOOR``).
    The result equals the first ``k`` triplets of :func:`svd` up to the sign of each singular pair.

    ``certified``: :func:`certified_top_k` with its default tolerance (``seed`` seeds its start), which
    falls back to the exact route itself when it cannot certify its triplets.
    """
    if route == "certified":
        return certified_top_k(matrix, k, seed=seed)[0]
    if route != "exact":
        raise ValueError(f"truncated_svd: unknown route {route!r}; expected exact or certified")
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    r = min(m, n)
    if k < 0:
        raise ValueError(f"truncated_svd: k must be non-negative, got {k}")
    k = min(k, r)
    if k == 0:
        return SVD(matrix.new_zeros(m, 0), matrix.new_zeros(0), matrix.new_zeros(0, n))
    result = _gram_top_k(matrix.to(torch.float64), k, _GRAM_RELATIVE_FLOOR)
    if result is not None:
        return SVD(*(t.to(matrix.dtype) for t in result))
    full = svd(matrix)
    return SVD(full.U[:, :k], full.S[:k], full.Vh[:k])


class TopKInfo(NamedTuple):
    """How :func:`certified_top_k` obtained its triplets.

    ``route``: ``certified`` (triplets of a fast route, each checked) or ``exact`` (the fall-back);
    ``reason``: ``converged`` (the iteration's) or ``gram`` (k plus the oversampling exceeds half of min(m, n),
    where an iteration would cost as much as a dense decomposition: the float64 Gram eigenpairs, checked), or
    why the exact route was taken: ``block`` (k = 0), ``zero`` (a zero matrix), ``cost`` (fewer than three
    iterations cost as much as the exact route: small or nearly square-k problems), ``stalled`` (the residuals'
    decay, extrapolated, would not reach the tolerance within the budget), ``budget`` (``max_iter``
    iterations without convergence) or ``gram-residual`` (the Gram triplets failed their check: a kept
    σ_i too small against σ₁ for the squared condition number); ``iterations`` run; ``residual``: the certificate's error measure at the last iteration, the larger of
    the largest residual over σ₁ and Wedin's subspace bound (:func:`certified_top_k`; NaN when none ran).
    """

    route: str
    reason: str
    iterations: int
    residual: float


def certified_top_k(matrix: torch.Tensor, k: int, *, tol: float = CERTIFIED_TOL, max_iter: int = _CERTIFIED_MAX_ITER,
                    oversample: int | None = None, seed: int = 0) -> tuple[SVD, TopKInfo]:
    """Top-``k`` singular triplets by randomized subspace iteration, certified by their residuals.

    Halko, Martinsson & Tropp (SIAM Review 2011), Alg. 4.4 (subspace iteration) with a Rayleigh–Ritz step
    every iteration: on the tall orientation (A is m × n, m ≥ n; a wide matrix is taken transposed) a
    seeded Gaussian block ``Ω`` (n × l, ``l = k + oversample``; by default ``l = 2k`` where that is at most
    n/2, else n/2, and at least k + 8) gives ``Y = A Ω``; each iteration orthonormalises ``Q = orth(Y)``,
    forms ``B = QᵀA`` (as ``Z = AᵀQ``), takes the SVD ``B = W Σ Xᵀ`` (via ``Z = P R`` and the SVD of the
    l × l ``Rᵀ``) and the Ritz triplets ``u_i = Q w_i``, ``σ_i``, ``v_i = P x_i``; then ``Y = A V`` is both
    the next iteration's block and the residuals ``r_i = ‖A v_i − σ_i u_i‖``.

    **Certificate.** The iteration stops when, over the kept triplets (i < k), both
    ``max_i r_i ≤ tol · σ₁`` (each is an exact triplet of a matrix within ``√2 · tol · σ₁`` of A) and Wedin's
    bound ``‖(r_1 … r_k)‖ / (σ_k − σ_{k+1}) ≤ tol`` on the sine of the angle between the computed and the exact
    top-k singular subspaces (σ_{k+1}: the first Ritz value not kept), and the same for the other residuals
    ``‖Aᵀ u_i − σ_i v_i‖`` (zero by construction up to rounding, computed once). The residual alone, as first
    specified, is not enough for the merging methods: TSV-M's polar factors and Iso-CTS's flat spectrum use
    the kept *directions* whatever their σ, and a triplet near k with σ_k ≈ 1e-4 σ₁ passes a 1e-5 · σ₁
    residual with a direction off by ~σ_k/gap (measured: TSV-M 2e-4, Iso-CTS 9e-4 from the exact route).
    That the triplets are the *top* k relies on the random start, as in any randomized method.

    When the block would exceed half of min(m, n) the triplets come instead from the float64 Gram matrix
    ``AᵀA``'s eigenpairs, checked the same way (every k, KnOTS's full decomposition included; cheaper than an
    SVD for a tall matrix). It falls back to the exact :func:`truncated_svd` (``TopKInfo.route == "exact"``,
    logged at DEBUG) when a check fails, or when the error measure, decaying geometrically at the rate of
    the last iterations, would not reach the tolerance within the budget (checked from the third iteration
    on, so a flat spectrum costs about three iterations before the dense route), or after the budget:
    ``max_iter``, lowered to the number of iterations that cost as much as the exact route (a flop estimate,
    in the code), so the iteration is only pursued while it can be cheaper. Everything runs in float64
    (float32 products would floor the residuals at ~1e-6 · σ₁, above what the subspace bound needs); the
    result comes back in the input's dtype; deterministic for a given ``seed``.
    """
    if matrix.ndim != 2:
        raise ValueError(f"certified_top_k expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    if k < 0:
        raise ValueError(f"certified_top_k: k must be non-negative, got {k}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"certified_top_k: tol must be > 0 and max_iter >= 1, got {tol} and {max_iter}")
    m, n = matrix.shape
    if m < n:
        dec, info = certified_top_k(matrix.T, k, tol=tol, max_iter=max_iter, oversample=oversample, seed=seed)
        return SVD(dec.Vh.T, dec.S, dec.U.T), info
    k = min(k, n)
    if oversample is None:  # l = 2k where it fits in half of n (fewer iterations: σ_{l+1}/σ_k is smaller)
        oversample = max(8, min(k, int(_CERTIFIED_MAX_BLOCK * n) - k))
    block = k + oversample

    def exact(reason: str, iterations: int = 0, residual: float = math.nan) -> tuple[SVD, TopKInfo]:
        if reason not in ("block", "zero", "cost"):
            logger.debug("certified top-%d of a %d×%d matrix: %s after %d iteration(s) (residual %.2e σ₁); "
                         "exact route", k, m, n, reason, iterations, residual)
        return truncated_svd(matrix, k), TopKInfo("exact", reason, iterations, residual)

    if k == 0:
        return exact("block")
    if block > _CERTIFIED_MAX_BLOCK * n:
        return _certified_gram(matrix, k, tol, exact)
    # No more iterations than the exact route's cost allows: ~2mn² + 10n³ flops for the Gram product and its
    # eigendecomposition (an eigh's flops run ~3-5× slower than a product's) against, per iteration, the two
    # products 4mnl, the two QRs 4(m + n)l² and the Ritz SVD of the l × l block, counted like the eigh (10l³),
    # the whole iteration weighted _CERTIFIED_ITER_WEIGHT: measured in float64 on 2 cores (m × n × l = 2048² ×
    # 1024, 5632 × 2048 × 1024, 768² × 192, 3072 × 768 × 192, 2048² × 256), an iteration costs 1.6-2.1× this
    # estimate against the exact route's time. So a fall-back costs at most about twice the exact route.
    iteration = 4 * m * n * block + 4 * (m + n) * block**2 + 10 * block**3
    affordable = (2 * m * n * n + 10 * n**3) / (_CERTIFIED_ITER_WEIGHT * iteration)
    if affordable < 3:  # not even the iterations that the stall test needs: the exact route is cheaper
        return exact("cost")
    max_iter = min(max_iter, int(affordable))
    a = matrix.to(torch.float64)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    y = a @ torch.randn(n, block, generator=gen, device=a.device, dtype=a.dtype)
    history: list[float] = []
    for it in range(1, max_iter + 1):
        q, _ = torch.linalg.qr(y)
        p, r = torch.linalg.qr(a.T @ q)
        w, s, xh = torch.linalg.svd(r.T)
        if not float(s[0]) > 0:
            return exact("zero", it)
        u = q @ w[:, :k]
        v_all = p @ xh.T
        y = a @ v_all  # A V for the whole block: the next iteration's sample
        res = (y[:, :k] - u * s[:k]).norm(dim=0)
        worst = _certificate(res, s, k)
        if worst <= tol:
            v = v_all[:, :k]
            other = _certificate((a.T @ u - v * s[:k]).norm(dim=0), s, k)
            if other <= tol:
                dt = matrix.dtype
                dec = SVD(u.to(dt), s[:k].to(dt), v.T.contiguous().to(dt))
                return dec, TopKInfo("certified", "converged", it, max(worst, other))
        history.append(worst)
        if len(history) >= 3:
            rate = math.sqrt(history[-1] / history[-3]) if history[-3] > 0 else 1.0
            if rate >= 1.0 or it + math.log(tol / worst) / math.log(rate) > max_iter:
                return exact("stalled", it, worst)
    return exact("budget", max_iter, history[-1])


def _certificate(residuals: torch.Tensor, s: torch.Tensor, k: int) -> float:
    """The certified route's error measure of k kept triplets: the larger of the largest residual over σ₁ and
    Wedin's bound ``‖R‖_F / (σ_k − σ_{k+1})`` on the sine of the angle between the computed and the exact top-k
    singular subspaces (``s``: the Ritz values, σ_{k+1} the first one not kept, 0 when there is none)."""
    gap = float(s[k - 1] - s[k]) if s.numel() > k else float(s[k - 1])
    subspace = float(residuals.norm()) / gap if gap > 0 else math.inf
    return max(float(residuals.max()) / float(s[0]), subspace)


def _certified_gram(matrix: torch.Tensor, k: int, tol: float, exact) -> tuple[SVD, TopKInfo]:
    """The certified route where no iteration pays (k large against n): the top-k eigenpairs of the float64
    Gram matrix ``AᵀA`` (A tall), ``v_i`` its eigenvectors, ``u_i = A v_i / σ_i``, accepted when the kept
    triplets pass :func:`_certificate` (residuals against A in float64); else ``exact(reason)``."""
    a = matrix.to(torch.float64)
    evals, evecs = torch.linalg.eigh(a.T @ a)
    s_all = evals.flip(0).clamp_min(0).sqrt()
    if not float(s_all[0]) > 0:
        return exact("zero")
    s = s_all[:k]
    v = evecs[:, -k:].flip(1)
    av = a @ v
    if not float(s[-1]) > 0:
        return exact("gram-residual", 1, math.inf)
    u = av / s
    # ‖A v_i − σ_i u_i‖ = 0 by construction of u_i; ‖Aᵀu_i − σ_i v_i‖ = ‖AᵀA v_i − λ_i v_i‖ / σ_i, and u_i's
    # norm (1 in exact arithmetic) measures the first residual's rounding: ‖A v_i‖ − σ_i.
    worst = _certificate(torch.maximum((a.T @ u - v * s).norm(dim=0), (av.norm(dim=0) - s).abs()), s_all, k)
    if worst > tol:
        return exact("gram-residual", 1, worst)
    dt = matrix.dtype
    return SVD(u.to(dt), s.to(dt), v.T.contiguous().to(dt)), TopKInfo("certified", "gram", 1, worst)


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
