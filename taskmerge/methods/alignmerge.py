"""AlignMerge-B and AlignMerge-O: subspace-alignment aware merging.

"Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging" (anonymous ICLR submission;
"SEAM-O" in one appendix sentence is AlignMerge-O). Data-free, per 2-D weight matrix; tensors that are
not matrices are averaged by the engine (``matrix_only``, the TSV-M convention the paper follows).
Notation and the algebra both methods rest on (``s_i^r``, ``η^r``, ``ξ``, ``ξ̃``) are in
:mod:`taskmerge.subspace_alignment`; the SAI diagnostics and figures in :mod:`taskmerge.analysis.alignment`.

**AlignMerge-B** (``alignmerge_b``, §4.1, Eqs. 4–9), post-merging balancing. Take the merged update of
any registered method (``base_method`` with ``base_options``; default ``task_arithmetic``, whose update
before λ is the plain sum Σ_i ΔW_i — the paper's base, §4.1 and App. E.2 "after summing all weights", for
which η ≡ 1, Fig. 11), its thin SVD ``Σ_r σ_r u_r v_rᵀ``, and the full coefficients ``ξ̃_i^r`` (Eq. 7). The
gate value of component r is ``g^r = mean_i ξ̃_i^r`` (multi-task mode, default) or ``ξ̃_t^r`` of one
``target_task`` ("preference optimisation", Fig. 5). Eq. 9: ``σ_r ← σ_r / g^r`` if ``g^r >= α`` (Eq. 9's
``>=``; the text says ``>``); unchanged if ``0 < g^r < α``; the component is dropped if ``g^r <= 0`` (Eq. 9
lists g = 0 in two cases; removal wins, as the second spec reads it). The result is added to W_pre with no
further scale, ``W = W_pre + ΔW̃`` (§4.1): the registered λ grid is the single value 1 and the benchmark
sweeps α instead (``option_grid``: 1.0, 1.4, 1.8, 2.2, 3.0 on validation, App. D / Fig. 4).

* ``xi_mode="two_step"`` (default, ``resolved.md`` §AlignMerge 1): ξ is the paper's two-step projection
  (Eq. 5, App. B.2 Eqs. 22–24) with Eq. 23's ``W_i^r P_row^r`` read as ``ΔW_i P_row^r``; on a summed base the
  gate then runs from 1 (a component one task owns; ≈ 1–3 once the other tasks add noise there) to ≈ K (a
  component every task shares equally), so α is a real threshold. Cost: ``ΔW_kᵀ u_r`` and ``ΔW_k v_r`` for
  every task and component, ``K·R·(m + n)`` extra numbers in the input dtype. ``projection_order="row_first"``
  is App. E.2's other order (Fig. 7); on a summed base it gives the same ξ̃ as column first (closed form in
  :mod:`taskmerge.subspace_alignment`).
  ``xi_mode="ratio"`` is the earlier reading ``ξ_{i,j}^r = s_j^r / s_i^r`` (second spec, flag B1), under which
  ``ξ̃_i^r = σ_r / s_i^r``, a divided component gets the harmonic mean of the ``s_i^r``, and the gate on a
  sum is ``>= K`` wherever every task contributes positively (AM–HM), so no α <= K acts there.
* ``α`` (``alpha``): when not given, by the number of tasks K (``alpha_rule="paper_table"``: the paper's
  2 / 8 / 14 / 20 tasks → 0.6 / 1.8 / 2.8 / 6.5, §5.1 and App. D, else K/4; ``"num_tasks_over_4"``: K/4
  always, §5.3's rule of thumb). ``α = 0`` disables the gate (every positive component divided).
* ``base_scale`` multiplies the base update before the calibration (default 1, the paper's plain sum);
  ``0.3`` reads the first spec's "TA with λ = 0.3" as the base merge instead (ξ̃ scales with it).
* The tasks' projections always come from the original task vectors, also for a pruning base such as
  TIES, DARE or TSV-M (spec flag B6). A base method with a model-level statistic gets its own statistic:
  ``alignmerge_b`` delegates its two-pass statistic to the base (over the matrices it merges).
* Guards (never NaN): a task whose update is exactly zero carries no information and is left out of the
  multi-task mean; see :mod:`taskmerge.subspace_alignment` for the guards of ξ; components whose merged
  singular value is numerically zero (``<= max(m, n)·eps_dtype·σ₁``) pass through unchanged, since their
  ξ̃ is noise.

**AlignMerge-O** (``alignmerge_o``, §4.2, Eqs. 10–14, App. Alg. 1), pre-merging orthogonalisation:

1. per-task top-``L`` triplets, ``L = ⌊(R − 1)/K⌋`` with ``R = min(m, n)`` (``components_per_task``
   overrides; at least 1, at most R — when ``R <= K``, e.g. a 1×n matrix, that leaves more columns than
   R, which step 4 whitens over their rank, as TSV-M does with orthonormal rows);
2. the aligned top component (Eq. 11): ``u_top ∝ Σ_i ε_i u_i¹``, ``v_top ∝ Σ_i ε_i v_i¹``, ``σ_top = mean_i σ_i¹``.
   Singular pairs are defined up to a joint sign, so each pair is flipped first (spec flag B7):
   ``ε_i = sign(u*·u_i¹)`` (+1 at 0) with ``u*`` the top left singular vector of ``Σ_i ΔW_i``
   (``sign_reference="sum_top"``, default) or task 1's ``u_1¹`` (``"first_task"``); a joint flip leaves
   ``M_i¹`` unchanged. If the signed sums vanish, ``(u*, v*)`` is used;
3. residuals (Eq. 12) ``M_res,i = M_i¹ − Proj_{M_top}(M_i¹) M_top`` and their top triplet, from the
   rank-2 factorisation (:func:`taskmerge.linalg.lowrank_svd`, no m×n SVD);
4. concatenation (Eq. 13) ``Û = [u_top, {u_res,i}, {u_i^{2..L}}]`` (likewise ``V̂``, ``σ̂``) and whitening
   (as TSV-M: ``Û = P D Qᵀ → Û⊥ = P Qᵀ``). **Finding:** Û is always rank-deficient — ``u_top`` and every
   ``u_res,i`` lie in ``span(u_1¹, …, u_K¹)`` (K + 1 vectors in K dimensions; likewise on the V side) — so
   the paper's polar factor is not unique: the SVD completes the null direction arbitrarily (by rounding
   noise in float32), which would put a backend-dependent direction into the merge. We whiten with the
   canonical choice, the partial isometry ``P_r Q_rᵀ`` over the numerical rank r of Û (ZCA whitening
   ``Û (ÛᵀÛ)^{+1/2}`` with the pseudo-inverse), which is the polar factor whenever Û has full rank;
5. ``σ̂_r / η^r = p_r = û⊥_rᵀ (Σ_i ΔW_i) v̂⊥_r`` (Alg. 1 line 24; computed directly, never dividing by a small
   denominator). ``eta_reference="owner"`` uses Eq. 10 / App. E.2's single owner task instead,
   ``p_r = û⊥_rᵀ ΔW_{i*} v̂⊥_r`` with ``i* = argmax_i |û⊥_rᵀ ΔW_i v̂⊥_r|`` (spec flag B8);
6. reconstruction (Eq. 14) ``c Σ_r p_r û⊥_r v̂⊥_rᵀ`` with the norm-preserving factor chosen so that
   ``‖ΔW̃‖_F = ‖σ̂‖₂`` exactly, as App. B.4 states: ``c = ‖σ̂‖₂ / ‖Σ_r p_r û⊥_r v̂⊥_rᵀ‖_F``. This is the paper's
   ``sqrt(Σ σ̂² / Σ (σ̂/η)²)`` whenever the whitened bases have orthonormal columns (``extract_aligned=False``
   with the default L); with the partial isometry of step 4 (or more than R columns) the paper's formula
   would no longer preserve the norm it is introduced to preserve.

Ablations (Table 3): ``extract_aligned=False`` (each task's own top-L, i.e. the TSV-M concatenation,
:func:`taskmerge.methods.tsv.tsv_bases`), ``divide_eta=False`` (``σ̂`` as is, ``c = 1``); both off is
TSV-M with per-task rank L. Triplets that are numerically zero relative to their task's top singular
value (a zero task; ``max(m, n)·eps``), and residuals below ``√eps·σ_i¹`` (a single task, identical tasks:
rounding noise), are left out before whitening, since a unit column with an arbitrary direction would
rotate the others; the rank of Û in step 4 uses the same ``√eps`` threshold. ``σ_top`` is still the
mean over all K tasks. If the η-corrected sum is numerically zero (e.g. the tasks cancel) the update is
zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from taskmerge import linalg
from taskmerge.errors import OptionError
from taskmerge.methods.tsv import tsv_bases
from taskmerge.registry import GlobalStatistic, LayerContext, MethodOptions, get_method, register_method
from taskmerge.subspace_alignment import (
    DEFAULT_EPS,
    ProjectionOrder,
    XiMode,
    decompose_merge,
    full_coefficient,
    subspace_projections,
)

__all__ = [
    "AlignMergeBOptions",
    "AlignMergeOOptions",
    "PAPER_ALPHA",
    "ALPHA_GRID",
    "resolve_alpha",
    "calibrate",
    "aligned_bases",
    "alignmerge_b",
    "alignmerge_o",
]

_PAPER = (
    "'Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging' "
    "(AlignMerge, anonymous ICLR submission)"
)

#: α per number of tasks (§5.1 and App. D).
PAPER_ALPHA: dict[int, float] = {2: 0.6, 8: 1.8, 14: 2.8, 20: 6.5}

#: The α values the benchmark chooses from on validation (``resolved.md`` §AlignMerge 2; App. D, Fig. 4).
ALPHA_GRID: tuple[float, ...] = (1.0, 1.4, 1.8, 2.2, 3.0)


def _tolerance(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative threshold of a numerically zero singular value of a matrix (``max(m, n)·eps``)."""
    return max(shape[-2:]) * torch.finfo(dtype).eps


