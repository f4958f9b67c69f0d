"""MDA-AM: learned layer-wise coefficients and per-task feature rotations toward a simplex ETF.

Chen et al., "From Coefficients to Directions: Rethinking Model Merging with Directional Alignment"
(arXiv 2512.00391), Algorithm 2, Definition 2, Eqs. 4–9; specs ``mda.md`` (§3) and
``mda-second-reading.md`` (§4). Starting from MDA-TA's ETF-aligned task vectors (:mod:`taskmerge.methods.mda`),
learn

* coefficients ``λ`` of the merged encoder ``θ^(l) = θ₀^(l) + λ^(l) τ_etf^(l)`` (Eq. 4), and
* one rotation ``R_t ∈ SO(d)`` per task acting on the final features, ``h̃ = R_t h``,

by minimising ``L = L_entropy + α L_align + β L_rotation`` (Eq. 6; α = 0.8, β = 0.2, Fig. 3's optima):

* ``L_entropy`` (Eq. 7): Shannon entropy of task t's frozen head on the rotated features, mean over a
  mini-batch of unlabeled inputs, summed over tasks;
* ``L_align`` (Eq. 8): ``Σ_t mean_i ‖normalize(R_t h_i) − m*_{φ_t(ŷ_i)}‖²``, the distance of the rotated,
  normalised feature to the ETF vertex of its class;
* ``L_rotation`` (Eq. 9): ``Σ_t ‖R_t − R_proc^t‖_F²`` with ``R_proc^t`` the closed-form orthogonal Procrustes
  rotation taking task t's class means of the normalised features onto its ETF vertices
  (:func:`taskmerge.rotation.procrustes`), recomputed every ``procrustes_every`` steps.

Gradient routing (Alg. 2 lines 10–11): λ is updated by ``L_entropy`` only, ``R_t`` by ``L_align + L_rotation``
only (stop-gradients in one backward pass; ``routing="joint"`` gives the full gradient of Eq. 6 to both).
``R_t`` stays in SO(d) exactly: it is parametrised by the Cayley map of ``K_t = A_t − A_tᵀ``,
``(I − K_t)⁻¹ (I + K_t)`` (``parametrization="cayley"``, default; ``"exp"``: ``exp(K_t)``; the spec accepts any
SO(d)-preserving map; at d = 384 and 8 tasks the matrix exponential's backward costs ≈ 1.3 s a step on one
core against 0.12 s for Cayley, which would make MDA-AM half again as slow as its encoder), ``A_t = 0`` at the start
(:class:`taskmerge.rotation.Rotation`), never a penalty alone. At deployment ``R_t`` is absorbed into the
task's head (``W_t ← W_t R_t``), so the deployed model has the base architecture and parameter count.

Labels. **No label is used by default** (resolved spec, MDA.4; App. G.1: "the data-based setup leverages only
the same unlabeled validation data as AdaMerging"). The class means behind ``R_proc`` come from pseudo-labels,
the merged model's own predictions (under the current rotation) on the unlabeled adaptation inputs
(``class_means="pseudo"``). ``class_means="labels"`` — class means of labelled inputs passed as ``labeled``
(the benchmark: its validation split) — is an explicit variant, recorded as ``info["uses_labels"]`` and marked
in every benchmark table; ``labeled`` is refused otherwise. Diagnostics (accuracy with ``R = I``, ``R_proc``
and the learned ``R``) are not computed here: :func:`rotation_diagnostics` scores them on labelled data that
was not used for adaptation (the benchmark: the split it did not adapt on). The class
of each unlabeled sample in ``L_align`` is a pseudo-label (flag A6): by default the current merged model's
prediction (``pseudo_labels="merged"``, second spec §4.2), alternatively the task's fine-tuned model's
(``"expert"``, first spec §3).

Readings of the ambiguities (spec flags; default first, alternative as an option):

* **λ granularity (A7).** ``granularity="layer"`` (default): one λ per parameter tensor multiplying the merged
  ``τ_etf`` (Eq. 4 as written; the issue's "layer-wise λ"). ``"task_layer"``: one λ per task and tensor over
  per-task ETF-aligned blocks ``τ_t^etf`` whose sum is ``τ_etf`` (the second spec's proposal, §4.1).
* **λ initialisation (A8).** ``init_lambda`` = MDA-TA's λ (default 1.0: the start is exactly the MDA-TA
  model); ``init_lambda="1/T"`` is Alg. 2's literal ``λ₀ = 1/T``. λ is clamped to ``[lambda_min, lambda_max]``
  (default ``[0, ∞)``).
* **ETF targets / classifier (A10).** ``etf_targets="global_anchored"`` (default, second spec): one simplex
  ETF of ``C = Σ_t C_t`` vertices in the feature space (:func:`taskmerge.etf.simplex_etf`), tasks occupying
  consecutive blocks, rotated by one orthogonal Procrustes onto the heads' normalised class prototypes so
  that targets point toward their own classes; ``"task_nearest"``: per task the exact simplex ETF closest to
  the task's centred head prototypes; ``"global_random"``: the literal unanchored frame.
* **Classifier (App. G.1: "aligning the classifier prototypes to the same simplex structure").**
  ``classifier="head"`` (default): the frozen task head reads the rotated features. ``"etf"``: the task's ETF
  targets themselves are the classifier, ``logits = s_t M*_t (R_t h)`` with bias 0 and ``s_t`` = ``etf_scale``
  or, by default, the mean row norm of the task's head weight (the head's logit scale, so the entropy keeps
  its temperature); deployed as that head with ``R_t`` absorbed.
* **Procrustes (A9).** Proper rotations (Kabsch correction); the column-vector convention ``R m_c ≈ m*_c``;
  where the class means do not determine the rotation (``C_t < d``) the optimum closest to the identity
  (``procrustes_completion="identity"``; ``"svd"``: whatever the SVD returns). See :mod:`taskmerge.rotation`.
* **Optimisation (A12; resolved spec MDA.4, §5.1 "follow AdaMerging").** Adam, lr 1e-3 for λ and for the
  rotations (App. G.1), batch 16 per task, 500 steps, Procrustes refresh every 25 steps.
* **Class means of a refresh (not specified).** ``procrustes_means="batches"`` (default): the features and
  predictions of the mini-batches the objective computed since the last refresh (25 steps × 16 inputs per
  task, no extra forward pass); the refresh at step 0 is one no-grad pass over all adaptation inputs.
  ``"full"``: a no-grad pass over all adaptation inputs at every refresh (exact means at the current λ and
  R; with 1000 inputs per task it costs about as much as the training itself).

Ablations (Fig. 2, Tables 9/12): ``rotation=False`` (R_t fixed to I: AdaMerging with shared layer-wise λ on the
MDA-TA vectors) and ``parameter_alignment=False`` (start from the plain Task Arithmetic vectors instead of
``τ_etf``; pass Task Arithmetic's λ as ``init_lambda``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from taskmerge import linalg
from taskmerge.databased.adamerging import CoefficientMerge, check_inputs
from taskmerge.databased.encoder import FunctionalEncoder
from taskmerge.databased.loop import (
    DataMergeResult,
    LabeledInputs,
    LinearHead,
    LoopOptions,
    changed_names,
    entropy,
    entropy_scales,
    head_logits,
    parse_options_as,
    run_loop,
    subset_inputs,
    task_vectors,
    with_weight,
)
from taskmerge.errors import OptionError
from taskmerge.etf import gaussian_qr, helmert_basis, simplex_etf
from taskmerge.registry import LayerContext
from taskmerge.rotation import Rotation, procrustes
from taskmerge.selection import TensorClass, TensorPolicy

__all__ = ["MDAAMOptions", "mda_am", "mda_am_loss", "mda_task_blocks", "etf_targets", "etf_heads", "class_means",
           "rotation_diagnostics"]

logger = logging.getLogger(__name__)


class MDAAMOptions(LoopOptions):
    """Options of :func:`mda_am` (module docstring), plus the shared loop options."""

    alpha: float = Field(0.8, ge=0, description="weight of L_align (Eq. 6)")
    beta: float = Field(0.2, ge=0, description="weight of L_rotation (Eq. 6)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of λ")
    rotation_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the rotation parameters")
    granularity: Literal["layer", "task_layer"] = Field("layer", description=(
        "layer: one λ per parameter tensor on the merged τ_etf (Eq. 4); task_layer: one λ per task and tensor on "
        "per-task ETF-aligned blocks summing to τ_etf (second spec §4.1)"))
    init_lambda: float | Literal["1/T"] = Field(1.0, description=(
        "initial λ: MDA-TA's λ (1.0: the start is the MDA-TA model), or 1/T (Alg. 2's literal λ₀)"))
    lambda_min: float | None = Field(0.0, description="λ is clamped to at least this after every step (none: no bound)")
    lambda_max: float | None = Field(None, description="λ is clamped to at most this after every step (none: no bound)")
    rotation: bool = Field(True, description="learn R_t (False: the 'w/o rotation' ablation)")
    parameter_alignment: bool = Field(True, description="start from τ_etf (False: plain TA vectors, ablation)")
    parametrization: Literal["exp", "cayley"] = Field("cayley", description=(
        "map of K_t = A_t − A_tᵀ onto SO(d): cayley = (I − K_t)⁻¹(I + K_t) (≈ 10x cheaper backward), exp = exp(K_t)"))
    etf_targets: Literal["global_anchored", "task_nearest", "global_random"] = Field("global_anchored", description=(
        "global_anchored: one simplex ETF of Σ C_t vertices rotated onto the heads' class prototypes; task_nearest: "
        "per task the simplex ETF closest to its centred head prototypes; global_random: the unanchored frame"))
    etf_seed: int = Field(0, description="seed of the random simplex ETF frame")
    pseudo_labels: Literal["merged", "expert"] = Field("merged", description=(
        "class of an unlabeled input in L_align: the current merged model's prediction, or the fine-tuned model's"))
    class_means: Literal["pseudo", "labels"] = Field(
        "pseudo", description="R_proc's class means: pseudo-labels of the unlabeled inputs, or labelled inputs (variant)")
    classifier: Literal["head", "etf"] = Field("head", description="the frozen task head, or the task's ETF targets (App. G.1)")
    etf_scale: float | None = Field(None, gt=0, description="logit scale of the ETF classifier (default: the head's mean row norm)")
    procrustes_means: Literal["batches", "full"] = Field("batches", description=(
        "class means of a R_proc refresh: from the mini-batches seen since the last refresh (no extra pass), or a "
        "no-grad pass over all adaptation inputs"))
    procrustes_every: int = Field(25, ge=1, description="steps between R_proc refreshes (Eq. 9)")
    procrustes_completion: Literal["identity", "svd"] = Field("identity", description=(
        "where the class means leave R_proc undetermined (C_t < d): the optimum closest to the identity, or what "
        "the SVD returns"))
    routing: Literal["split", "joint"] = Field("split", description=(
        "split: λ gets only L_entropy's gradient and R_t only L_align + L_rotation's (Alg. 2); joint: the full "
        "gradient of Eq. 6 to both"))
    entropy_scaling: Literal["none", "head_norm"] = Field(
        "none", description="rescale each task's logits in L_entropy to a common scale (our option; see loop.entropy_scales)")
    mda_options: dict[str, Any] = Field(default_factory=dict, description="options of mda_ta (num_classes filled from the heads)")


# ----------------------------------------------------------------------------------- per-task ETF blocks


def mda_task_blocks(base_sd: Mapping[str, torch.Tensor], task_sds: Sequence[Mapping[str, torch.Tensor]],
                    mda_options: Mapping[str, Any], policy: TensorPolicy | None = None) -> dict[str, torch.Tensor]:
    """Per-task ETF-aligned blocks ``τ_t^etf`` (T × shape) whose sum over t is MDA-TA's merged update.

    For a matrix, block t is task t's share ``U⊥[:, B_t] diag(σ_t) V⊥[:, B_t]ᵀ`` of the TSV-M reconstruction
    (the columns ``B_t`` of the whitened concatenated bases that came from task t), projected by the same
    ``P_ETF`` as :func:`taskmerge.methods.mda.mda_ta`; a tensor MDA-TA averages (biases, norms, embeddings)
    contributes ``Δ_t / T`` per task. Only ``shared="tsv"`` has per-task blocks.
    """
    from taskmerge.methods.mda import MDAOptions, layer_projector, rank_per_task

    opts = MDAOptions(**dict(mda_options))
    if opts.shared != "tsv":
        raise ValueError("per-task MDA blocks exist only for shared='tsv'")
    policy = policy or TensorPolicy()
    vectors = task_vectors(base_sd, task_sds)
    out: dict[str, torch.Tensor] = {}
    for name, deltas in vectors.items():
        cls = policy.classify(name, tuple(deltas.shape[1:]), base_sd[name].dtype)
        if cls is TensorClass.KEEP:
            continue
        T = deltas.shape[0]
        if cls is not TensorClass.MATRIX:
            out[name] = deltas / T
            continue
        m, n = deltas.shape[1:]
        k = rank_per_task(opts, (m, n), T)
        eps = torch.finfo(deltas.dtype).eps * max(m, n)
        us, ss, vhs, owner = [], [], [], []
        for t, d in enumerate(deltas):  # as taskmerge.methods.tsv.tsv_bases, remembering each triplet's task
            part = linalg.truncated_svd(d, k)
            if part.S.numel() == 0:
                continue
            keep = part.S > eps * part.S[0]
            us.append(part.U[:, keep])
            ss.append(part.S[keep])
            vhs.append(part.Vh[keep])
            owner += [t] * int(keep.sum())
        blocks = torch.zeros_like(deltas)
        if owner:
            u, vh, s = linalg.polar(torch.cat(us, dim=1)), linalg.polar(torch.cat(vhs, dim=0)), torch.cat(ss)
            who = torch.tensor(owner)
            for t in range(T):
                sel = who == t
                if bool(sel.any()):
                    blocks[t] = (u[:, sel] * s[sel]) @ vh[sel]
        projector = layer_projector(opts, deltas, LayerContext(name=name))
        if projector is not None:
            blocks = torch.stack([projector.apply(b, opts.etf_side) for b in blocks])
        out[name] = blocks
    return out


# ------------------------------------------------------------------------------------------- ETF targets


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _global_frame(classes: int, dim: int, seed: int) -> torch.Tensor:
    """``C × d`` class directions: :func:`taskmerge.etf.simplex_etf` when ``d >= C``. When ``d < C`` no simplex ETF
    exists in R^d and the truncated Helmert frame of the SVD branch has all-zero rows (class j's Helmert
    coefficients vanish on the first ``j − 1`` columns), so a target would be the zero vector; we use
    ``sqrt(C/(C−1)) · H Q[:, :d]`` instead, with ``H`` the Helmert basis of ``1^⊥`` and ``Q`` a seeded random
    orthogonal ``(C−1) × (C−1)`` matrix (:func:`taskmerge.etf.gaussian_qr`) — another valid "U from the SVD of the centring matrix", with no zero
    row [INFERRED]; rows are normalised by the caller."""
    if dim >= classes:
        return simplex_etf(classes, dim, seed=seed, dtype=torch.float64)
    q = gaussian_qr(classes - 1, classes - 1, seed)
    return math.sqrt(classes / (classes - 1)) * (helmert_basis(classes) @ q)[:, :dim]


def etf_targets(heads: Sequence[Any], mode: str = "global_anchored", seed: int = 0) -> list[torch.Tensor]:
    """The ETF target vertices of every task's classes, one ``C_t × d`` matrix (unit rows) per task.

    ``global_anchored``: a simplex ETF of ``C = Σ C_t`` vertices in R^d (rows normalised), rotated by the
    orthogonal Procrustes solution onto the stacked normalised head rows, split into task blocks in task
    order. ``task_nearest``: per task, the simplex ETF of ``C_t`` vertices closest to the centred normalised
    head rows. ``global_random``: the unrotated global frame.
    """
    protos = [_unit_rows(h.weight.detach().double()) for h in heads]
    counts = [p.shape[0] for p in protos]
    d = protos[0].shape[1]
    if mode == "task_nearest":
        out = []
        for p in protos:
            c = p.shape[0]
            if c < 2:
                raise ValueError("a task needs at least 2 classes")
            dec = linalg.svd(p - p.mean(0, keepdim=True))
            r = min(c - 1, dec.S.numel())
            out.append((math.sqrt(c / (c - 1)) * dec.U[:, :r] @ dec.Vh[:r]).float())
        return out
    total = sum(counts)
    frame = _unit_rows(_global_frame(total, d, seed))
    if mode == "global_anchored":
        rot = procrustes(frame, torch.cat(protos), proper=False)
        frame = _unit_rows(frame @ rot.T)
    elif mode != "global_random":
        raise ValueError(f"unknown etf_targets mode {mode!r}")
    return [b.float() for b in torch.split(frame, counts)]


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the L2-normalised features per class (rows not re-normalised) and the classes present."""
    f = _unit_rows(features.float())
    present = torch.tensor([c for c in range(num_classes) if bool((labels == c).any())], dtype=torch.long)
    means = torch.stack([f[labels == c].mean(0) for c in present.tolist()]) if len(present) else f.new_zeros(0, f.shape[1])
    return means, present


