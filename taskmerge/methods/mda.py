"""MDA-TA: Merging with Directional Alignment, data-free part (Chen et al., arXiv 2512.00391, Alg. 1, Eq. 3).

Per 2-D weight matrix with task updates ``Δ_1..Δ_T`` (``m × n``, PyTorch ``nn.Linear`` layout:
``m = out_features`` rows, ``n = in_features`` columns):

1. thin SVD of every ``Δ_t``; keep its top ``k`` triplets (default ``k = ⌊min(m, n)/T⌋``, the TSV-M rule,
   equal to the paper's ``d_out/T`` on square layers; Table 14's ``k = ρ·d_out`` via ``k_fraction``);
2. concatenate the kept bases ``U_cat = [U_1^k … U_T^k]``, ``V_cat = [V_1^k … V_T^k]`` and whiten them with
   their polar factors (the "two SVDs of the concatenated U_cat and V_cat" of the paper's complexity
   analysis, B.4.3): ``τ_share = polar(U_cat) diag(σ_cat) polar(V_cat)ᵀ``;
3. project onto the simplex-ETF direction matrix ``P_ETF = W_ETFᵀ W_ETF`` (:mod:`taskmerge.etf`) of
   ``C`` classes: ``τ_etf = τ_share P_ETF`` (default side) — the merged update before λ. With the default
   ``etf_size="table"``, ``P_ETF = C/(C−1)·I`` and MDA-TA is TSV-M times ``C/(C−1)`` (see "ETF size" below).

Ambiguities and how they are resolved (MDA specs, flags A1, A4, A5, A13):

* **What τ_share is (A1, the central one).** The paper defines ``τ_share := U_share[:, :d_out]``, a bare
  orthonormal basis with no singular values and no right side. Default (``shared="tsv"``): τ_share is
  the TSV-M merged update of step 2, i.e. MDA-TA = TSV-M followed by the ETF projection. Alternative
  ``shared="basis"``: the literal reading, ``U_share`` (left singular vectors of ``U_cat``) truncated or
  zero-padded to ``n`` columns — kept for the record; it is not a weight update and should fail.
* **Which side P_ETF acts on.** The paper right-multiplies ``τ ∈ R^{d_in×d_out}`` by ``P_ETF ∈ R^{d_out×d_out}``
  and calls ``d_out`` "the parameter output dimension". The two specs read this differently.
  Default ``etf_side="in"`` (second MDA spec, flag on §2): the paper's matrices are the stored PyTorch
  tensors, so ``τ P_ETF`` is ``Δ P_ETF`` and acts on the **columns** (``n = in_features``). This is the
  literal product on the stored matrix and fits the paper's "d_out is typically 768 (ViT-B) / 1024
  (ViT-L)", the column count of 3 of the 4 matrices of a ViT block. ``etf_side="out"`` (first MDA spec):
  the paper's τ is ``Δᵀ`` (``y = x τ``), so the product is ``P_ETF Δ`` on the **rows** (``m = out_features``).
  Under ``etf_size="literal"`` a side longer than ``C − 1`` is restricted to a random ``(C−1)``-dim
  subspace: with 8 vision tasks (C = 758) "in" does that to the MLP's ``c_proj`` (3072 columns), "out" to
  ``in_proj`` (2304 rows) and ``c_fc`` (3072 rows), and both nearly leave the 768-wide sides alone.
* **ETF size C (A4; resolved readings, MDA §2): option ``etf_size``.** §4.1 sets ``C = Σ_t C_t``, the
  total class count of the tasks. On a ``d``-wide side with ``C − 1 < d`` the simplex ETF spans only a
  ``(C−1)``-dimensional subspace, so ``P_ETF = C/(C−1)·Π_S`` keeps a random ``(C−1)``-dim slice of the update
  and discards the rest: about ``(C−1)/d`` of its energy (App. B.2.2, Eq. 26). That is ``etf_size="literal"``
  (``num_classes`` required): on our benchmark (C = 54, d = 384 / 1536) it keeps 4–16 % of each task's
  update, so MDA-TA falls to Task Arithmetic's level and needs λ ≈ 3.
  ``etf_size="table"`` (default) uses ``C_eff = max(Σ_t C_t, d + 1)`` (``d + 1`` when ``num_classes`` is not
  given). Then ``d ≤ C_eff − 1``, App. B.1's SVD branch applies, and ``P_ETF = C_eff/(C_eff−1)·I`` exactly:
  **under the default, MDA-TA is TSV-M multiplied by the scalar C/(C−1)** (with ``C = C_eff`` of the projected
  side; the scalar only rescales λ). It is the default because it is the only reading consistent with
  every table of the paper: with 14 and 20 vision tasks ``C > 768``, so the paper's own SVD branch is this
  scalar; on Flan-T5 (Table 13, C ≤ 20, d = 768) the literal projection would keep ≈ 2.5 % of the
  update's energy, yet MDA-TA (82.1) beats TSV (81.8); and the proof of App. B.2.2 works in the
  eigenbasis of a ``d_out × d_out`` projector, i.e. ``C = d_out``.
  Either way ``P_ETF`` is built with the QR branch iff ``d >= C`` (a ``C/(C−1)``-scaled projector onto a
  seeded random ``(C−1)``-dim subspace), else with the SVD branch (exactly ``C/(C−1)·I``). The
  ``"orthogonal"`` target of Table 15 uses the same ``C`` (so it is the identity under ``table``).
* **Seed / sharing (A5).** One frame per dimension ``d``, seed ``etf_seed`` (default 0), shared by all layers.
* **Which layers (first spec, §2).** Default: every 2-D matrix (Alg. 1 loops over all layers).
  ``etf_layers`` (a regex searched in the tensor name) and ``etf_dims`` (allowed sizes of the projected
  side; ``[768]`` gives the first spec's "only where that size is the ViT-B width") restrict the
  projection; other matrices get the plain TSV-M update.
* **k for non-square layers (A13).** ``k_reference="min"`` (default) uses ``min(m, n)`` (TSV-M's rule);
  ``"etf_side"`` uses the size of the side ``P_ETF`` acts on (the paper's ``d_out`` under the chosen
  ``etf_side`` reading), clamped to ``min(m, n)``. ``k >= 1`` always; when ``k·T > min(m, n)`` the
  whitened bases have orthonormal rows instead of columns (as TSV-M).
* **Alignment target (Table 15).** ``projection="etf"`` (default); ``"orthogonal"`` (C orthonormal class
  directions: a projector onto a random C-dim subspace, the identity when ``C >= d``) and ``"low_rank"``
  (projector onto a random ``⌊low_rank_fraction·d⌋``-dim subspace, the paper's ``d_out/4``) are our
  readings of the paper's comparison targets; ``"none"`` skips the projection (= TSV-M).

**λ** follows TSV-M's protocol (resolved readings, MDA §3): default 1.0, the registry's grid 0.1–3.0.

Steps 1–2 are :func:`taskmerge.methods.tsv.tsv_bases` (so ``projection="none"`` is TSV-M exactly, with
its handling of numerically zero triplets); the projection is applied in factored form
(:class:`taskmerge.etf.GramProjector`), never as a dense ``d × d`` product.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from taskmerge import linalg
from taskmerge.errors import OptionError
from taskmerge.etf import GramProjector, etf_projector, low_rank_projector, orthogonal_projector
from taskmerge.methods.tsv import tsv_bases
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["MDAOptions", "mda_ta", "alignment_projector", "frame_classes", "layer_projector", "rank_per_task"]


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


class MDAOptions(MethodOptions):
    """Options of ``mda_ta`` (see the module docstring for the readings behind each)."""

    num_classes: int | list[int] | None = Field(
        None,
        description=(
            "per-task class counts C_t (summed to C) or the total C; required by etf_size='literal', "
            "optional under 'table' (where C_eff = max(C, d + 1))"
        ),
    )
    etf_size: Literal["table", "literal"] = Field(
        "table",
        description=(
            "ETF size: 'table' C_eff = max(ΣC_t, d + 1), so P_ETF = C/(C−1)·I and MDA-TA is TSV-M times C/(C−1) "
            "(the reading every table of the paper fits); 'literal' C = ΣC_t (§4.1), a random (C−1)-dim "
            "projection when C − 1 < d"
        ),
    )
    k_fraction: float | None = Field(
        None, gt=0, le=1, description="per-task rank k = ⌊ρ·d⌋ (Table 14: 0.01, 0.06, 0.1, 0.5, 0.9); default ⌊d/T⌋"
    )
    k_reference: Literal["min", "etf_side"] = Field(
        "min", description="d in the k rule: min(m, n), or the size of the side P_ETF acts on"
    )
    shared: Literal["tsv", "basis"] = Field("tsv", description="τ_share: TSV-M update (default) or the literal basis")
    projection: Literal["etf", "orthogonal", "low_rank", "none"] = Field(
        "etf", description="alignment target (Table 15)"
    )
    low_rank_fraction: float = Field(0.25, gt=0, le=1, description="rank of the 'low_rank' target as a fraction of d")
    etf_side: Literal["in", "out"] = Field("in", description="P_ETF acts on the columns ('in') or the rows ('out')")
    etf_seed: int = Field(0, ge=0, description="seed of the random frame (QR branch, i.e. only when C ≤ d)")
    etf_layers: str | None = Field(None, description="regex: project only tensors whose name matches")
    etf_dims: list[int] | None = Field(None, description="project only when the projected side has one of these sizes")

    @field_validator("num_classes")
    @classmethod
    def _classes(cls, value: int | list[int] | None) -> int | list[int] | None:
        if value is None:
            return value
        counts = [value] if isinstance(value, int) else value
        if not counts or any(c < 1 for c in counts):
            raise ValueError("class counts must be positive integers")
        if sum(counts) < 2:
            raise ValueError("a simplex ETF needs at least 2 classes in total")
        return value

    @field_validator("etf_layers")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


def _total_classes(options: MDAOptions, num_tasks: int) -> int | None:
    """``Σ_t C_t`` from the option ``num_classes`` (``None`` when it is not given)."""
    nc = options.num_classes
    if nc is None:
        return None
    if isinstance(nc, int):
        return nc
    if len(nc) != num_tasks:
        raise OptionError(f"method 'mda_ta': option num_classes lists {len(nc)} class counts for {num_tasks} tasks")
    return sum(nc)


def frame_classes(options: MDAOptions, dim: int, num_tasks: int) -> int:
    """The class count ``C`` of the frame on a ``dim``-wide side (option ``etf_size``, module docstring).

    ``literal``: ``C = Σ_t C_t`` (§4.1; ``num_classes`` required). ``table``: ``C_eff = max(Σ_t C_t, dim + 1)``
    (``dim + 1`` without ``num_classes``), so that ``P_ETF = C_eff/(C_eff − 1)·I``.
    """
    total = _total_classes(options, num_tasks)
    if options.etf_size == "table":
        return max(total or 0, dim + 1)
    if total is None:
        raise OptionError(
            "method 'mda_ta': option num_classes is required with etf_size='literal' (the tasks' class counts, "
            "e.g. [397, 196, 45, 10, 10, 43, 10, 47], or their total); it sets the size C of the simplex ETF. "
            "The default etf_size='table' needs no class counts"
        )
    return total


def rank_per_task(options: MDAOptions, shape: tuple[int, int], num_tasks: int) -> int:
    """The per-task truncation rank ``k`` of the TSV-M step (MDA Alg. 1) for an ``m × n`` layer and T tasks.

    ``k = ⌊ref / T⌋`` (or ``⌊k_fraction · ref⌋`` when ``k_fraction`` is set), clipped to ``[1, min(m, n)]``;
    ``ref`` is ``min(m, n)`` for ``k_reference="min"``, else the dimension on the ETF side (``m`` for
    ``etf_side="out"``, ``n`` for ``"in"``).
    """
    m, n = shape
    r = min(m, n)
    ref = r if options.k_reference == "min" else (m if options.etf_side == "out" else n)
    k = math.floor(ref / num_tasks) if options.k_fraction is None else math.floor(options.k_fraction * ref)
    return max(1, min(k, r))


def alignment_projector(
    options: MDAOptions, dim: int, num_tasks: int, dtype: torch.dtype, device: torch.device
) -> GramProjector | None:
    """The ``dim × dim`` alignment operator these options ask for (``None`` for ``projection="none"``)."""
    if options.projection == "none":
        return None
    if options.projection == "low_rank":
        rank = max(1, math.floor(options.low_rank_fraction * dim))
        return low_rank_projector(dim, rank, seed=options.etf_seed, dtype=dtype, device=device)
    classes = frame_classes(options, dim, num_tasks)
    if options.projection == "orthogonal":
        return orthogonal_projector(dim, classes, seed=options.etf_seed, dtype=dtype, device=device)
    return etf_projector(dim, classes, seed=options.etf_seed, dtype=dtype, device=device)


def layer_projector(options: MDAOptions, deltas: torch.Tensor, ctx: LayerContext) -> GramProjector | None:
    """The alignment operator (``P_ETF`` of MDA Eq. 3, or the options' alternative) of one layer, ``None`` when the
    layer is left unprojected (``projection="none"``, or excluded by ``etf_layers`` / ``etf_dims``).

    ``deltas`` is the ``(T, m, n)`` stack of the layer's task updates; the operator acts on the ``m`` rows
    (``etf_side="out"``) or the ``n`` columns (``"in"``), in ``deltas``' dtype and device.

    Raises:
        OptionError: for ``projection`` ``"etf"`` / ``"orthogonal"`` with a missing or mismatched
            ``num_classes`` (checked on every layer, excluded or not).
    """
    T, m, n = deltas.shape
    dim = m if options.etf_side == "out" else n
    if options.projection in ("etf", "orthogonal"):
        frame_classes(options, dim, T)  # a missing or mismatched num_classes is an error on every layer
    if options.etf_layers is not None and re.search(options.etf_layers, ctx.name) is None:
        return None
    if options.etf_dims is not None and dim not in options.etf_dims:
        return None
    return alignment_projector(options, dim, T, deltas.dtype, deltas.device)


def _check_deltas(deltas: torch.Tensor, method: str) -> None:
    if deltas.ndim != 3:
        raise OptionError(f"method {method!r} merges 2-D matrices; got task updates of shape {tuple(deltas.shape)}")
    if deltas.shape[0] < 1:
        raise OptionError(f"method {method!r} needs at least one task update")


def _literal_basis(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """The literal ``τ_share = U_share[:, :d]`` (A1's alternative): left singular vectors of the
    concatenated per-task top-k left bases, truncated or zero-padded to ``n`` columns."""
    n = deltas.shape[2]
    u_cat = torch.cat([linalg.truncated_svd(d, k).U for d in deltas], dim=1)
    u_share = linalg.svd(u_cat).U[:, :n]
    return torch.nn.functional.pad(u_share, (0, n - u_share.shape[1]))


@register_method(
    "mda_ta",
    options=MDAOptions,
    paper=(
        "Chen et al., 'From Coefficients to Directions: Rethinking Model Merging with Directional Alignment' "
        "(arXiv 2512.00391), Alg. 1, Eq. 3"
    ),
    summary=(
        "MDA-TA: TSV-M per layer, then the simplex-ETF projection P_ETF = W_ETFᵀW_ETF; under the default "
        "etf_size='table' P_ETF = C/(C−1)·I, so MDA-TA is TSV-M scaled by C/(C−1) ('literal': C = ΣC_t, a random "
        "(C−1)-dim projection)"
    ),
    matrix_only=True,
    default_lambda=1.0,  # TSV-M's protocol: default 1.0, the registry's grid 0.1–3.0
)
def mda_ta(deltas: torch.Tensor, options: MDAOptions, ctx: LayerContext) -> torch.Tensor:
    """MDA-TA's merged update of one matrix, before λ (module docstring).

    Under the default ``etf_size="table"`` this is TSV-M's update times ``C/(C−1)`` (``P_ETF`` is that scalar
    times the identity); ``etf_size="literal"`` projects onto a random ``(C−1)``-dim ETF subspace when ``C ≤ d``.
    """
    _check_deltas(deltas, "mda_ta")
    T, m, n = deltas.shape
    projector = layer_projector(options, deltas, ctx)
    k = rank_per_task(options, (m, n), T)
    if options.shared == "tsv":
        shared = tsv_bases(deltas, k).reconstruct()
    else:
        shared = _literal_basis(deltas, k)
    return shared if projector is None else projector.apply(shared, options.etf_side)
