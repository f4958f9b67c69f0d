"""The training loop shared by the data-based merging methods (AdaMerging, MDA-AM, MOMA).

Every data-based method learns a few things (merging coefficients, a mask, per-task matrices) by running
the *merged* encoder (:class:`~taskmerge.databased.encoder.FunctionalEncoder`) on unlabeled inputs of each
task. The pieces here:

* :class:`TensorInputs` / :class:`TokenInputs` — unlabeled inputs of one task (a tensor, or token id lists
  tokenised once and padded per batch); :class:`LabeledInputs` — inputs with labels (only MDA-AM's
  ``class_means="labels"`` variant uses labels).
* :class:`TaskSampler` — seeded, reshuffled-epoch mini-batches of indices (so cached teacher features can be
  looked up by index).
* :func:`run_loop` — the optimisation loop: one mini-batch of every task per step, an objective supplied
  by the method, Adam, a tqdm bar with the running loss, a :class:`History` (loss, its parts, seconds per
  step) and hooks around each step.
* :func:`tail_trend` — whether a loss curve was still falling at its end (the convergence flag every run reports).
* :class:`LoopOptions` — the options every data-based method shares (steps, batch size, seed, data fraction).

Reproducibility: :func:`run_loop` seeds torch's global generator and the samplers from ``seed``; the same
seed, inputs and options give the same result (on the same machine and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field

from taskmerge.registry import MethodOptions

__all__ = [
    "LoopOptions",
    "UnlabeledInputs",
    "TensorInputs",
    "TokenInputs",
    "LabeledInputs",
    "as_inputs",
    "LinearHead",
    "TaskSampler",
    "DataMergeResult",
    "History",
    "run_loop",
    "tail_trend",
    "moving_average",
    "subset_inputs",
    "entropy",
    "entropy_scales",
    "head_logits",
    "with_weight",
    "task_vectors",
    "count_parameters",
    "changed_names",
    "json_info",
    "parse_options_as",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ options


class LoopOptions(MethodOptions):
    """Options shared by every data-based method (each method's options class extends this one).

    The defaults are AdaMerging's schedule (Yang et al. 2024, §5: 500 iterations, batch 16 per task), which
    MDA-AM follows (MDA §5.1, App. G.1); MOMA overrides them (1000 steps, batch 24 for text). Each field's
    ``description`` is what ``taskmerge methods NAME`` prints.
    """

    steps: int = Field(500, ge=0, description="optimisation steps; each step sees one mini-batch of every task "
                       "(AdaMerging §5: 500)")
    batch_size: int = Field(16, ge=1, description="unlabeled inputs per task per step (AdaMerging §5: 16)")
    seed: int = Field(0, description="seeds torch and the mini-batch samplers (a run is reproducible given the seed)")
    data_fraction: float = Field(1.0, gt=0.0, le=1.0, description=(
        "fraction of each task's unlabeled inputs used: a seeded random subset (MOMA Table 5: 0.1 / 0.5 / 1)"))
    progress: bool = Field(True, description="show a tqdm bar with the running loss")
    feature_batch_size: int = Field(64, ge=1, description=(
        "batch size of the no-grad passes (teacher features, class means, pseudo-labels)"))


def parse_options_as(cls: type[LoopOptions], options: Any, method: str) -> Any:
    """Validate ``options`` (an instance of ``cls`` or a mapping of its fields); errors are
    :class:`taskmerge.errors.OptionError` naming the method and the option."""
    from pydantic import ValidationError

    from taskmerge.errors import OptionError

    if isinstance(options, cls):
        return options
    try:
        return cls(**dict(options or {}))
    except ValidationError as exc:
        problems = "; ".join(f"option {'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors())
        raise OptionError(f"method {method!r}: {problems}") from None


# ------------------------------------------------------------------------------------------------- inputs


@runtime_checkable
class UnlabeledInputs(Protocol):
    """The unlabeled inputs of one task: a length and a way to build a model batch from indices."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Any:
        """The model input for the examples at ``indices`` (what the encoder's feature function takes)."""


@dataclass(frozen=True)
class TensorInputs:
    """Inputs stored as one tensor whose first dimension indexes examples (e.g. images, toy vectors)."""

    data: torch.Tensor

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.data[torch.as_tensor(list(indices), dtype=torch.long)]


@dataclass(frozen=True)
class TokenInputs:
    """Tokenised texts (one list of token ids per example, unpadded), right-padded per batch.

    A batch is the keyword-argument dict of a BERT-style model: ``input_ids``, ``attention_mask``,
    ``token_type_ids``.
    """

    ids: Sequence[Sequence[int]]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        """Tokens per example (batches of similar lengths pad less)."""
        return [len(r) for r in self.ids]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[j, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], max_length: int = 48) -> TokenInputs:
        """Tokenise ``texts`` with a Hugging Face tokenizer (truncated to ``max_length``)."""
        ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
        return cls(ids=ids, pad_id=int(tokenizer.pad_token_id or 0))