def _derived_tolerance(dtype: torch.dtype) -> float:
    """Relative threshold for quantities assembled from several rounded products (the residual of Eq. 12,
    the rank of Û): ``√eps`` (1.5e-8 in float64, 3.5e-4 in float32), well above their rounding error."""
    return torch.finfo(dtype).eps ** 0.5


def _check_deltas(deltas: torch.Tensor, method: str) -> None:
    if deltas.ndim != 3 or deltas.shape[0] < 1:
        raise OptionError(f"method {method!r} merges 2-D matrices of T >= 1 tasks; got shape {tuple(deltas.shape)}")


# --------------------------------------------------------------------------------------------------
# AlignMerge-B
# --------------------------------------------------------------------------------------------------


class AlignMergeBOptions(MethodOptions):
    """Options of ``alignmerge_b`` (module docstring)."""

    base_method: str = Field(
        "task_arithmetic",
        description="registered method whose merged update is calibrated (task_arithmetic: the plain sum, the "
        "paper's base; ties, dare, tsv_m, ...: AlignMerge-B on top of another merge, Table 15)",
    )
    base_options: dict[str, Any] = Field(default_factory=dict, description="options of the base method")
    base_scale: float = Field(
        1.0, gt=0, description="factor applied to the base update before the calibration (> 0; 1 = the plain sum)"
    )
    alpha: float | None = Field(
        None,
        ge=0,
        description="gate α of Eq. 9 (>= 0; 0 divides every positive component); None = by the number of tasks "
        "(alpha_rule)",
    )
    alpha_rule: Literal["paper_table", "num_tasks_over_4"] = Field(
        "paper_table",
        description="α when alpha is None: 'paper_table' (2/8/14/20 tasks → 0.6/1.8/2.8/6.5, else K/4) or "
        "'num_tasks_over_4' (K/4, §5.3)",
    )
    target_task: int | None = Field(
        None, ge=0, description="preference optimisation for this task (0-based, < K, Fig. 5); None = all tasks"
    )
    xi_mode: Literal["two_step", "ratio"] = Field(
        "two_step",
        description="cross-influence ξ: 'two_step' projection of Eq. 5 / Eq. 23 (default) or 'ratio' s_j/s_i "
        "(the earlier reading)",
    )
    projection_order: Literal["column_first", "row_first"] = Field(
        "column_first",
        description="order of the two projections of ξ (App. E.2, Fig. 7); same ξ̃ on a summed base, moot for 'ratio'",
    )
    eps: float = Field(
        DEFAULT_EPS, gt=0, lt=1, description="relative guard (0 < eps < 1) of |s_i^r|, ξ's and η's denominators"
    )

    @field_validator("base_method")
    @classmethod
    def _known_base(cls, value: str) -> str:
        if value == "alignmerge_b":
            raise ValueError("AlignMerge-B cannot post-process itself")
        try:
            get_method(value)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _base_options_valid(self) -> AlignMergeBOptions:
        get_method(self.base_method).parse(self.base_options)  # an OptionError names the base method
        return self


