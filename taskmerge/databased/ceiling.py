"""MOMA's ceiling check (Kong et al., §3.3, Eq. 8, Fig. 4): what an exact feature alignment reaches, no training.

For task t, let ``G_m`` and ``G_t`` hold the features (rows, the heads' input) of the same N inputs under the
merged encoder and under task t's fine-tuned encoder. The maps that align them best:

* **orthogonal** — ``A = argmin_{AᵀA = I} ‖G_m Aᵀ − G_t‖_F = polar(G_tᵀ G_m)``, the orthogonal Procrustes
  solution (:func:`taskmerge.linalg.polar`): Eq. 8 with the squared error and α → ∞ (an exact rotation or
  reflection), what MOMA's ``A_t`` approximates by gradient descent;
* **linear** — ``A = argmin_A ‖G_m Aᵀ − G_t‖_F = (G_m⁺ G_t)ᵀ``, least squares (Table 1's "Linear", Table 4's
  ``linear_mask`` ablation without the mask).

A head absorbs the map (Eq. 9; ``logits = W (A g) + b = (W A) g + b``), so the accuracy of the absorbed heads is
what alignment alone can recover on this merge: MOMA's ceiling at a fixed mask (the mask can add more). Fit
on the unlabeled test inputs (as MOMA adapts) for the transductive ceiling; fit on another split and score
on test for the inductive one. The fit uses no label; labels only score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from taskmerge import linalg
from taskmerge.databased.loop import head_logits
from taskmerge.rotation import procrustes

__all__ = ["orthogonal_map", "least_squares_map", "alignment_maps", "relative_residual", "task_ceiling",
           "average_ceiling"]

logger = logging.getLogger(__name__)

MAPS = ("identity", "orthogonal", "linear")


def _check(source: torch.Tensor, target: torch.Tensor) -> None:
    if source.ndim != 2 or source.shape != target.shape:
        raise ValueError(f"alignment needs features of the same inputs, (N, d) each; got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")


def orthogonal_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``argmin_{AᵀA = I} ‖source Aᵀ − target‖_F`` (d × d, float64): the polar factor of ``targetᵀ source``.

    When ``targetᵀ source`` is rank-deficient (fewer inputs than dimensions) its polar factor is a partial
    isometry; the optimum closest to the identity is then taken (:func:`taskmerge.rotation.procrustes`).
    """
    _check(source, target)
    s, t = source.double(), target.double()
    a = linalg.polar(t.T @ s)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    if float((a.T @ a - eye).abs().max()) > 1e-8:
        logger.info("orthogonal_map: rank-deficient cross-covariance (%d inputs, d = %d); completing towards I",
                    s.shape[0], s.shape[1])
        a = procrustes(s, t, proper=False)
    return a


def least_squares_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``argmin_A ‖source Aᵀ − target‖_F`` (d × d, float64; the minimum-norm solution when underdetermined)."""
    _check(source, target)
    return torch.linalg.lstsq(source.double(), target.double(), driver="gelsd").solution.T


def alignment_maps(source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"identity": I, "orthogonal": …, "linear": …}`` fitted on one task's features (see the module docstring)."""
    d = source.shape[1]
    return {"identity": torch.eye(d, dtype=torch.float64), "orthogonal": orthogonal_map(source, target),
            "linear": least_squares_map(source, target)}


def relative_residual(source: torch.Tensor, target: torch.Tensor, a: torch.Tensor) -> float:
    """``‖source Aᵀ − target‖_F / ‖target‖_F``."""
    t = target.double()
    return float((source.double() @ a.T - t).norm() / t.norm().clamp_min(1e-300))


def task_ceiling(fit_merged: torch.Tensor, fit_finetuned: torch.Tensor, eval_merged: torch.Tensor,
                 eval_finetuned: torch.Tensor, labels: torch.Tensor, head: Any) -> dict[str, Any]:
    """One task's ceiling: maps fitted on ``fit_*`` (no label), scored on ``eval_*`` with ``labels``.

    Returns per map (``identity`` = the merge as is, ``orthogonal``, ``linear``) the accuracy of the head with
    the map absorbed and the relative residual on the fit and eval features; ``finetuned`` the fine-tuned
    encoder's accuracy with the same head.
    """
    y = labels.long()

    def accuracy(feats: torch.Tensor, a: torch.Tensor | None = None) -> float:
        g = feats.double() if a is None else feats.double() @ a.T
        return float((head_logits(head, g).argmax(-1) == y).double().mean())

    maps = alignment_maps(fit_merged, fit_finetuned)
    out: dict[str, Any] = {"finetuned": accuracy(eval_finetuned)}
    for name, a in maps.items():
        out[name] = {"accuracy": accuracy(eval_merged, a),
                     "residual_fit": relative_residual(fit_merged, fit_finetuned, a),
                     "residual_eval": relative_residual(eval_merged, eval_finetuned, a)}
    return out


def average_ceiling(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Averages over tasks of a method's :func:`task_ceiling` results: accuracy (absolute and normalised by
    the fine-tuned accuracy) per map, and the share of the gap to the fine-tuned models each map closes,
    ``(acc_map − acc_identity) / (acc_finetuned − acc_identity)`` on the averages."""
    names: Sequence[str] = list(per_task)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    ft = mean([per_task[n]["finetuned"] for n in names])
    out: dict[str, Any] = {"finetuned": ft}
    for m in MAPS:
        acc = mean([per_task[n][m]["accuracy"] for n in names])
        norm = mean([per_task[n][m]["accuracy"] / per_task[n]["finetuned"] for n in names])
        out[m] = {"accuracy": acc, "normalized": norm,
                  "residual_eval": mean([per_task[n][m]["residual_eval"] for n in names])}
    gap = ft - out["identity"]["accuracy"]
    for m in ("orthogonal", "linear"):
        out[m]["gap_closed"] = (out[m]["accuracy"] - out["identity"]["accuracy"]) / gap if gap > 0 else None
    return out
