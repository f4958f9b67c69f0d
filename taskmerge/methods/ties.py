"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, the
three steps of its Algorithm 1. With τ_t the task vectors:

1. *Trim*: τ̂_t keeps the top-k % entries of τ_t by magnitude and zeroes the rest (k = 20 %).
2. *Elect*: γ = sgn(Σ_t τ̂_t), the sign carrying the larger total mass per entry.
3. *Disjoint merge*: with A^p = {t : sgn(τ̂_t^p) = γ^p}, τ_m^p = (1/|A^p|) Σ_{t∈A^p} τ̂_t^p.

The model is θ₀ + λ·τ_m. The reusable pieces are pure functions of a stack ``(T, *shape)``:
:func:`ties_trim`, :func:`ties_elect_sign`, :func:`disjoint_mean` (and :func:`disjoint_sum`) and the
whole per-tensor rule :func:`ties_merge` (imported by DC-Merge, DARE-TIES and Consensus-TIES).

Choices, compared with the official code (prateeky2806/ties-merging ``topk_values_mask``,
``resolve_sign``, ``disjoint_merge``):

* **Number kept** (option ``boundary``). Exactly ``k = max(1, round(keep · N))`` of the ``N`` entries per task
  (``round``, the default: the paper's k %); among entries tied at the threshold the lowest flat indices win
  (deterministic). The official ``kthvalue`` code, which FusionBench runs, keeps every entry ``≥`` the
  ``(N − ⌊keep·N⌋)``-th smallest magnitude, i.e. ``⌊keep·N⌋ + 1`` entries plus any ties
  (``boundary="floor_plus_one"``); MergeKit's ``sparsify.magnitude`` keeps the top ``max(1, ⌊keep·N⌋)`` of each
  tensor (``boundary="floor"``). They differ by one entry per tensor (per model with ``scope="global"``).
* **Disjoint merge** (option ``disjoint``). ``mean`` (the paper's Algorithm 1) or ``sum`` (the official code's
  ``dis-sum``; FusionBench's default ``merge_func: sum``; MergeKit's ``normalize: false``). With per-model
  weights (``LayerContext.weights``, already applied to the updates by the engine) the mean divides by the
  agreeing tasks' weight sum ``Σ_t w_t 1{agree}``, MergeKit's ``normalize: true``.
* **Scope.** ``scope="tensor"`` (default) trims each tensor on its own; ``scope="global"`` trims with one
  model-wide threshold per task, exactly as the paper and the official code (which flatten the whole
  model): a :class:`TiesGlobalThreshold` statistic collects every ``|Δ_t|`` in a first pass and finds the
  exact k-th largest magnitude per task (ties at the threshold again broken by tensor name, then index).
  The default is per-tensor because the exact global threshold holds ``T × P`` magnitudes in memory
  (``P`` = number of merged parameters, about 2.8 GB for 8 CLIP ViT-B/32 task vectors), against the
  streaming one-tensor-at-a-time engine.
* **Zero elected signs.** As ``resolve_zero_signs(..., "majority")`` in the official code, an entry whose
  trimmed sum is exactly 0 gets the majority sign; the majority is taken over the tensor (the official
  code takes it over the flattened model). It only matters where non-zero trimmed values cancel exactly.
  If the majority is 0 as well, the entry merges to 0 (the official ``torch.where(sign > 0, τ > 0, τ < 0)``
  would average its negative entries). MergeKit elects ``+`` for an exactly zero sum instead.
* **λ.** Default 1.0, the paper's no-validation default ("k = 20, λ = 1"); the sweep grid is the
  registry's 0.1–3.0, which contains both the paper's validation range 0.8–2.5 (T5/IA³) and the
  0.2–0.6 range where the CLIP-ViT literature (TALL masks, FusionBench: 0.3) finds TIES's optimum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from taskmerge.registry import AnotherPass, LayerContext, MethodOptions, register_method

__all__ = [
    "Boundary",
    "TiesOptions",
    "TiesGlobalThreshold",
    "TiesGlobalState",
    "keep_count",
    "kth_largest",
    "ties_trim_mask",
    "ties_global_mask",
    "ties_trim",
    "ties_elect_sign",
    "disjoint_mean",
    "disjoint_sum",
    "disjoint_merge",
    "ties_merge",
    "ties",
]


Boundary = Literal["round", "floor", "floor_plus_one"]


def keep_count(n: int, keep: float, boundary: Boundary = "round") -> int:
    """How many of ``n`` entries a keep fraction retains, at least 1 when ``keep > 0`` and all when ``keep ≥ 1``:
    ``round(keep · n)`` (``round``, the paper's k %), ``⌊keep · n⌋`` (``floor``, MergeKit's ``int(density · numel)``)
    or ``⌊keep · n⌋ + 1`` (``floor_plus_one``, the official code's ``kthvalue(n − int(n · K))``, FusionBench's)."""
    if keep <= 0 or n == 0:
        return 0
    if keep >= 1:
        return n
    if boundary == "round":
        k = int(keep * n + 0.5)
    elif boundary == "floor":
        k = int(keep * n)
    elif boundary == "floor_plus_one":
        k = int(n * keep) + 1
    else:
        raise ValueError(f"keep_count: unknown boundary {boundary!r} (round, floor or floor_plus_one)")
    return max(1, min(n, k))


# Below this many entries a row's k-th largest magnitude is taken by ``torch.kthvalue`` directly; above it
# by a histogram of the leading float bits first (``kth_largest``), which bounds the extra memory.
_KTHVALUE_MAX = 1 << 22
# Rows longer than this are scanned in chunks of this many entries by the histogram pass.
_CHUNK = 1 << 22
_BITS_VIEW = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}


