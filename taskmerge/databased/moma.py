"""MOMA: a learned mask over the merged task vector and per-task alignment matrices absorbed into the heads.

Kong et al., "MOMA: Masked Orthogonal Matrix Alignment for Zero-Additional-Parameter Model Merging", Eq. 10;
spec ``moma.md``. On top of a data-free base merge ``θ = θ_b + λ τ_agg`` (Weight Averaging, Task Arithmetic or
TIES, from the registry), learn

* one global element-wise soft mask ``σ(S)`` over ``τ_agg`` (shared by all tasks), and
* one ``d × d`` matrix ``A_t`` per task,

on unlabeled inputs of every task by minimising

    Σ_t mean_x ‖A_t g(x; θ_b + λ σ(S) ⊙ τ_agg) − g(x; θ_t)‖₂ + α Σ_t ‖A_tᵀ A_t − I‖_F + β Σ σ(S)²

where ``g`` is the feature fed to the linear head and the teacher features ``g(x; θ_t)`` are computed once
and cached. Then absorb: the mask into the weights (``θ_b + λ σ(S) ⊙ τ_agg``) and ``A_t`` into task t's head
(``logits = W_t (A_t g) + b = (W_t A_t) g + b``; in the paper's column layout ``W_t ← A_tᵀ W_t``). The
deployed model has exactly the base architecture and parameter count (asserted).

Readings (spec §10; default first, alternative as an option):

* alignment error: the Euclidean norm, not squared, as written (``distance="l2"``; ``"squared"``);
* ``‖A_tᵀA_t − I‖``: Frobenius, not squared; weight ``alpha`` not given, default 1.0; or a hard SO(d)
  parametrisation (``orthogonality="exp"``: ``A_t = exp(K − Kᵀ)``, no penalty);
* the "L2 regularisation 5e-9": ``beta · Σ σ(S)²`` over all mask entries (a sparsifying pull on the mask);
* ``τ_agg`` and λ: the base method's own merged update (:func:`taskmerge.merge.merged_task_vector`) and its
  λ (``lam``; the benchmark passes the λ the base chose on validation; default: the method's default λ);
  WA is the registry's mean of the task vectors at λ = 1 (= Σ τ_t at λ = 1/T);
* init: ``S = 3`` (σ ≈ 0.95), ``A_t = I``; schedule (App. B.3): Adam, lr 0.1 for S, and by ``domain`` —
  ``"nlp"`` (default): lr 5e-4 for A_t, batch 24 per task per step; ``"cv"``: lr 1e-3, batch 16 (an explicit
  ``matrix_lr`` / ``batch_size`` wins). Steps are not given; 1000 by default (spec; ≥ the 500 iterations
  of AdaMerging and Surgery on the same checkpoints). The paper adapts on the unlabeled **test** inputs
  (Table 5: 10 / 50 / 100 % of them, ``data_fraction``);
* mask scope: every tensor with a non-zero ``τ_agg`` (``mask_scope="matrices"``: 2-D weights only);
* final mask: the continuous ``σ(S)`` (``final_mask="soft"``), or binarised at 0.5 (``"binary"``), or a
  given masking rate ``mask_rate`` (the ``rate`` fraction of entries with the smallest ``S`` set to 0, the
  rest to 1; Fig. 8). The reported masking rate is the fraction of entries with ``σ(S) < 0.5``.

Ablations (Table 4): ``variant="moma"`` (orthogonal + mask), ``"orthogonal"`` (no mask: ``σ(S) ≡ 1``),
``"linear_mask"`` (mask, ``A_t`` unconstrained: α = 0). Table 5: ``data_fraction`` (0.1 / 0.5 / 1.0). With
``polar_before_absorb`` the absorbed matrix is the orthogonal polar factor of ``A_t``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from taskmerge import linalg
from taskmerge.databased.adamerging import check_inputs
from taskmerge.databased.encoder import FunctionalEncoder, cache_features
from taskmerge.databased.loop import (
    DataMergeResult,
    LoopOptions,
    changed_names,
    count_parameters,
    parse_options_as,
    run_loop,
    subset_inputs,
    with_weight,
)
from taskmerge.rotation import exp_rotation

__all__ = ["MOMAOptions", "MaskedMerge", "moma", "moma_loss", "absorb_alignment", "assert_base_size"]

logger = logging.getLogger(__name__)

BASES = ("weight_averaging", "task_arithmetic", "ties")
SCHEDULES = {"nlp": (5e-4, 24), "cv": (1e-3, 16)}  # App. B.3: (lr of A_t, batch per task) for text / vision


class MOMAOptions(LoopOptions):
    """Options of :func:`moma` (module docstring), plus the shared loop options."""

    base: Literal["weight_averaging", "task_arithmetic", "ties"] = Field("task_arithmetic", description=(
        "the data-free merge whose τ_agg is masked"))
    base_options: dict[str, Any] = Field(default_factory=dict, description="options of the base method")
    lam: float | None = Field(None, description="the base merge's λ (default: the method's default λ)")
    variant: Literal["moma", "orthogonal", "linear_mask"] = Field("moma", description=(
        "Table 4: moma = mask and orthogonal A_t; orthogonal = no mask (σ(S) ≡ 1); linear_mask = mask, "
        "A_t unconstrained (α = 0)"))
    alpha: float = Field(1.0, ge=0, description="weight of ‖A_tᵀA_t − I‖_F")
    beta: float = Field(5e-9, ge=0, description="weight of Σ σ(S)²")
    domain: Literal["nlp", "cv"] = Field("nlp", description="App. B.3's schedule: nlp = A_t lr 5e-4, batch 24; cv = 1e-3, 16")
    steps: int = Field(1000, ge=0, description="optimisation steps (not given by the paper; spec: 1000)")
    mask_lr: float = Field(0.1, gt=0, description="Adam learning rate of the mask logits S (App. B.3)")
    matrix_lr: float = Field(5e-4, gt=0, description="lr of A_t (default: by domain)")
    mask_init: float = Field(3.0, description="initial mask logit S (3: σ(S) ≈ 0.95)")
    mask_scope: Literal["all", "matrices"] = Field("all", description=(
        "which tensors get a mask: every tensor with a non-zero τ_agg, or the 2-D weights only"))
    distance: Literal["l2", "squared"] = Field("l2", description=(
        "alignment error of Eq. 10: the Euclidean norm as written, or its square"))
    orthogonality: Literal["penalty", "exp"] = Field("penalty", description=(
        "penalty: α‖A_tᵀA_t − I‖_F (Eq. 10); exp: A_t = exp(K − Kᵀ), orthogonal by construction, no penalty"))
    final_mask: Literal["soft", "binary"] = Field("soft", description=(
        "the deployed mask: the continuous σ(S), or σ(S) binarised at 0.5 (mask_rate, when given, decides instead)"))
    mask_rate: float | None = Field(None, ge=0.0, lt=1.0, description="binarise keeping the top (1 − rate) of S")
    polar_before_absorb: bool = Field(False, description=(
        "absorb the orthogonal polar factor of A_t into the head instead of A_t itself"))
    batch_size: int = Field(24, ge=1, description="inputs per task per step (default: by domain)")

    @model_validator(mode="before")
    @classmethod
    def _schedule(cls, data: Any) -> Any:
        """Fill ``matrix_lr`` and ``batch_size`` left out (or ``None``) from ``domain`` (App. B.3)."""
        if isinstance(data, Mapping):
            data = dict(data)
            lr, batch = SCHEDULES.get(data.get("domain", "nlp"), SCHEDULES["nlp"])
            if data.get("matrix_lr") is None:
                data["matrix_lr"] = lr
            if data.get("batch_size") is None:
                data["batch_size"] = batch
        return data


class MaskedMerge(nn.Module):
    """``θ = θ_b + λ σ(S) ⊙ τ_agg`` with trainable mask logits ``S`` (unmasked tensors: ``θ_b + λ τ_agg``)."""

    def __init__(self, base_sd: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], lam: float,
                 masked: Sequence[str], init: float = 3.0) -> None:
        super().__init__()
        self.base = {n: base_sd[n] for n in tau}
        self.lam = float(lam)
        self.scaled = {n: self.lam * t.float() for n, t in tau.items()}  # λ τ_agg, computed once
        self.masked = [n for n in tau if n in set(masked)]
        self.logits = nn.ParameterList([nn.Parameter(torch.full_like(self.scaled[n], float(init))) for n in self.masked])
        self._index = {n: i for i, n in enumerate(self.masked)}
        # tensors no mask touches are constant during training: merged once, not at every step
        self._fixed = {n: (self.base[n].float() + v).to(self.base[n].dtype) for n, v in self.scaled.items()
                       if n not in self._index}

    def forward(self, use_mask: bool = True, rows: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged tensors; for a tensor named in ``rows`` only those rows (a compacted embedding table)."""
        out = {}
        for name, scaled in self.scaled.items():
            ids = rows.get(name) if rows else None
            base = self.base[name]
            i = self._index.get(name)
            if i is None or not use_mask:
                merged = self._fixed[name] if i is None else (base.float() + scaled).to(base.dtype)
                out[name] = merged if ids is None else merged.index_select(0, ids)
                continue
            logits = self.logits[i]
            if ids is not None:
                base, scaled, logits = base.index_select(0, ids), scaled.index_select(0, ids), logits.index_select(0, ids)
            out[name] = (base.float() + torch.sigmoid(logits) * scaled).to(base.dtype)
        return out

    def penalty(self) -> torch.Tensor:
        """``Σ σ(S)²`` over every mask entry."""
        return sum((torch.sigmoid(s).pow(2).sum() for s in self.logits), torch.zeros(()))

    @torch.no_grad()
    def final_masks(self, mode: str = "soft", rate: float | None = None) -> dict[str, torch.Tensor]:
        """The masks absorbed at deployment (see the module docstring)."""
        if rate is not None:
            flat = torch.cat([s.flatten() for s in self.logits])
            k = int(round(rate * flat.numel()))
            thr = torch.kthvalue(flat, k).values if k > 0 else flat.min() - 1
            return {n: (self.logits[i] > thr).float() for n, i in self._index.items()}
        if mode == "binary":
            return {n: (self.logits[i] >= 0).float() for n, i in self._index.items()}
        return {n: torch.sigmoid(self.logits[i]) for n, i in self._index.items()}

    @torch.no_grad()
    def masking_rate(self) -> float:
        """Fraction of mask entries with ``σ(S) < 0.5``."""
        total = sum(s.numel() for s in self.logits)
        low = sum(int((s < 0).sum()) for s in self.logits)
        return low / total if total else 0.0

    @torch.no_grad()
    def absorbed(self, base_sd: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The deployed state dict ``θ_b + λ M ⊙ τ_agg`` (every key of ``base_sd``, base dtypes)."""
        out = {}
        for name, base in base_sd.items():
            scaled = self.scaled.get(name)
            if scaled is None:
                out[name] = base.clone()
                continue
            m = masks.get(name)
            out[name] = (base.float() + (scaled if m is None else m * scaled)).to(base.dtype)
        return out


def moma_loss(features: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], matrices: torch.Tensor, *,
              alpha: float, distance: str = "l2", mask_penalty: torch.Tensor | None = None, beta: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """MOMA's objective, Eq. 10 (plus B.3's L2 term on the mask):

        Σ_t mean_x ‖A_t g_t(x) − g(x; θ_t)‖₂ + α Σ_t ‖A_tᵀ A_t − I‖_F + β Σ σ(S)²

    Args:
        features: per task, the merged encoder's features ``g(x; θ_b + λ σ(S) ⊙ τ_agg)`` of a batch (B × d).
        teachers: per task, the fine-tuned encoder's features of the same inputs (B × d).
        matrices: ``A`` (T × d × d); features are rows, so ``A_t g`` is ``g @ A_tᵀ``.
        alpha: weight of the orthogonality term (0: not computed).
        distance: ``"l2"`` (the norm, as Eq. 10 writes it) or ``"squared"``.
        mask_penalty: ``Σ σ(S)²`` (``None``: no mask).
        beta: its weight.
    Returns the loss and its parts (``align``, ``ortho``, ``mask_l2``).
    """
    align = torch.zeros((), dtype=features[0].dtype, device=features[0].device)
    ortho = torch.zeros_like(align)
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    for t, (g, target) in enumerate(zip(features, teachers)):
        dist = (g @ matrices[t].T - target.to(g.dtype)).pow(2).sum(-1)
        align = align + (dist if distance == "squared" else dist.clamp_min(1e-12).sqrt()).mean()
        if alpha:
            ortho = ortho + (matrices[t].T @ matrices[t] - eye).norm()
    reg = mask_penalty if mask_penalty is not None else torch.zeros_like(align)
    loss = align + alpha * ortho + beta * reg
    return loss, {"align": float(align.detach()), "ortho": float(ortho.detach()), "mask_l2": float(reg.detach())}


def absorb_alignment(head: Any, matrix: torch.Tensor) -> Any:
    """The head whose logits on ``g`` equal ``head``'s logits on ``A g``: weight ``W A``, bias unchanged."""
    return with_weight(head, head.weight.float() @ matrix.float())