# ----------------------------------------------------------------------------------------- the objective


def etf_heads(heads: Sequence[Any], targets: Sequence[torch.Tensor], scale: float | None = None) -> list[Any]:
    """The ETF classifier of every task (App. G.1): weight ``s_t M*_t`` (the task's ETF targets), bias 0, with
    ``s_t = scale`` or the mean row norm of the task's head weight. Same head class where possible."""
    out = []
    for head, m in zip(heads, targets):
        s = float(scale) if scale is not None else float(head.weight.detach().float().norm(dim=1).mean())
        weight, bias = (s * m).to(head.weight.dtype), torch.zeros(m.shape[0], dtype=head.weight.dtype)
        try:
            out.append(replace(head, weight=weight, bias=bias))
        except TypeError:
            out.append(LinearHead(weight, bias))
    return out


def mda_am_loss(
    features: Sequence[torch.Tensor],
    heads: Sequence[Any],
    rotations: torch.Tensor | None,
    targets: Sequence[torch.Tensor],
    r_proc: Sequence[torch.Tensor],
    *,
    alpha: float,
    beta: float,
    routing: str = "split",
    scales: Sequence[float] | None = None,
    labels: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """MDA-AM's objective, Eq. 6 = Eq. 7 + α Eq. 8 + β Eq. 9, with Alg. 2's gradient routing.

    * ``L_entropy = Σ_t mean_i H(softmax(s_t W_t R_t h_i + b_t))`` (Eq. 7, the task heads on rotated features);
    * ``L_align = Σ_t mean_i ‖R_t h_i / ‖R_t h_i‖ − m*_{y_i}‖²`` (Eq. 8) with ``y_i`` = ``labels`` (expert
      pseudo-labels) or the prediction of the rotated logits;
    * ``L_rotation = Σ_t ‖R_t − R_proc^t‖_F²`` (Eq. 9).

    ``routing="split"`` (Alg. 2 lines 10–11): ``L_entropy`` sees ``R_t`` detached and ``L_align`` sees ``h``
    detached, so the features (hence λ) get gradient from ``L_entropy`` only and ``R_t`` from
    ``α L_align + β L_rotation`` only. ``"joint"``: every term reaches everything it depends on.
    ``rotations=None`` is the "w/o rotation" ablation (``L_entropy`` of the heads on ``h``, nothing else).

    Args:
        features: per task, the merged encoder's features ``h`` of a batch (B × d).
        heads: per task, the classifier (``weight`` C_t × d, optional ``bias``).
        rotations: ``R`` (T × d × d) or ``None``.
        targets: per task, the ETF vertices of its classes (C_t × d, unit rows).
        r_proc: per task, the current Procrustes rotation.
        scales: per task, a factor on the logits inside the entropy (default 1).
    Returns:
        The loss, its parts (``entropy``, ``align``, ``rotation``) and each task's predictions (B,).
    """
    zero = torch.zeros((), dtype=features[0].dtype, device=features[0].device)
    l_ent, l_align, l_rot = zero, zero, zero
    preds = []
    for t, h in enumerate(features):
        if rotations is None:
            z = head_logits(heads[t], h)
        else:
            r = rotations[t] if routing == "joint" else rotations[t].detach()
            z = head_logits(heads[t], h @ r.T)
        l_ent = l_ent + entropy(z if scales is None else scales[t] * z).mean()
        yhat = z.detach().argmax(-1)
        preds.append(yhat)
        if rotations is not None:
            y = labels[t] if labels is not None else yhat
            hd = h if routing == "joint" else h.detach()
            hr = _unit_rows(hd @ rotations[t].T)
            l_align = l_align + (hr - targets[t].to(hr.dtype)[y]).pow(2).sum(-1).mean()
            l_rot = l_rot + (rotations[t] - r_proc[t].to(rotations.dtype)).pow(2).sum()
    loss = l_ent + alpha * l_align + beta * l_rot
    parts = {"entropy": float(l_ent.detach()), "align": float(l_align.detach()), "rotation": float(l_rot.detach())}
    return loss, parts, preds


# ---------------------------------------------------------------------------------------------- the method


def mda_am(
    base_sd: Mapping[str, torch.Tensor],
    task_sds: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[Any],
    unlabeled_inputs: Sequence[Any],
    options: MDAAMOptions | Mapping[str, Any] | None = None,
    *,
    encoder: FunctionalEncoder,
    labeled: Sequence[LabeledInputs] | None = None,
    start_vector: Mapping[str, torch.Tensor] | None = None,
) -> DataMergeResult:
    """MDA-AM (module docstring).

    Args:
        base_sd, task_sds, heads, unlabeled_inputs, encoder: as :func:`taskmerge.databased.adamerging.adamerging`.
        options: :class:`MDAAMOptions` or a mapping of its fields.
        labeled: per task, labelled inputs for the class means of ``R_proc``; only with
            ``class_means="labels"`` (an error otherwise: by default MDA-AM reads no label).
        start_vector: the merged update to start from with ``granularity="layer"`` (default: MDA-TA's,
            computed here with ``mda_options``; Task Arithmetic's sum with ``parameter_alignment=False``).

    Returns:
        :class:`~taskmerge.databased.loop.DataMergeResult` with the merged encoder and the heads with ``R_t``
        absorbed (``W_t R_t``; the ETF classifier's with ``classifier="etf"``); ``info`` holds the λ, the
        rotations, ``R_proc``, their distances, the classifier heads before absorption and ``uses_labels``.
    """
    opts = parse_options_as(MDAAMOptions, options, "mda_am")
    T = len(task_sds)
    inputs = check_inputs(heads, unlabeled_inputs, T)
    inputs = [subset_inputs(x, opts.data_fraction, opts.seed + t) for t, x in enumerate(inputs)]
    if opts.class_means == "labels":
        if labeled is None or len(labeled) != T:
            raise OptionError(f"mda_am: option class_means='labels' needs labelled inputs for each of the {T} tasks "
                              f"(got {'none' if labeled is None else len(labeled)})")
    elif labeled is not None:
        raise OptionError("mda_am: labelled inputs are read only with option class_means='labels'; the default "
                          "'pseudo' uses no label")
    counts = [int(h.weight.shape[0]) for h in heads]
    dim = int(heads[0].weight.shape[1])

    # -- the vectors λ multiplies
    mda_opts = {"num_classes": counts, **opts.mda_options}
    if opts.granularity == "layer":
        if start_vector is None:
            from taskmerge.merge import merged_task_vector

            method = "mda_ta" if opts.parameter_alignment else "task_arithmetic"
            start_vector = merged_task_vector(base_sd, task_sds, method, mda_opts if opts.parameter_alignment else None)
        vectors = {n: v.unsqueeze(0) for n, v in start_vector.items() if bool((v != 0).any())}
    elif opts.parameter_alignment:
        vectors = mda_task_blocks(base_sd, task_sds, mda_opts)
    else:
        vectors = task_vectors(base_sd, task_sds)
    num_vec = next(iter(vectors.values())).shape[0]
    init = 1.0 / T if opts.init_lambda == "1/T" else float(opts.init_lambda)
    merge = CoefficientMerge(base_sd, vectors, "layer", init)

    # -- classifier, rotations, ETF targets, pseudo-labels
    targets = etf_targets(heads, opts.etf_targets, opts.etf_seed)
    classifiers = list(heads) if opts.classifier == "head" else etf_heads(heads, targets, opts.etf_scale)
    scales = entropy_scales(classifiers, opts.entropy_scaling)
    rot = Rotation(dim, opts.parametrization, count=T)
    eye = torch.eye(dim)
    r_proc = [eye.clone() for _ in range(T)]
    expert_labels: list[torch.Tensor] | None = None
    if opts.rotation and opts.pseudo_labels == "expert":
        expert_labels = []
        changed = changed_names(base_sd, task_sds)
        for t in range(T):
            feats = encoder.features({n: task_sds[t][n] for n in changed}, inputs[t], opts.feature_batch_size)
            expert_labels.append(head_logits(heads[t], feats).argmax(-1))
    from_batches = opts.rotation and opts.class_means == "pseudo" and opts.procrustes_means == "batches"
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(T)]

    def full_pass(rotations: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per task: features and labels of a no-grad pass (labelled inputs, or pseudo-labels of the
        unlabeled ones under the current rotation)."""
        params = merge()
        out = []
        for t in range(T):
            if opts.class_means == "labels":
                feats = encoder.features(params, labeled[t].inputs, opts.feature_batch_size)
                out.append((feats, labeled[t].labels.long()))
            else:
                feats = encoder.features(params, inputs[t], opts.feature_batch_size)
                out.append((feats, head_logits(classifiers[t], feats @ rotations[t].T).argmax(-1)))
        return out

    def refresh(step: int) -> None:
        if not opts.rotation or step % opts.procrustes_every:
            return
        with torch.no_grad():
            if from_batches and step > 0:
                sources = [(torch.cat([f for f, _ in s]), torch.cat([y for _, y in s])) for s in seen]
            else:
                sources = full_pass(rot.matrix())
            for t, (feats, labels) in enumerate(sources):
                means, present = class_means(feats, labels, counts[t])
                if len(present):
                    r_proc[t] = procrustes(means, targets[t][present], completion=opts.procrustes_completion)
                seen[t].clear()

    def objective(step: int, batches: list[Any], indices: list[list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        feats = encoder.step_features(batches, merge)
        rotations = rot() if opts.rotation else None
        labels = ([expert_labels[t][torch.as_tensor(indices[t])] for t in range(T)]
                  if expert_labels is not None else None)
        loss, parts, preds = mda_am_loss(feats, classifiers, rotations, targets, r_proc, alpha=opts.alpha,
                                         beta=opts.beta, routing=opts.routing, scales=scales, labels=labels)
        if from_batches:
            for t in range(T):
                seen[t].append((feats[t].detach().float(), preds[t]))
        return loss, parts

    def clamp(step: int) -> None:
        if opts.lambda_min is not None or opts.lambda_max is not None:
            with torch.no_grad():
                merge.lambdas.clamp_(opts.lambda_min, opts.lambda_max)

    groups = [{"params": [merge.lambdas], "lr": opts.lr}]
    if opts.rotation:
        groups.append({"params": [rot.weight], "lr": opts.rotation_lr})
    history = run_loop(objective, groups, inputs, opts, desc="mda_am", before_step=refresh, after_step=clamp)

    # -- deploy: absorb R_t into the classifier
    rotations = rot.matrix() if opts.rotation else torch.stack([eye] * T)
    new_heads = [with_weight(h, h.weight.float() @ rotations[t]) for t, h in enumerate(classifiers)]
    state = merge.state_dict_merged(base_sd)
    info: dict[str, Any] = {
        "lambdas": merge.table(),
        "lambda_mean": float(merge.lambdas.detach().mean()),
        "vectors_per_tensor": num_vec,
        "uses_labels": opts.class_means == "labels",
        "classifier_heads": classifiers,
        "rotations": rotations.clone(),
        "procrustes_rotations": torch.stack(r_proc),
        "rotation_distance_to_identity": [float((rotations[t] - eye).norm()) for t in range(T)],
        "rotation_distance_to_procrustes": [float((rotations[t] - r_proc[t]).norm()) for t in range(T)],
        "options": opts.model_dump(),
    }
    return DataMergeResult(state, new_heads, history, info)


@torch.no_grad()
def rotation_diagnostics(encoder: FunctionalEncoder, state: Mapping[str, torch.Tensor], heads: Sequence[Any],
                         rotations: torch.Tensor, r_proc: torch.Tensor | Sequence[torch.Tensor],
                         labeled: Sequence[LabeledInputs], batch_size: int = 64) -> dict[str, list[float]]:
    """Accuracy per task with ``R = I``, ``R = R_proc`` and the learned ``R`` (the spec's check that ``R_proc``
    does not scramble predictions), on labelled inputs that were **not** used for adaptation.

    Args:
        encoder: the encoder; ``state`` the merged state dict (``result.state_dict``).
        heads: the classifiers before the rotations were absorbed (``result.info["classifier_heads"]``).
        rotations, r_proc: ``result.info["rotations"]`` and ``["procrustes_rotations"]``.
        labeled: per task, held-out labelled inputs.
    """
    out: dict[str, list[float]] = {"acc_identity": [], "acc_procrustes": [], "acc_learned": []}
    for t, lab in enumerate(labeled):
        feats = encoder.features(state, lab.inputs, batch_size)
        y = lab.labels.long()
        for key, r in (("acc_identity", torch.eye(feats.shape[1])), ("acc_procrustes", r_proc[t]),
                       ("acc_learned", rotations[t])):
            out[key].append(float((head_logits(heads[t], feats @ r.T).argmax(-1) == y).float().mean()))
    return out