def _buckets(values: torch.Tensor) -> torch.Tensor:
    """The bucket of each non-negative float32/float64: its 16 leading bits (for non-negative IEEE floats the
    bit pattern read as an integer is monotone in the value)."""
    int_dtype, shift = _BITS_VIEW[values.dtype]
    return (values.view(int_dtype) >> shift).long()


def _bucket_counts(values: torch.Tensor) -> torch.Tensor:
    """How many entries of the 1-D ``values`` fall in each of the 2^16 buckets, counted in chunks."""
    counts = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
    for start in range(0, values.numel(), _CHUNK):
        counts += torch.bincount(_buckets(values[start:start + _CHUNK]), minlength=1 << 16)
    return counts


def _in_bucket(values: torch.Tensor, bucket: int) -> torch.Tensor:
    """The entries of the 1-D ``values`` in ``bucket``, selected in chunks."""
    parts = [chunk[_buckets(chunk) == bucket] for chunk in values.split(_CHUNK)]
    return torch.cat(parts) if parts else values[:0]


def _bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """From per-bucket counts (2^16,), the bucket holding the k-th largest entry and how many entries lie in
    higher buckets."""
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = entries in buckets ≥ b
    bucket = int(torch.nonzero(above >= k).max())  # the highest bucket with at least k entries at or above it
    return bucket, int(above[bucket + 1]) if bucket + 1 < above.numel() else 0


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry (1 ≤ k ≤ N) of a 1-D tensor of non-negative floats, exactly.

    ``torch.kthvalue`` copies its input and allocates an int64 index per entry (12 bytes per float32
    entry: 3 GB for the embedding of a 32k-vocabulary LLaMA-1B, 4 tasks). For long float32/float64 rows this
    first counts the entries per bucket of their 16 leading bits (for non-negative IEEE floats the bit
    pattern read as an integer is monotone in the value), in chunks, finds the bucket holding the k-th
    largest, and runs ``kthvalue`` on that bucket's entries only. Memory: one chunk plus one bucket.
    """
    if values.ndim != 1:
        raise ValueError(f"kth_largest expects a 1-D tensor, got shape {tuple(values.shape)}")
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest: k must be in [1, {n}], got {k}")
    if n <= _KTHVALUE_MAX or values.dtype not in _BITS_VIEW:
        return torch.kthvalue(values, n - k + 1).values
    bucket, larger = _bucket_of_kth(_bucket_counts(values), k)
    candidates = _in_bucket(values, bucket)
    return torch.kthvalue(candidates, candidates.numel() - (k - larger) + 1).values


def _top_mask(mag: torch.Tensor, thr: torch.Tensor, k: int) -> torch.Tensor:
    """The entries of ``mag`` above ``thr``, plus the first entries equal to it up to ``k`` in total (ties go to
    the lowest flat index)."""
    mask = mag >= thr
    if int(mask.sum()) != k:  # ties at the threshold: keep only the first ones
        eq = mag == thr
        quota = k - int((mag > thr).sum())
        mask = (mag > thr) | (eq & (eq.cumsum(0) <= quota))
    return mask


def ties_trim_mask(deltas: torch.Tensor, keep: float, boundary: Boundary = "round") -> torch.Tensor | None:
    """The entries TIES step 1 keeps: per task, the ``keep`` fraction of largest magnitude (bool, ``deltas``'
    shape), or ``None`` when every entry is kept (``keep ≥ 1``).

    The top-k runs over all non-task dimensions of ``deltas`` (T, *shape), with ``k = keep_count(N, keep, boundary)``;
    ties at the threshold go to the lowest flat index, so exactly ``k`` entries survive per task. Works task by
    task (:func:`kth_largest`): the extra memory is one task's magnitudes plus the mask (1 byte per entry).
    """
    if deltas.ndim == 0:
        raise ValueError("ties_trim expects a stack of task updates (T, *shape)")
    t = deltas.shape[0]
    flat = deltas.detach().reshape(t, -1)
    n = flat.shape[1]
    k = keep_count(n, keep, boundary)
    if k >= n:
        return None
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=deltas.device)
    if k > 0:
        for i in range(t):
            mag = flat[i].abs()
            mask[i] = _top_mask(mag, kth_largest(mag, k), k)
    return mask.reshape(deltas.shape)


def ties_trim(deltas: torch.Tensor, keep: float, boundary: Boundary = "round") -> torch.Tensor:
    """TIES step 1: per task, keep the ``keep`` fraction of largest-magnitude entries, zero the rest
    (:func:`ties_trim_mask`). Returns a new tensor of the same shape (the input itself when ``keep ≥ 1``);
    differentiable in the kept entries."""
    mask = ties_trim_mask(deltas, keep, boundary)
    return deltas if mask is None else torch.where(mask, deltas, 0)


def ties_elect_sign(deltas: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TIES step 2: ``γ = sgn(Σ_t Δ_t)`` over the entries of ``mask`` (all if ``None``); exact zeros take the
    tensor's majority sign ``sgn(Σ γ)``."""
    if mask is None:
        total = deltas.sum(dim=0)
    else:
        total = torch.zeros_like(deltas[0])
        for d, m in zip(deltas, mask):
            total += torch.where(m, d, 0)
    sign = torch.sign(total)
    del total
    majority = torch.sign(sign.sum())
    return sign.masked_fill_(sign == 0, majority)