def assert_base_size(base_sd: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     heads_before: Sequence[Any], heads_after: Sequence[Any]) -> int:
    """Assert that the deployed encoder and heads have exactly the base's tensors, shapes and parameter count."""
    if set(state) != set(base_sd):
        raise AssertionError("the deployed encoder's tensors differ from the base's")
    for name, v in base_sd.items():
        if tuple(state[name].shape) != tuple(v.shape) or state[name].dtype != v.dtype:
            raise AssertionError(f"tensor {name!r}: {tuple(state[name].shape)} vs base {tuple(v.shape)}")
    n_base = count_parameters(base_sd) + sum(h.weight.numel() + (h.bias.numel() if getattr(h, "bias", None) is not None else 0)
                                             for h in heads_before)
    n_new = count_parameters(state) + sum(h.weight.numel() + (h.bias.numel() if getattr(h, "bias", None) is not None else 0)
                                          for h in heads_after)
    if n_new != n_base:
        raise AssertionError(f"deployed model has {n_new} parameters, the base has {n_base}")
    return n_new


def moma(
    base_sd: Mapping[str, torch.Tensor],
    task_sds: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[Any],
    unlabeled_inputs: Sequence[Any],
    options: MOMAOptions | Mapping[str, Any] | None = None,
    *,
    encoder: FunctionalEncoder,
    start_vector: Mapping[str, torch.Tensor] | None = None,
) -> DataMergeResult:
    """MOMA (module docstring).

    Args:
        base_sd, task_sds, heads, unlabeled_inputs, encoder: as :func:`taskmerge.databased.adamerging.adamerging`.
        options: :class:`MOMAOptions` or a mapping of its fields.
        start_vector: the base method's merged update ``τ_agg`` if already computed (e.g. by a λ sweep).

    Returns:
        :class:`~taskmerge.databased.loop.DataMergeResult`: the deployed encoder (mask absorbed) and the heads
        with ``A_t`` absorbed; ``info`` holds the masking rate, ‖A_tᵀA_t − I‖ and the parameter count.
    """
    from taskmerge.merge import merged_task_vector
    from taskmerge.registry import get_method

    opts = parse_options_as(MOMAOptions, options, "moma")
    T = len(task_sds)
    inputs = check_inputs(heads, unlabeled_inputs, T)
    inputs = [subset_inputs(x, opts.data_fraction, opts.seed + t) for t, x in enumerate(inputs)]
    lam = get_method(opts.base).default_lambda if opts.lam is None else opts.lam
    tau = start_vector if start_vector is not None else merged_task_vector(base_sd, task_sds, opts.base, opts.base_options)
    tau = {n: v for n, v in tau.items() if bool((v != 0).any())}
    use_mask = opts.variant != "orthogonal"
    masked = [n for n, v in tau.items() if opts.mask_scope == "all" or v.ndim == 2] if use_mask else []
    merge = MaskedMerge(base_sd, tau, lam, masked, opts.mask_init)
    dim = int(heads[0].weight.shape[1])

    # teacher features g(x; θ_t), computed once
    changed = changed_names(base_sd, task_sds)  # every tensor some θ_t changed (τ_agg may trim some, e.g. TIES)
    logger.info("moma: caching teacher features of %d tasks (%d inputs)", T, sum(len(x) for x in inputs))
    teachers = [cache_features(encoder, {n: sd[n] for n in changed}, x, opts.feature_batch_size)
                for sd, x in zip(task_sds, inputs)]

    if opts.orthogonality == "exp":
        raw = nn.Parameter(torch.zeros(T, dim, dim))

        def matrices() -> torch.Tensor:
            return exp_rotation(raw)
    else:
        raw = nn.Parameter(torch.eye(dim).repeat(T, 1, 1))

        def matrices() -> torch.Tensor:
            return raw

    alpha = 0.0 if (opts.variant == "linear_mask" or opts.orthogonality == "exp") else opts.alpha
    eye = torch.eye(dim)

    def objective(step: int, batches: list[Any], indices: list[list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        feats = encoder.step_features(batches, lambda rows: merge(use_mask, rows))
        targets = [teachers[t][torch.as_tensor(indices[t])] for t in range(T)]
        penalty = merge.penalty() if (use_mask and opts.beta) else None
        return moma_loss(feats, targets, matrices(), alpha=alpha, distance=opts.distance, mask_penalty=penalty,
                         beta=opts.beta)

    groups = [{"params": [raw], "lr": opts.matrix_lr}]
    if use_mask:
        groups.append({"params": list(merge.logits), "lr": opts.mask_lr})
    history = run_loop(objective, groups, inputs, opts, desc=f"moma ({opts.base}, {opts.variant})")

    with torch.no_grad():
        a = matrices().detach()
        if opts.polar_before_absorb:
            a = torch.stack([linalg.polar(m) for m in a])
        masks = merge.final_masks(opts.final_mask, opts.mask_rate) if use_mask else {}
        state = merge.absorbed(base_sd, masks)
    new_heads = [absorb_alignment(h, a[t]) for t, h in enumerate(heads)]
    n_params = assert_base_size(base_sd, state, heads, new_heads)
    info = {
        "lambda": lam,
        "masking_rate": merge.masking_rate() if use_mask else 0.0,
        "deployed_mask_mean": (float(sum(m.sum() for m in masks.values()) / max(1, sum(m.numel() for m in masks.values())))
                               if masks else 1.0),
        "matrices": a.clone(),
        "orthogonality_error": [float((a[t].T @ a[t] - eye).norm()) for t in range(T)],
        "parameters": n_params,
        "options": opts.model_dump(),
    }
    return DataMergeResult(state, new_heads, history, info)