def resolve_alpha(options: AlignMergeBOptions, num_tasks: int) -> float:
    """The gate α for ``num_tasks`` tasks: ``options.alpha`` if given, else by ``options.alpha_rule``."""
    if options.alpha is not None:
        return options.alpha
    if options.alpha_rule == "paper_table" and num_tasks in PAPER_ALPHA:
        return PAPER_ALPHA[num_tasks]
    return num_tasks / 4.0


def calibrate(
    deltas: torch.Tensor,
    merged: torch.Tensor,
    *,
    alpha: float,
    target_task: int | None = None,
    xi_mode: XiMode = "two_step",
    projection_order: ProjectionOrder = "column_first",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 9 applied to ``merged`` (m, n) given the task updates ``deltas`` (K, m, n)."""
    dec = decompose_merge(deltas, merged)
    coeff = full_coefficient(deltas, mode=xi_mode, order=projection_order, dec=dec, eps=eps)  # (K, R), float64
    if target_task is None:
        live = deltas.flatten(1).abs().amax(dim=1) > 0
        if not bool(live.any()):
            return merged
        gate = coeff[live].mean(dim=0)
    else:
        gate = coeff[target_task]
    sigma = dec.sigma.double()
    divided = sigma / torch.where(gate > 0, gate, torch.ones_like(gate))
    new = torch.where(gate <= 0, torch.zeros_like(sigma), torch.where(gate >= alpha, divided, sigma))
    if sigma.numel():
        negligible = sigma <= _tolerance(tuple(merged.shape), merged.dtype) * sigma[0]
        new = torch.where(negligible, sigma, new)
    return (dec.U * new.to(merged.dtype)) @ dec.Vh


class _DelegatedStatistic:
    """The base method's model-level statistic, fed the base method's options (and the layer context when
    the base statistic asks for it, ``wants_context``)."""

    def __init__(self, inner: GlobalStatistic, base_options: MethodOptions) -> None:
        self.inner = inner
        self.base_options = base_options
        self.wants_context = bool(getattr(inner, "wants_context", False))

    def collect(
        self, name: str, deltas: torch.Tensor, options: MethodOptions, ctx: LayerContext | None = None
    ) -> Any:
        if self.wants_context:
            return self.inner.collect(name, deltas, self.base_options, ctx)
        return self.inner.collect(name, deltas, self.base_options)

    def finalize(self, collected: Mapping[str, Any], options: MethodOptions) -> Any:
        return self.inner.finalize(collected, self.base_options)


def _base_statistic(options: AlignMergeBOptions) -> GlobalStatistic | None:
    spec = get_method(options.base_method)
    base_options = spec.parse(options.base_options)
    inner = spec.statistic_for(base_options)
    return None if inner is None else _DelegatedStatistic(inner, base_options)


@register_method(
    "alignmerge_b",
    options=AlignMergeBOptions,
    paper=f"{_PAPER}, §4.1, Eqs. 4-9",
    summary="AlignMerge-B: rescale each singular component of a base merge by the tasks' full coefficient ξ̃ (gate α)",
    matrix_only=True,
    default_lambda=1.0,
    lambda_grid=(1.0,),
    option_grid=("alpha", ALPHA_GRID),
    global_statistic=_base_statistic,
)
def alignmerge_b(deltas: torch.Tensor, options: AlignMergeBOptions, ctx: LayerContext) -> torch.Tensor:
    """AlignMerge-B's merged update of one matrix, before λ (module docstring)."""
    _check_deltas(deltas, "alignmerge_b")
    K = deltas.shape[0]
    if options.target_task is not None and options.target_task >= K:
        raise OptionError(
            f"method 'alignmerge_b': option target_task = {options.target_task}, but only {K} tasks are merged"
        )
    spec = get_method(options.base_method)
    merged = spec.fn(deltas, spec.parse(options.base_options), ctx).to(deltas.dtype)
    if merged.shape != deltas.shape[1:]:
        raise OptionError(f"method 'alignmerge_b': base method {spec.name!r} returned shape {tuple(merged.shape)}")
    if options.base_scale != 1.0:
        merged = merged * options.base_scale
    return calibrate(
        deltas,
        merged,
        alpha=resolve_alpha(options, K),
        target_task=options.target_task,
        xi_mode=options.xi_mode,
        projection_order=options.projection_order,
        eps=options.eps,
    )


# --------------------------------------------------------------------------------------------------
# AlignMerge-O
# --------------------------------------------------------------------------------------------------


class AlignMergeOOptions(MethodOptions):
    """Options of ``alignmerge_o`` (module docstring)."""

    extract_aligned: bool = Field(True, description="extract the aligned top component (Table 3 ablation when off)")
    divide_eta: bool = Field(True, description="divide by η, norm-preserving factor (Table 3 ablation when off)")
    eta_reference: Literal["sum", "owner"] = Field(
        "sum", description="η from Σ_i ΔW_i (Alg. 1) or from the owner task (Eq. 10)"
    )
    sign_reference: Literal["sum_top", "first_task"] = Field("sum_top", description="sign convention of the top pairs")
    components_per_task: int | None = Field(
        None,
        ge=1,
        description="L, components per task (>= 1, capped at min(m, n)); default ⌊(min(m, n) − 1)/K⌋, at least 1",
    )
    svd: linalg.SvdRoute = Field("exact", description=linalg.SVD_ROUTE_DESCRIPTION)


def aligned_bases(
    deltas: torch.Tensor, L: int, sign_reference: Literal["sum_top", "first_task"] = "sum_top",
    svd: linalg.SvdRoute = "exact",
) -> linalg.SVD:
    """Steps 1–4 of AlignMerge-O: the whitened ``(Û⊥, σ̂, V̂⊥ᵀ)`` with the aligned top component extracted.

    ``svd`` picks how the per-task top-L SVDs are computed (:func:`taskmerge.linalg.truncated_svd`)."""
    K, m, n = deltas.shape
    tol = _tolerance((m, n), deltas.dtype)
    svds = [linalg.truncated_svd(d, L, svd) for d in deltas]
    U = torch.stack([s.U for s in svds])  # (K, m, L)
    S = torch.stack([s.S for s in svds])  # (K, L)
    V = torch.stack([s.Vh.T for s in svds])  # (K, n, L)
    u1, v1, s1 = U[:, :, 0], V[:, :, 0], S[:, 0]
    empty = linalg.SVD(deltas.new_zeros(m, 0), deltas.new_zeros(0), deltas.new_zeros(0, n))
    if not bool((s1 > 0).any()):
        return empty
    live = s1 > tol * s1.max()

    top_of_sum: list[linalg.SVD] = []

    def sum_top() -> linalg.SVD:
        if not top_of_sum:
            top_of_sum.append(linalg.truncated_svd(deltas.sum(dim=0), 1))
        return top_of_sum[0]

    ref = sum_top().U[:, 0] if sign_reference == "sum_top" else u1[int(live.nonzero()[0])]
    signs = torch.where(u1 @ ref < 0, -1.0, 1.0).to(deltas.dtype) * live.to(deltas.dtype)
    u_sum = (signs[:, None] * u1).sum(dim=0)
    v_sum = (signs[:, None] * v1).sum(dim=0)
    if u_sum.norm() <= tol or v_sum.norm() <= tol:
        u_top, v_top = sum_top().U[:, 0], sum_top().Vh[0]
    else:
        u_top, v_top = u_sum / u_sum.norm(), v_sum / v_sum.norm()
    s_top = s1.mean()

    cols_u, cols_v, sig = [u_top], [v_top], [s_top]
    for i in live.nonzero().flatten().tolist():
        # M_res,i = σ_i u_i v_iᵀ − Proj_{M_top}(M_i) M_top = σ_i (u_i v_iᵀ − (u_i·u_top)(v_i·v_top) u_top v_topᵀ)
        coef = s1[i] * (u1[i] @ u_top) * (v1[i] @ v_top)
        left = torch.stack([s1[i] * u1[i], -coef * u_top], dim=1)
        right = torch.stack([v1[i], v_top], dim=0)
        res = linalg.lowrank_svd(left, right, 1)
        if res.S[0] > _derived_tolerance(deltas.dtype) * s1[i]:
            cols_u.append(res.U[:, 0])
            cols_v.append(res.Vh[0])
            sig.append(res.S[0])
    keep = (S[:, 1:] > tol * S[:, :1]).reshape(-1)
    rest_u = U[:, :, 1:].permute(1, 0, 2).reshape(m, -1)[:, keep]
    rest_v = V[:, :, 1:].permute(1, 0, 2).reshape(n, -1)[:, keep]
    u_hat = torch.cat([torch.stack(cols_u, dim=1), rest_u], dim=1)
    v_hat = torch.cat([torch.stack(cols_v, dim=1), rest_v], dim=1)
    s_hat = torch.cat([torch.stack(sig), S[:, 1:].reshape(-1)[keep]])
    return linalg.SVD(_whiten(u_hat), s_hat, _whiten(v_hat.T))


def _whiten(x: torch.Tensor) -> torch.Tensor:
    """The polar factor restricted to the numerical rank (the partial isometry ``P_r Q_rᵀ``); equal to
    the polar factor for a matrix of full rank (module docstring, step 4)."""
    return linalg.polar(x, rtol=_derived_tolerance(x.dtype))


@register_method(
    "alignmerge_o",
    options=AlignMergeOOptions,
    paper=f"{_PAPER}, §4.2, Eqs. 10-14",
    summary="AlignMerge-O: TSV-M with the tasks' aligned top component extracted, η-corrected, norm-preserving",
    matrix_only=True,
    default_lambda=1.0,
)
def alignmerge_o(deltas: torch.Tensor, options: AlignMergeOOptions, ctx: LayerContext) -> torch.Tensor:
    """AlignMerge-O's merged update of one matrix, before λ (module docstring)."""
    _check_deltas(deltas, "alignmerge_o")
    K, m, n = deltas.shape
    R = min(m, n)
    L = options.components_per_task if options.components_per_task is not None else max(1, (R - 1) // K)
    L = min(L, R)
    if options.extract_aligned:
        bases = aligned_bases(deltas, L, options.sign_reference, options.svd)
    else:
        bases = tsv_bases(deltas, L, svd=options.svd)
    if bases.S.numel() == 0:
        return deltas.new_zeros(m, n)
    if not options.divide_eta:
        return bases.reconstruct()
    if options.eta_reference == "sum":
        p = subspace_projections(deltas.sum(dim=0, keepdim=True), bases.U, bases.Vh)[0]
    else:
        proj = subspace_projections(deltas, bases.U, bases.Vh)  # (K, N)
        p = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True))[0]
    core = (bases.U * p) @ bases.Vh
    core_norm, s_norm = core.norm(), bases.S.norm()
    if not bool(core_norm > _tolerance((m, n), deltas.dtype) * s_norm):
        return deltas.new_zeros(m, n)
    return core * (s_norm / core_norm)