@dataclass(frozen=True)
class _Subset:
    inner: UnlabeledInputs
    index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices: Sequence[int]) -> Any:
        return self.inner.batch([self.index[i] for i in indices])

    def lengths(self) -> list[int] | None:
        """The inner inputs' lengths of the kept examples (``None`` when the inner inputs report none)."""
        inner = self.inner.lengths() if hasattr(self.inner, "lengths") else None
        return None if inner is None else [inner[i] for i in self.index]


@dataclass(frozen=True)
class LabeledInputs:
    """Inputs of one task with their labels (MDA-AM's ``class_means="labels"`` variant; scoring diagnostics)."""

    inputs: UnlabeledInputs
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != int(self.labels.numel()):
            raise ValueError(f"{len(self.inputs)} inputs but {self.labels.numel()} labels")


def as_inputs(obj: Any) -> UnlabeledInputs:
    """Wrap a tensor as :class:`TensorInputs`; pass anything with ``__len__`` and ``batch`` through."""
    if isinstance(obj, torch.Tensor):
        return TensorInputs(obj)
    if isinstance(obj, UnlabeledInputs):
        return obj
    raise TypeError(f"unlabeled inputs must be a tensor or have __len__ and batch(indices); got {type(obj).__name__}")


def subset_inputs(inputs: UnlabeledInputs, fraction: float, seed: int) -> UnlabeledInputs:
    """A seeded random subset of ``⌈fraction·N⌉`` examples (``inputs`` itself when ``fraction >= 1``)."""
    if fraction >= 1.0:
        return inputs
    n = len(inputs)
    keep = max(1, math.ceil(fraction * n))
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=gen)[:keep].sort().values.tolist()
    return _Subset(inputs, tuple(index))


class TaskSampler:
    """Mini-batches of example indices over reshuffled epochs, from a seeded generator (every batch full)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("a task needs at least one unlabeled input")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.gen = torch.Generator().manual_seed(seed)
        self._stream: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        while len(self._stream) < self.batch_size:
            self._stream.extend(torch.randperm(self.n, generator=self.gen).tolist())
        out, self._stream = self._stream[: self.batch_size], self._stream[self.batch_size:]
        return out


# ------------------------------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class LinearHead:
    """A task's linear classifier on the encoder's features: ``logits = features @ weight.T + bias``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def head_logits(head: Any, features: torch.Tensor) -> torch.Tensor:
    """Logits of any head with ``weight`` (C × d) and optional ``bias`` (C,) on features (B × d)."""
    out = features @ head.weight.to(features.dtype).T
    bias = getattr(head, "bias", None)
    return out if bias is None else out + bias.to(features.dtype)