def _agreeing_sum(deltas: torch.Tensor, sign: torch.Tensor, mask: torch.Tensor | None = None,
                  weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tasks of the entries (of ``mask``, if given) that are non-zero with the elected ``sign``, and how
    many there are per entry (none where the sign is 0) — with ``weights``, the sum of the agreeing tasks'
    weights instead. Task by task: the extra memory is a few single-task tensors."""
    pos, neg = sign > 0, sign < 0
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for i, d in enumerate(deltas):
        agree = (pos & (d > 0)) | (neg & (d < 0))
        if mask is not None:
            agree &= mask[i]
        total += torch.where(agree, d, 0)
        if weights is None:
            count += agree
        else:
            count += torch.where(agree, float(weights[i]), 0.0)
    return total, count


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor, mask: torch.Tensor | None = None,
                  weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES step 3: mean over tasks of the non-zero entries (of ``mask``, if given) whose sign agrees with
    ``sign`` (0 if none). With ``weights`` (already applied to ``deltas``) the sum is divided by the agreeing
    tasks' weight sum instead of their count (a zero divisor counts as 1, as MergeKit's ``normalize``)."""
    total, count = _agreeing_sum(deltas, sign, mask, weights)
    return total / torch.where(count == 0, 1.0, count)


def disjoint_sum(deltas: torch.Tensor, sign: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``dis-sum`` variant of step 3: sum of the entries (of ``mask``, if given) whose sign agrees with ``sign``."""
    return _agreeing_sum(deltas, sign, mask)[0]


def disjoint_merge(deltas: torch.Tensor, sign: torch.Tensor, mask: torch.Tensor | None, disjoint: str,
                   weights: Sequence[float] | None = None) -> torch.Tensor:
    """Step 3 by name: ``mean`` (:func:`disjoint_mean`, weighted by ``weights`` if given) or ``sum``."""
    if disjoint == "sum":
        return disjoint_sum(deltas, sign, mask)
    if disjoint == "mean":
        return disjoint_mean(deltas, sign, mask, weights)
    raise ValueError(f"disjoint_merge: unknown rule {disjoint!r} (mean or sum)")


def ties_merge(deltas: torch.Tensor, keep: float = 0.2, boundary: Boundary = "round", disjoint: str = "mean",
               weights: Sequence[float] | None = None) -> torch.Tensor:
    """The whole per-tensor TIES rule: trim to ``keep``, elect signs, disjoint mean (or sum). Shape
    ``deltas.shape[1:]``."""
    mask = ties_trim_mask(deltas, keep, boundary)  # the trimmed updates are deltas · mask, never materialised
    return disjoint_merge(deltas, ties_elect_sign(deltas, mask), mask, disjoint, weights)


class TiesOptions(MethodOptions):
    """Options of ``ties`` (see the module docstring's choices)."""

    keep: float = Field(0.2, gt=0.0, le=1.0, description=(
        "fraction of each task's entries kept by the trim step (the paper's k = 20 %; MergeKit's density)"))
    scope: Literal["tensor", "global"] = Field("tensor", description=(
        "tensor: trim each tensor on its own (MergeKit); global: one model-wide magnitude threshold per task "
        "(the paper's code and FusionBench; two extra streaming passes over the models)"))
    boundary: Boundary = Field("round", description=(
        "how many of N entries the trim keeps: round = round(keep·N), the paper's k %; floor = max(1, ⌊keep·N⌋), "
        "MergeKit's sparsify; floor_plus_one = ⌊keep·N⌋ + 1, the official code's kthvalue, FusionBench's"))
    disjoint: Literal["mean", "sum"] = Field("mean", description=(
        "step 3: mean of the entries agreeing with the elected sign (the paper; with per-model weights divided "
        "by the agreeing weights' sum, MergeKit's normalize: true) or their sum (dis-sum; FusionBench's "
        "merge_func: sum, MergeKit's normalize: false)"))


@dataclass(frozen=True)
class TiesGlobalState:
    """The finalized global trim: per-task threshold and, per tensor, how many threshold ties to keep.

    ``threshold`` is ``None`` when every entry is kept.
    """

    threshold: torch.Tensor | None
    quota: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _ThresholdBuckets(AnotherPass):
    """After the first statistics pass: per task, the bucket (16 leading bits of the magnitude) holding the
    model-wide k-th largest magnitude, and how many entries lie in higher buckets."""

    k: int
    bucket: torch.Tensor  # (T,) int64
    larger: torch.Tensor  # (T,) int64


class TiesGlobalThreshold:
    """Exact model-wide top-k magnitude threshold per task (TIES as in the paper's flattened-model code),
    in two streaming statistics passes whose summaries are small, whatever the model size.

    Pass 1 counts, per task, the entries of every tensor per bucket of the magnitude's 16 leading bits (a
    few thousand non-empty buckets); ``finalize`` finds the bucket holding the k-th largest magnitude with
    ``k = keep_count(P, keep, boundary)``. Pass 2 counts the distinct magnitudes in that bucket only (about 1/128 of a
    binade; in float32 at most 2^16 distinct values), and ``finalize`` reads the exact k-th largest off
    those counts. Entries equal to the threshold are allotted, up to k in total, in sorted tensor-name
    order and then flat-index order, so that exactly k entries per task survive model-wide. Memory: one
    task's magnitudes at a time plus two histograms, instead of T × P magnitudes (17.6 GB for a
    1.1B-parameter model and 4 tasks). Magnitudes are bucketed in the compute dtype (float32 or float64;
    other dtypes as float32, exactly).
    """

    wants_context = True

    def __init__(self) -> None:
        self._buckets: _ThresholdBuckets | None = None

    def collect(self, name: str, deltas: torch.Tensor, options: TiesOptions,
                ctx: LayerContext | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = ctx.state if ctx is not None else None
        out = []
        for task in deltas.reshape(deltas.shape[0], -1):  # one task's magnitudes in memory at a time
            row = task.abs() if task.dtype in _BITS_VIEW else task.float().abs()
            if isinstance(state, _ThresholdBuckets):  # pass 2: the distinct magnitudes in the threshold's bucket
                values, counts = torch.unique(_in_bucket(row, int(state.bucket[len(out)])), return_counts=True)
                out.append((values.cpu(), counts.cpu()))
                continue
            total = _bucket_counts(row)  # pass 1: the non-empty buckets and their counts
            nonempty = total.nonzero().squeeze(1)
            out.append((nonempty.cpu(), total[nonempty].cpu()))
        return out

    def finalize(self, collected: Mapping[str, Any], options: TiesOptions) -> TiesGlobalState | _ThresholdBuckets:
        names = sorted(collected)
        if self._buckets is None:
            return self._first(collected, names, options)
        state, self._buckets = self._buckets, None
        thresholds, remaining = [], []
        for t in range(state.bucket.numel()):
            values, inverse = torch.unique(torch.cat([collected[n][t][0] for n in names]), return_inverse=True)
            counts = torch.zeros(values.numel(), dtype=torch.int64).index_add_(
                0, inverse, torch.cat([collected[n][t][1] for n in names]))
            at_or_above = state.larger[t] + counts.flip(0).cumsum(0).flip(0)  # entries ≥ values[i], model-wide
            i = int(torch.nonzero(at_or_above >= state.k).max())  # the largest value with ≥ k entries at or above it
            thresholds.append(values[i])
            remaining.append(state.k - (at_or_above[i] - counts[i]))  # how many entries equal to it survive
        thr, left = torch.stack(thresholds), torch.stack(remaining)
        quota: dict[str, torch.Tensor] = {}
        for n in names:
            ties = torch.stack([c[v == x].sum() for (v, c), x in zip(collected[n], thr)])
            q = torch.minimum(ties, left)
            left = left - q
            quota[n] = q
        return TiesGlobalState(threshold=thr, quota=quota)

    def _first(self, collected: Mapping[str, Any], names: list[str],
               options: TiesOptions) -> TiesGlobalState | _ThresholdBuckets:
        if not names:
            return TiesGlobalState(threshold=None)
        tasks = len(collected[names[0]])
        counts = torch.zeros(tasks, 1 << 16, dtype=torch.int64)
        for n in names:
            for t, (idx, cnt) in enumerate(collected[n]):
                counts[t].index_add_(0, idx, cnt)
        total = int(counts[0].sum())
        k = keep_count(total, options.keep, options.boundary)
        if k >= total:
            return TiesGlobalState(threshold=None)
        bucket, larger = zip(*(_bucket_of_kth(row, k) for row in counts))
        self._buckets = _ThresholdBuckets(k=k, bucket=torch.tensor(bucket), larger=torch.tensor(larger))
        return self._buckets


def ties_global_mask(deltas: torch.Tensor, state: TiesGlobalState, name: str) -> torch.Tensor | None:
    """The entries of tensor ``name``'s updates (T, *shape) that the model-wide trim keeps (bool), or ``None``
    when every entry is kept: per task, those above the threshold plus the tensor's quota of those equal to
    it (lowest flat index first). Task by task: the extra memory is one task's magnitudes and the mask."""
    if state.threshold is None:
        return None
    if name not in state.quota:
        raise RuntimeError(f"ties (scope=global): tensor {name!r} was not seen by the statistics pass")
    flat = deltas.reshape(deltas.shape[0], -1)
    thr = state.threshold.to(device=deltas.device, dtype=deltas.dtype)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=deltas.device)
    for i, quota in enumerate(state.quota[name].tolist()):
        mag = flat[i].abs()
        mask[i] = _top_mask(mag, thr[i], int((mag > thr[i]).sum()) + quota)
    return mask.reshape(deltas.shape)


def _global_trim(deltas: torch.Tensor, state: TiesGlobalState, name: str) -> torch.Tensor:
    mask = ties_global_mask(deltas, state, name)
    return deltas if mask is None else torch.where(mask, deltas, 0)


def _ties_statistic(options: TiesOptions) -> TiesGlobalThreshold | None:
    return TiesGlobalThreshold() if options.scope == "global" else None


@register_method(
    "ties",
    options=TiesOptions,
    paper="Yadav et al., NeurIPS 2023 (TIES-Merging), Algorithm 1: trim top-k %, elect γ = sgn(Σ τ̂_t), disjoint mean",
    summary="trim small entries, elect a sign per entry by mass, average the agreeing entries",
    default_lambda=1.0,
    global_statistic=_ties_statistic,
)
def ties(deltas: torch.Tensor, options: TiesOptions, ctx: LayerContext) -> torch.Tensor:
    """TIES-Merging of one tensor (per-tensor trim, or the model-wide threshold in ``ctx.state``)."""
    if options.scope == "global":
        if not isinstance(ctx.state, TiesGlobalState):
            raise RuntimeError("ties (scope=global) needs the statistics pass; ctx.state is missing")
        mask = ties_global_mask(deltas, ctx.state, ctx.name)  # the trimmed updates are never materialised
        return disjoint_merge(deltas, ties_elect_sign(deltas, mask), mask, options.disjoint, ctx.weights)
    return ties_merge(deltas, options.keep, options.boundary, options.disjoint, ctx.weights)
