"""Rotations: parametrisations of SO(d) and the closed-form orthogonal Procrustes solution.

Used by the data-based merging methods (:mod:`taskmerge.databased`): MDA-AM learns one rotation per task
on the final features and regularises it toward a Procrustes solution; MOMA optionally keeps its
per-task alignment matrices orthogonal by construction.

* :class:`Rotation` — a trainable ``d × d`` rotation, ``R = exp(A − Aᵀ)`` (default) or the Cayley map
  ``R = (I − K)⁻¹(I + K)`` with ``K = A − Aᵀ``. Both are in SO(d) for *every* value of the unconstrained
  parameter ``A`` (the exponential and the Cayley transform of a skew-symmetric matrix are rotations), so
  the constraint holds throughout training, not only at convergence; ``A = 0`` gives ``R = I``.
* :func:`nearest_rotation` — the rotation closest to a matrix in Frobenius norm (the "special" polar
  factor, Kabsch's determinant correction); :func:`nearest_orthogonal` is the plain polar factor (O(d)).
* :func:`procrustes` — ``argmin_R ‖X Rᵀ − Y‖_F`` over SO(d) (or O(d)): the rotation that best maps the rows
  of ``X`` onto the rows of ``Y`` when applied to column vectors (``R x_i ≈ y_i``).

Conventions. Features are rows of ``X`` / ``Y`` (``n × d``) and a rotation acts on a column feature ``h`` as
``R h`` (a batch of row features as ``H Rᵀ``). With ``G = Yᵀ X``, ``‖X Rᵀ − Y‖² = ‖X‖² + ‖Y‖² − 2 tr(Rᵀ G)``,
so the optimum is the orthogonal matrix closest to ``G``: ``polar(G)`` over O(d) and, over SO(d),
``U diag(1, …, 1, det(U Vᵀ)) Vᵀ`` for ``G = U Σ Vᵀ`` (the Kabsch correction the MDA paper omits,
spec flag A9). In MDA's row notation (``argmin_R ‖M R − M*‖``) the row-side solution is this ``Rᵀ``.

Non-uniqueness. When ``G`` has rank ``r < d`` (fewer class means than dimensions, the usual case) every
rotation that agrees with the optimum on the ``r``-dimensional range is optimal, and which one an SVD
returns is arbitrary. ``completion="identity"`` (default, [INFERRED], our choice) returns the optimal
rotation closest to the identity — it maps the range as required and moves the orthogonal complement as
little as possible — so that a regulariser ``‖R − R_proc‖²`` does not drag unconstrained directions toward
an arbitrary rotation; ``completion="svd"`` returns whatever the SVD gives (the paper's literal recipe).

Every SVD / polar factor goes through :mod:`taskmerge.linalg`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from taskmerge import linalg

__all__ = [
    "Rotation",
    "skew",
    "exp_rotation",
    "cayley_rotation",
    "nearest_rotation",
    "nearest_orthogonal",
    "procrustes",
    "procrustes_objective",
    "is_rotation",
]

Parametrization = Literal["exp", "cayley"]
Completion = Literal["identity", "svd"]

# Singular values of G below this fraction of the largest count as zero (rank decision for the completion).
_RANK_RTOL = 1e-6


def skew(a: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric part ``A − Aᵀ`` of a square matrix (batched over leading dimensions)."""
    return a - a.transpose(-1, -2)


def exp_rotation(a: torch.Tensor) -> torch.Tensor:
    """``exp(A − Aᵀ)``: a rotation for any square ``A`` (differentiable, batched)."""
    return torch.linalg.matrix_exp(skew(a))


