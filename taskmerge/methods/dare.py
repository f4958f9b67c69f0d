"""DARE: drop and rescale task updates, then combine them.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, the drop-and-rescale equations: with drop rate p, m_t ~ Bernoulli(p) entry-wise,
δ̃_t = (1 − m_t) ⊙ δ_t and δ̂_t = δ̃_t / (1 − p), so that E[δ̂_t] = δ_t. The rescaled updates are then
merged by an existing rule: task arithmetic (the paper's default) or TIES-Merging ("DARE + TIES").

Randomness comes from ``ctx.generator()``, seeded from the run seed and the tensor name, so a merge
is reproducible and independent of the order in which tensors are processed. The draws are made on the
CPU and moved to the updates' device, so a ``device="cuda"`` merge drops the same entries as a CPU one
(CUDA's generator would give another, equally valid, draw).

Choices:

* ``combine="ties"`` applies TIES's sign election and disjoint mean to the dropped-and-rescaled updates,
  with TIES's own magnitude trim set by ``ties_keep`` (default 1.0 = no further trimming: DARE already
  keeps only 1 − p of the entries, as in MergeKit's ``dare_ties``; FusionBench's DARE-TIES trims again with
  ``ties_keep=0.2``).
* λ defaults to 0.3, task arithmetic's (the default combination); the sweep grid is task arithmetic's
  0.05–1.0 extended by 1.1–3.0 so that it also covers the TIES combination's range.
* **MergeKit's conventions** (``dare_linear`` / ``dare_ties``), as options: ``rescale_to="l1"`` rescales each
  dropped update to its L1 norm before the drop (MergeKit's ``rescale``, ``sparsify.rescaled_masked_tensor``)
  instead of by ``1/(1 − p)``; ``rng="mergekit"`` draws the masks as ``mergekit-yaml --random-seed S`` does:
  one generator seeded with ``S`` (``torch.manual_seed``), ``torch.bernoulli`` masks of keep-probability
  ``1 − p`` (float32), tensor by tensor in sorted name order (MergeKit's schedule), task by task. A statistics
  pass (:class:`MergekitStream`) records each tensor's generator state, so the merge itself still runs in any
  order. Same seed, same merged tensors and float32 inputs: the same masks as MergeKit. ``ties_disjoint="sum"``
  is MergeKit's ``dare_ties`` (``normalize: false``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from taskmerge.methods.task_arithmetic import TA_LAMBDA_GRID
from taskmerge.methods.ties import disjoint_merge, ties_elect_sign, ties_trim
from taskmerge.registry import LayerContext, MethodOptions, register_method

__all__ = ["DareOptions", "MergekitStream", "MergekitStreamState", "dare_drop", "dare_sum", "dare"]

Rng = Literal["tensor", "mergekit"]
RescaleTo = Literal["expectation", "l1"]
_L1_EPS = 1e-7  # MergeKit's rescaled_masked_tensor: below this norm (before or after) the update is not rescaled
_DRAW_CHUNK = 1 << 22  # entries per torch.bernoulli call when advancing MergeKit's stream


def _kept(shape: torch.Size, p: float, generator: torch.Generator | None, rng: Rng, dtype: torch.dtype) -> torch.Tensor:
    """One task's keep mask (bool, on the generator's device): ``P(kept) = 1 − p``."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    if rng == "mergekit":  # MergeKit's sparsify.bernoulli: float32 keep probabilities on the CPU
        return torch.bernoulli(torch.full(shape, 1.0 - p, dtype=torch.float32, device=draw_on), generator=generator).bool()
    return torch.rand(shape, generator=generator, device=draw_on, dtype=dtype) >= p


def _dropped_rows(deltas: torch.Tensor, p: float, generator: torch.Generator | None, rescale: bool,
                  rng: Rng = "tensor", rescale_to: RescaleTo = "expectation") -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(t, δ̂_t)`` task by task: one task's random draw in memory at a time."""
    scale = 1.0 / (1.0 - p) if rescale and rescale_to == "expectation" else 1.0
    for t, d in enumerate(deltas):
        kept = _kept(d.shape, p, generator, rng, d.dtype).to(d.device)
        if rescale and rescale_to == "l1":
            dropped = torch.where(kept, d, 0)
            before, after = d.abs().sum(), dropped.abs().sum()
            yield t, dropped if before < _L1_EPS or after < _L1_EPS else dropped * (before / after)
        else:
            yield t, torch.where(kept, d * scale if scale != 1.0 else d, 0)


def dare_drop(deltas: torch.Tensor, p: float, generator: torch.Generator | None = None,
              rescale: bool = True, rng: Rng = "tensor", rescale_to: RescaleTo = "expectation") -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors (DARE): by ``1 / (1 − p)`` (``rescale_to=
    "expectation"``, the paper) or to the update's L1 norm before the drop (``"l1"``, MergeKit).

    The tasks are drawn one after the other from ``generator``, on its device (default: the CPU), and the
    draws are moved to ``deltas``' device; ``rng`` picks the draw (see the module docstring).
    ``p = 0`` returns the input unchanged.
    """
    _check_rate(p)
    if p == 0.0:
        return deltas
    out = torch.empty_like(deltas)
    for t, row in _dropped_rows(deltas, p, generator, rescale, rng, rescale_to):
        out[t] = row
    return out


def dare_sum(deltas: torch.Tensor, p: float, generator: torch.Generator | None = None,
             rescale: bool = True, rng: Rng = "tensor", rescale_to: RescaleTo = "expectation") -> torch.Tensor:
    """``Σ_t δ̂_t``: the sum of :func:`dare_drop`'s output (same draws), without holding all T dropped updates."""
    _check_rate(p)
    if p == 0.0:
        return deltas.sum(dim=0)
    total = torch.zeros_like(deltas[0])
    for _, row in _dropped_rows(deltas, p, generator, rescale, rng, rescale_to):
        total += row
    return total