def with_weight(head: Any, weight: torch.Tensor) -> Any:
    """A copy of ``head`` with a new weight matrix (same class when it is a dataclass, e.g. the benchmark's
    ``Head``, so labels and flags are kept); bias unchanged."""
    if weight.shape != head.weight.shape:
        raise ValueError(f"new head weight has shape {tuple(weight.shape)}, expected {tuple(head.weight.shape)}")
    try:
        return replace(head, weight=weight.to(head.weight.dtype).contiguous())
    except TypeError:
        return LinearHead(weight.to(head.weight.dtype).contiguous(), getattr(head, "bias", None))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` per row (nats)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_scales(heads: Sequence[Any], mode: str = "none") -> list[float]:
    """Per-task factors multiplying the logits inside an entropy objective.

    ``"none"``: 1 (the papers' objective). ``"head_norm"``: ``s / s_t`` with ``s_t`` the mean row norm of task
    t's head weight and ``s`` the geometric mean of the ``s_t`` — every task's logits get the same overall scale,
    as CLIP's zero-shot heads (one logit scale for all tasks) give the papers. A positive factor changes no
    prediction, only how confident (and so how much weight in a summed entropy) each task is; without it,
    heads trained with different regularisation (the benchmark's linear probes) make the tasks with large
    heads dominate the entropy and pull the coefficients their way.
    """
    if mode == "none":
        return [1.0] * len(heads)
    if mode != "head_norm":
        raise ValueError(f"unknown entropy scaling {mode!r}")
    norms = [float(h.weight.detach().float().norm(dim=1).mean()) for h in heads]
    geo = math.exp(sum(math.log(max(n, 1e-12)) for n in norms) / len(norms))
    return [geo / max(n, 1e-12) for n in norms]


def task_vectors(base_sd: Mapping[str, torch.Tensor], task_sds: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: stack_t(θ_t − θ₀)}`` (T × shape, float32) for floating tensors whose update is not all zero."""
    out: dict[str, torch.Tensor] = {}
    for name in names if names is not None else base_sd.keys():
        base = base_sd[name]
        if not base.is_floating_point():
            continue
        stack = torch.stack([sd[name].float() - base.float() for sd in task_sds])
        if bool((stack != 0).any()):
            out[name] = stack
    return out


def changed_names(base_sd: Mapping[str, torch.Tensor], task_sds: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Floating tensors that at least one fine-tuned model changed (what a teacher's parameter dict must hold)."""
    return [n for n, v in base_sd.items() if v.is_floating_point() and any(not torch.equal(sd[n], v) for sd in task_sds)]


def json_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of a result's ``info`` (tensors, heads and the per-tensor λ table, which
    the summaries replace, left out)."""
    out = {}
    for key, value in info.items():
        if key == "lambdas":
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def count_parameters(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Total number of entries of the floating tensors of a state dict."""
    return sum(v.numel() for v in state_dict.values() if v.is_floating_point())


# -------------------------------------------------------------------------------------------------- loop


def moving_average(values: Sequence[float], window: int = 10) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def tail_trend(loss: Sequence[float], fraction: float = 0.1, z: float = 2.0) -> dict[str, Any]:
    """Whether a loss curve was still falling over its last ``fraction`` of steps (the convergence flag).

    Definition: a least-squares line through the last ``n = max(5, ⌈fraction · steps⌉)`` per-step losses
    gives the slope ``b`` (loss per step) and its standard error ``se(b) = s / sqrt(Σ (i − ī)²)``, with ``s``
    the residual standard deviation (n − 2 degrees of freedom): the mini-batch noise around the line. The run
    was **still falling** when ``b < −z · se(b)`` (``z = 2``: a fall the noise alone makes in about 2.5 % of
    flat windows). Reported with it: ``tail_change = b · (n − 1)``, the fitted change across the window, and
    ``total_change``, the mean of the window minus the mean of the first ``n`` steps (to read the tail's
    change against what the whole run moved). Curves shorter than 10 steps get ``still_falling = None``.
    """
    steps = len(loss)
    n = max(5, math.ceil(fraction * steps))
    out: dict[str, Any] = {"window": n, "slope": None, "slope_se": None, "tail_change": None,
                           "total_change": None, "still_falling": None}
    if steps < 10:
        return out
    y = torch.tensor(list(loss[-n:]), dtype=torch.float64)
    x = torch.arange(n, dtype=torch.float64)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    s = math.sqrt(float((resid * resid).sum()) / (n - 2))
    se = s / math.sqrt(float((xc * xc).sum()))
    out.update(slope=slope, slope_se=se, tail_change=slope * (n - 1),
               total_change=float(y.mean()) - sum(loss[:n]) / n, still_falling=bool(slope < -z * se))
    return out


@dataclass
class History:
    """What a run recorded: per-step loss, its parts and wall seconds, the total seconds, and extra info."""

    loss: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, loss: float, parts: Mapping[str, float], seconds: float = 0.0) -> None:
        self.loss.append(loss)
        self.step_seconds.append(float(seconds))
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(float(v))

    def convergence(self) -> dict[str, Any]:
        """:func:`tail_trend` of the loss."""
        return tail_trend(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "parts": self.parts, "step_seconds": self.step_seconds, "seconds": self.seconds,
                "convergence": self.convergence(), **self.extra}

    def smoothed(self, window: int = 10) -> list[float]:
        """Moving average of the loss (for a compact loss curve)."""
        return moving_average(self.loss, window)


@dataclass
class DataMergeResult:
    """The output of a data-based merge.

    Unpacks as ``encoder_sd, heads = result``: ``state_dict`` is the deployed encoder (every key of the base
    state dict, base shapes and dtypes, so it loads into the base architecture) and ``heads`` one head per
    task (the input heads, or new ones with learned matrices absorbed). ``history`` holds the loss curve,
    ``info`` the learned quantities and diagnostics (coefficients, masking rate, …).
    """

    state_dict: dict[str, torch.Tensor]
    heads: list[Any]
    history: History
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.state_dict, self.heads))


Objective = Callable[[int, list[Any], list[list[int]]], tuple[torch.Tensor, Mapping[str, float]]]


def run_loop(
    objective: Objective,
    param_groups: Sequence[Mapping[str, Any]],
    inputs: Sequence[UnlabeledInputs],
    options: LoopOptions,
    *,
    desc: str = "data-based merge",
    after_step: Callable[[int], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> History:
    """Minimise ``objective`` for ``options.steps`` steps.

    Each step draws one mini-batch of indices per task (seeded :class:`TaskSampler`), builds the batches
    and calls ``objective(step, batches, indices) -> (loss, parts)``; then backward, an optimizer step
    (Adam over ``param_groups``; the fused kernel for CPU / CUDA tensors: one pass over e.g. MOMA's mask
    instead of several) and ``after_step(step)`` (e.g.
    clamping). ``before_step(step)`` runs first (e.g. refreshing a Procrustes target). The bar shows the
    running loss (moving average over 10 steps); :class:`History` records every step's loss and wall seconds.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(options.seed)
    samplers = [TaskSampler(len(x), options.batch_size, options.seed * 1009 + 17 * t + 1) for t, x in enumerate(inputs)]
    groups = [dict(g) for g in param_groups if list(g["params"])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    opt = torch.optim.Adam(groups, fused=fused or None) if groups else None
    history = History()
    start = time.perf_counter()
    bar = tqdm(range(options.steps), desc=desc, disable=not options.progress, leave=False, dynamic_ncols=True)
    for step in bar:
        tick = time.perf_counter()
        if before_step is not None:
            before_step(step)
        indices = [next(s) for s in samplers]
        batches = [x.batch(idx) for x, idx in zip(inputs, indices)]
        loss, parts = objective(step, batches, indices)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if after_step is not None:
            after_step(step)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower the learning rate")
        history.record(value, parts, time.perf_counter() - tick)
        recent = history.loss[-10:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if (step + 1) % 25 == 0 or step == options.steps - 1:
            logger.info("%s step %d/%d loss %.5f %s", desc, step + 1, options.steps, sum(recent) / len(recent),
                        " ".join(f"{k}={v:.4f}" for k, v in parts.items()))
    bar.close()
    history.seconds = time.perf_counter() - start
    return history