def cayley_rotation(a: torch.Tensor) -> torch.Tensor:
    """The Cayley map ``(I − K)⁻¹ (I + K)`` of ``K = A − Aᵀ``: a rotation for any square ``A``.

    ``I − K`` is always invertible (the eigenvalues of a skew matrix are imaginary); the Cayley map never
    reaches rotations with eigenvalue −1, which a rotation initialised at ``I`` and moved by small steps
    does not need.
    """
    k = skew(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(k)
    return torch.linalg.solve(eye - k, eye + k)


class Rotation(nn.Module):
    """A trainable rotation ``R ∈ SO(d)``, ``R = exp(A − Aᵀ)`` or Cayley, with ``A`` initialised at 0 (``R = I``).

    Args:
        dim: the size ``d``.
        parametrization: ``"exp"`` (matrix exponential, default) or ``"cayley"``.
        count: ``None`` for one rotation, or ``T`` for a stack of ``T`` rotations (``T × d × d``).
    """

    def __init__(self, dim: int, parametrization: Parametrization = "exp", count: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if parametrization not in ("exp", "cayley"):
            raise ValueError(f"parametrization must be 'exp' or 'cayley', got {parametrization!r}")
        shape = (dim, dim) if count is None else (count, dim, dim)
        self.parametrization = parametrization
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def forward(self) -> torch.Tensor:
        """The rotation matrix (or stack), differentiable in the parameter."""
        return exp_rotation(self.weight) if self.parametrization == "exp" else cayley_rotation(self.weight)

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The current rotation(s), detached."""
        return self.forward().detach()


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to a square ``matrix`` (its polar factor, :func:`taskmerge.linalg.polar`).

    For a rank-deficient matrix the polar factor is not unique; :func:`taskmerge.linalg.polar` then returns a
    partial isometry, so use :func:`nearest_rotation` when an exactly orthogonal result is needed.
    """
    return linalg.polar(matrix)


def _kabsch(matrix: torch.Tensor, sign: float | None) -> torch.Tensor:
    """``argmax tr(Qᵀ M)`` over orthogonal ``Q`` with ``det Q = sign`` (any determinant when ``None``)."""
    dec = linalg.svd(matrix)
    u, vh = dec.U, dec.Vh
    if sign is not None:
        det = torch.linalg.det(u @ vh)
        if float(det) * sign < 0:
            u = u.clone()
            u[:, -1] = -u[:, -1]  # flip the pair of the smallest singular value
    return u @ vh


def nearest_rotation(matrix: torch.Tensor) -> torch.Tensor:
    """The rotation (``det = +1``) closest to a square ``matrix`` in Frobenius norm: ``U diag(1,…,1,±1) Vᵀ``."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"nearest_rotation expects a square matrix, got shape {tuple(matrix.shape)}")
    return _kabsch(matrix, 1.0)


def _completed(g: torch.Tensor, proper: bool) -> torch.Tensor:
    """The optimum of ``max tr(Rᵀ G)`` closest to the identity among all optima (rank-deficient ``G``).

    With ``G = U Σ Vᵀ`` and ``r`` non-zero singular values, every optimum is ``U_r V_rᵀ + U_⊥ K V_⊥ᵀ`` with
    ``K`` orthogonal; the one closest to ``I`` maximises ``tr(K V_⊥ᵀ U_⊥)``, i.e. ``K`` is the (special, if
    ``proper``) polar factor of ``U_⊥ᵀ V_⊥``. For a proper rotation ``det K`` must equal ``det U · det V``.
    """
    d = g.shape[0]
    dec = linalg.svd(g)
    u, s, vh = dec.U, dec.S, dec.Vh
    r = int((s > _RANK_RTOL * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    if r == d:
        return _kabsch(g, 1.0 if proper else None)
    u_r, v_r = u[:, :r], vh[:r].T
    u_c, v_c = u[:, r:], vh[r:].T
    sign = float(torch.linalg.det(u) * torch.linalg.det(vh.T)) if proper else None
    k = _kabsch(u_c.T @ v_c, sign)
    return u_r @ v_r.T + u_c @ k @ v_c.T


def procrustes(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    proper: bool = True,
    completion: Completion = "identity",
) -> torch.Tensor:
    """The closed-form orthogonal Procrustes solution ``argmin_R ‖X Rᵀ − Y‖_F``.

    Args:
        source: ``X`` (n × d), rows are the vectors to rotate.
        target: ``Y`` (n × d), rows are where they should land.
        proper: optimise over SO(d) (Kabsch; default) or over O(d) (``polar(Yᵀ X)``).
        completion: among several optima (``rank(Yᵀ X) < d``), ``"identity"`` picks the one closest to
            ``I`` (default), ``"svd"`` the one the SVD happens to return (see the module docstring).

    Returns:
        ``R`` (d × d) with ``R x_i ≈ y_i`` for the rows; the row-side (``X R' ≈ Y``) solution is ``Rᵀ``.
        The computation runs in float64 and the result is cast back to ``source``'s dtype.
    """
    if source.ndim != 2 or source.shape != target.shape:
        raise ValueError(f"procrustes expects X and Y of the same shape (n, d), got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    if completion not in ("identity", "svd"):
        raise ValueError(f"completion must be 'identity' or 'svd', got {completion!r}")
    g = target.double().T @ source.double()
    if completion == "identity":
        out = _completed(g, proper)
    else:
        out = _kabsch(g, 1.0 if proper else None)
    return out.to(source.dtype)


def procrustes_objective(rotation: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖X Rᵀ − Y‖_F²`` (what :func:`procrustes` minimises)."""
    return (source @ rotation.T - target).pow(2).sum()


def is_rotation(matrix: torch.Tensor, atol: float = 1e-5) -> bool:
    """Whether ``matrix`` (or every matrix of a stack) satisfies ``RᵀR = I`` and ``det R = +1`` to ``atol``."""
    m = matrix.double()
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    ortho = (m.transpose(-1, -2) @ m - eye).abs().amax() <= atol
    det = (torch.linalg.det(m) - 1).abs().amax() <= atol
    return bool(ortho and det)