def _check_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dare_drop: the drop rate p must be in [0, 1), got {p}")


class DareOptions(MethodOptions):
    """Options of ``dare`` (see the module docstring)."""

    p: float = Field(0.9, ge=0.0, lt=1.0, description=(
        "drop rate: each entry of each task update is zeroed with probability p (the paper's 0.9; MergeKit's "
        "density is 1 − p)"))
    rescale: bool = Field(True, description="rescale the kept entries (the 'rescale' of DARE); false: a plain random drop")
    rescale_to: RescaleTo = Field("expectation", description=(
        "expectation: multiply the kept entries by 1/(1 − p), so that E[δ̂] = δ (the paper); l1: restore each "
        "task update's L1 norm before the drop (MergeKit's rescale)"))
    rng: Rng = Field("tensor", description=(
        "tensor: one generator per tensor, seeded from --seed and the tensor name (any order, any executor); "
        "mergekit: MergeKit's stream, one generator seeded with --seed, Bernoulli masks drawn tensor by tensor "
        "in sorted name order (the same drops as mergekit-yaml --random-seed; one extra pass over the models)"))
    combine: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description=(
        "how the dropped updates are merged: task_arithmetic (their sum; MergeKit's dare_linear) or ties "
        "(sign election and disjoint merge; MergeKit's dare_ties)"))
    ties_keep: float = Field(1.0, gt=0.0, le=1.0, description=(
        "with combine=ties: TIES's magnitude trim after the drop (1.0 = none, as MergeKit's dare_ties; "
        "FusionBench's DARE-TIES uses 0.2)"))
    ties_disjoint: Literal["mean", "sum"] = Field("mean", description=(
        "with combine=ties: mean of the agreeing entries (TIES) or their sum (MergeKit's dare_ties, normalize: "
        "false)"))


@dataclass(frozen=True)
class MergekitStreamState:
    """The generator state at the start of every tensor's draws (``rng="mergekit"``)."""

    states: Mapping[str, torch.Tensor]


class MergekitStream:
    """The statistics pass of ``rng="mergekit"``: replays MergeKit's random stream to find where each tensor's
    draws start. ``collect`` records the tensor's shape and task count; ``finalize`` seeds one generator with
    the run's seed and, in sorted name order, saves its state and advances it by the tensor's T Bernoulli
    draws (in chunks: memory of one chunk). The RNG cost of the model is paid twice, no tensor is held."""

    wants_context = True

    def collect(self, name: str, deltas: torch.Tensor, options: DareOptions, ctx: LayerContext) -> tuple[Any, ...]:
        return deltas.shape[0], deltas[0].numel(), ctx.run_seed

    def finalize(self, collected: Mapping[str, Any], options: DareOptions) -> MergekitStreamState:
        seeds = {seed for _, _, seed in collected.values()}
        generator = torch.Generator()
        generator.manual_seed(seeds.pop() if seeds else 0)
        states: dict[str, torch.Tensor] = {}
        for name in sorted(collected):
            states[name] = generator.get_state()
            tasks, numel, _ = collected[name]
            if options.p == 0.0:
                continue  # MergeKit draws nothing at density 1
            for _ in range(tasks):
                for start in range(0, numel, _DRAW_CHUNK):
                    n = min(_DRAW_CHUNK, numel - start)
                    torch.bernoulli(torch.full((n,), 1.0 - options.p, dtype=torch.float32), generator=generator)
        return MergekitStreamState(states)


def _stream_statistic(options: DareOptions) -> MergekitStream | None:
    return MergekitStream() if options.rng == "mergekit" else None


def _generator(options: DareOptions, ctx: LayerContext) -> torch.Generator:
    """The tensor's generator, on the CPU whatever the device (same draws on a GPU)."""
    if options.rng == "tensor":
        return ctx.generator()
    if not isinstance(ctx.state, MergekitStreamState) or ctx.name not in ctx.state.states:
        raise RuntimeError(f"dare (rng=mergekit): tensor {ctx.name!r} was not seen by the statistics pass")
    generator = torch.Generator()
    generator.set_state(ctx.state.states[ctx.name])
    return generator


@register_method(
    "dare",
    options=DareOptions,
    paper="Yu et al., ICML 2024 (Language Models are Super Mario): drop with prob. p, rescale by 1/(1−p)",
    summary="randomly drop a fraction p of each update, rescale the rest, then task arithmetic or TIES",
    default_lambda=0.3,
    lambda_grid=TA_LAMBDA_GRID + tuple(round(1.0 + 0.1 * i, 1) for i in range(1, 21)),
    global_statistic=_stream_statistic,
)
def dare(deltas: torch.Tensor, options: DareOptions, ctx: LayerContext) -> torch.Tensor:
    """DARE on one tensor: drop-and-rescale every task update, then combine."""
    generator = _generator(options, ctx)
    draw = {"rng": options.rng, "rescale_to": options.rescale_to}
    if options.combine == "task_arithmetic":
        return dare_sum(deltas, options.p, generator, options.rescale, **draw)
    dropped = dare_drop(deltas, options.p, generator, options.rescale, **draw)
    trimmed = ties_trim(dropped, options.ties_keep)
    return disjoint_merge(trimmed, ties_elect_sign(trimmed), None, options.ties_disjoint, ctx.weights)
