"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled test inputs.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. The merged encoder is
``θ = θ₀ + Σ_t λ_t^(l) τ_t^(l)`` with one coefficient per task (task-wise AdaMerging) or per task and per
parameter tensor (layer-wise AdaMerging, the paper's better variant and our default; "layer" means one
parameter tensor, as in the official code's per-parameter ``lambdas``). The coefficients minimise the
Shannon entropy of each task's predictions — the task's own frozen head applied to the merged encoder's
features — averaged over a mini-batch of unlabeled inputs of every task and summed over tasks. No label is
used.

Settings, following the paper and its code (``EnricoShippole/AdaMerging``-style ``lambdas`` with ``prior``):

* initialisation at Task Arithmetic's λ (``init_lambda``; the paper's prior is 0.3, the benchmark passes the
  λ Task Arithmetic chose on validation);
* Adam, lr 1e-3, betas (0.9, 0.999); coefficients clamped to [0, 1] after every step (``clamp``);
* batch 16 per task per step, 500 steps (the paper's schedule, our defaults), on the unlabeled test inputs of
  every task (test-time adaptation; the benchmark's default ``adapt_split="test"``);
* AdaMerging++ (``preprocess="ties"``): the task vectors are first TIES-preprocessed — trimmed to the top
  ``ties_keep`` fraction of entries per task and tensor, and only the entries agreeing with the elected sign
  kept — then merged with the learned coefficients (no disjoint mean).

:class:`CoefficientMerge` — the differentiable ``θ₀ + Σ λ τ`` — is shared with MDA-AM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from taskmerge.databased.encoder import FunctionalEncoder
from taskmerge.databased.loop import (
    DataMergeResult,
    LoopOptions,
    UnlabeledInputs,
    as_inputs,
    entropy,
    entropy_scales,
    head_logits,
    parse_options_as,
    run_loop,
    subset_inputs,
    task_vectors,
)

__all__ = ["AdaMergingOptions", "CoefficientMerge", "adamerging", "check_inputs", "entropy_loss", "ties_preprocess"]

logger = logging.getLogger(__name__)


class AdaMergingOptions(LoopOptions):
    """Options of :func:`adamerging` (module docstring), plus the shared
    :class:`~taskmerge.databased.loop.LoopOptions`."""

    granularity: Literal["layer", "task"] = Field("layer", description=(
        "layer: one λ per task and parameter tensor (layer-wise AdaMerging); task: one λ per task (task-wise)"))
    init_lambda: float = Field(0.3, description=(
        "initial value of every coefficient: Task Arithmetic's λ (the paper's prior 0.3)"))
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the coefficients")
    clamp: tuple[float, float] | None = Field((0.0, 1.0), description=(
        "(low, high) bounds the coefficients are clamped to after every step; none: unconstrained"))
    preprocess: Literal["none", "ties"] = Field("none", description=(
        "none: the task vectors as they are (AdaMerging); ties: TIES-trimmed and sign-elected first (AdaMerging++)"))
    ties_keep: float = Field(0.2, gt=0.0, le=1.0, description=(
        "fraction of each task's entries the TIES trim keeps (preprocess=ties)"))
    entropy_scaling: Literal["none", "head_norm"] = Field("none", description=(
        "none: the entropy of each head's logits (the paper); head_norm: each task's logits rescaled to a common "
        "scale first, predictions unchanged (our option; see loop.entropy_scales)"))


class CoefficientMerge(nn.Module):
    """``θ = θ₀ + Σ_t λ[t, l] τ_t^(l)``, differentiable in the coefficients ``λ`` (T × L or T × 1).

    Args:
        base_sd: θ₀.
        vectors: ``{name: (T, *shape) stack of task vectors}`` (only these tensors change).
        granularity: ``"layer"`` (``λ`` is T × L, L = number of tensors) or ``"task"`` (T × 1, shared by all).
        init: initial value of every coefficient.
    """

    def __init__(self, base_sd: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor],
                 granularity: str = "layer", init: float = 0.3) -> None:
        super().__init__()
        if not vectors:
            raise ValueError("no tensor differs from the base: nothing to merge")
        self.names = list(vectors)
        self.base = {n: base_sd[n] for n in self.names}
        self.vectors = {n: vectors[n] for n in self.names}
        self.num_tasks = next(iter(vectors.values())).shape[0]
        cols = len(self.names) if granularity == "layer" else 1
        self.granularity = granularity
        self.lambdas = nn.Parameter(torch.full((self.num_tasks, cols), float(init)))

    def coefficient(self, index: int) -> torch.Tensor:
        """The T coefficients of tensor number ``index``."""
        return self.lambdas[:, index if self.granularity == "layer" else 0]

    def forward(self, rows: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged tensors (only those with a task vector), in the base dtype; for a tensor named in
        ``rows`` only those rows (a compacted embedding table, :mod:`taskmerge.databased.encoder`)."""
        out = {}
        for i, name in enumerate(self.names):
            tau = self.vectors[name]
            base = self.base[name]
            ids = rows.get(name) if rows else None
            if ids is not None:
                tau, base = tau.index_select(1, ids), base.index_select(0, ids)
            lam = self.coefficient(i).to(tau.dtype)
            if base.dtype == tau.dtype:  # one fused θ₀ + τᵀλ (GEMV), the fastest route for big embedding tables
                out[name] = torch.addmv(base.reshape(-1), tau.reshape(tau.shape[0], -1).T, lam).view(base.shape)
            else:
                out[name] = (base.to(tau.dtype) + torch.tensordot(lam, tau, dims=1)).to(base.dtype)
        return out

    @torch.no_grad()
    def state_dict_merged(self, base_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full merged state dict (every key of ``base_sd``), detached."""
        merged = {k: v.detach().clone() for k, v in self.forward().items()}
        return {k: merged.get(k, v) for k, v in base_sd.items()}

    def table(self) -> dict[str, list[float]]:
        """The learned coefficients per tensor name (``"*"`` for task-wise)."""
        lam = self.lambdas.detach().cpu()
        if self.granularity == "layer":
            return {n: lam[:, i].tolist() for i, n in enumerate(self.names)}
        return {"*": lam[:, 0].tolist()}


def ties_preprocess(vectors: Mapping[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """AdaMerging++'s TIES preprocessing of each stack: trim to ``keep`` per task, zero the entries whose sign
    disagrees with the elected sign (:mod:`taskmerge.methods.ties`)."""
    from taskmerge.methods.ties import ties_elect_sign, ties_trim

    out = {}
    for name, stack in vectors.items():
        trimmed = ties_trim(stack, keep)
        sign = ties_elect_sign(trimmed)
        out[name] = torch.where(trimmed * sign > 0, trimmed, torch.zeros_like(trimmed))
    return out


def entropy_loss(logits: Sequence[torch.Tensor], scales: Sequence[float] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """AdaMerging's objective (Yang et al. 2024; the same term is MDA's Eq. 7): ``Σ_t mean_x H(softmax(s_t z_t(x)))``
    with ``H(p) = −Σ_c p_c log p_c`` and ``z_t`` task t's logits (``s_t`` = 1 unless an entropy scaling is set).
    Returns the loss and each task's term (``H<t>``)."""
    total = torch.zeros((), dtype=logits[0].dtype, device=logits[0].device)
    parts = {}
    for t, z in enumerate(logits):
        h = entropy(z if scales is None else scales[t] * z).mean()
        total = total + h
        parts[f"H{t}"] = float(h.detach())
    return total, parts


def check_inputs(heads: Sequence[Any], inputs: Sequence[Any], task_count: int) -> list[UnlabeledInputs]:
    """The T unlabeled input sets as :class:`~taskmerge.databased.loop.UnlabeledInputs` (each through
    :func:`~taskmerge.databased.loop.as_inputs`), after checking that there is one head and one input set per
    fine-tuned model (``task_count``); shared by AdaMerging, MDA-AM and MOMA.

    Raises:
        ValueError: when the number of heads or of input sets differs from ``task_count``.
        TypeError: when an input set is neither a tensor nor an :class:`~taskmerge.databased.loop.UnlabeledInputs`.
    """
    if len(heads) != task_count or len(inputs) != task_count:
        raise ValueError(f"{task_count} fine-tuned models but {len(heads)} heads and {len(inputs)} input sets")
    return [as_inputs(x) for x in inputs]


def adamerging(
    base_sd: Mapping[str, torch.Tensor],
    task_sds: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[Any],
    unlabeled_inputs: Sequence[Any],
    options: AdaMergingOptions | Mapping[str, Any] | None = None,
    *,
    encoder: FunctionalEncoder,
) -> DataMergeResult:
    """AdaMerging (module docstring).

    Args:
        base_sd: the pretrained encoder's state dict θ₀.
        task_sds: the T fine-tuned encoders' state dicts (same keys).
        heads: T frozen heads (``weight`` C_t × d, optional ``bias``), applied to the encoder's features.
        unlabeled_inputs: T input sets (tensors or :class:`~taskmerge.databased.loop.UnlabeledInputs`).
        options: :class:`AdaMergingOptions` or a mapping of its fields.
        encoder: the architecture and feature function (:class:`~taskmerge.databased.loop.FunctionalEncoder`).

    Returns:
        :class:`~taskmerge.databased.loop.DataMergeResult`: the merged encoder state dict and the (unchanged)
        heads; ``info["lambdas"]`` the learned coefficients.
    """
    opts = parse_options_as(AdaMergingOptions, options, "adamerging")
    inputs = check_inputs(heads, unlabeled_inputs, len(task_sds))
    inputs = [subset_inputs(x, opts.data_fraction, opts.seed + t) for t, x in enumerate(inputs)]
    vectors = task_vectors(base_sd, task_sds)
    if opts.preprocess == "ties":
        vectors = ties_preprocess(vectors, opts.ties_keep)
    merge = CoefficientMerge(base_sd, vectors, opts.granularity, opts.init_lambda)
    scales = entropy_scales(heads, opts.entropy_scaling)

    def objective(step: int, batches: list[Any], indices: list[list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        feats = encoder.step_features(batches, merge)
        return entropy_loss([head_logits(h, f) for h, f in zip(heads, feats)], scales)

    def clamp(step: int) -> None:
        if opts.clamp is not None:
            with torch.no_grad():
                merge.lambdas.clamp_(*opts.clamp)

    history = run_loop(objective, [{"params": [merge.lambdas], "lr": opts.lr}], inputs, opts,
                       desc=f"adamerging ({opts.granularity})", after_step=clamp)
    info = {"lambdas": merge.table(), "entropy_scales": scales, "options": opts.model_dump()}
    return DataMergeResult(merge.state_dict_merged(base_sd), list(heads), history, info)
