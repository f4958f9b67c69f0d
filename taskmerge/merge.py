"""The merge engine: stream tensors from a base and T fine-tuned models through a registered method.

For every tensor name the engine reads the base tensor and the T fine-tuned tensors, forms the task
updates ``Δ_t = θ_t − θ₀`` in the compute dtype (float32 by default, whatever the stored dtype),
checks them, calls the method's per-layer function (or averages, for tensors a ``matrix_only`` method
does not treat), and hands back the merged update. Only one tensor name is resident at a time, so a
merge never holds T whole models in memory. Methods with a model-level statistic get a first
statistics pass over all tensors.

Entry points: :func:`merged_task_vector` / :func:`apply_task_vector` for in-memory state dicts (the
benchmark's λ sweeps), :func:`merge_checkpoints` for files and folders (the CLI), and
:func:`merge_to_lora` for a merge written as a PEFT LoRA adapter (:mod:`taskmerge.io.lora_export`).

What is written is checked, not only the task updates: λ must be finite, and every output tensor
(``θ₀ + λ·τ`` after the cast to the output dtype) must be finite, else the merge fails naming the tensor
and leaves no output (an overflow such as ``λ = 1e30`` with float16 output). NaN / Inf in an input is
blamed on the file that holds it: the base model's file when the base tensor is not finite.

:func:`merge_checkpoints` streams end to end: safetensors inputs are read tensor by tensor with
``pread`` (:mod:`taskmerge.io.streaming`; no memory map keeps read pages resident), the output's shards
are planned up front and each merged tensor is written to its place in its shard at once
(:class:`~taskmerge.io.writers.CheckpointWriter`), so memory holds only the tensors being merged: about
T + 2 copies of the largest tensor per worker, plus the method's temporaries. Completed shards are
journaled in ``<output>.partial`` and an interrupted merge resumes from them (``resume=True``). The
per-tensor work (:class:`TensorMerger`) runs on an executor (:mod:`taskmerge.executors`): serial, a
thread pool across tensors, or Ray; results are consumed in order, so the output bytes do not depend
on it (see the executors' note on SVDs and intra-op threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from taskmerge.errors import CheckpointError, OptionError, option_hint
from taskmerge.executors import Executor, SerialExecutor, make_executor
from taskmerge.io.lora_export import LoraAdapterWriter, LoraExportReport
from taskmerge.io.readers import DictSource, TensorSource, open_checkpoint
from taskmerge.io.streaming import streaming_source
from taskmerge.io.writers import DEFAULT_SHARD_BYTES, CheckpointWriter
from taskmerge.linalg import LowRank
from taskmerge.linear_stream import stream_linear
from taskmerge.model_card import model_card, output_files
from taskmerge.registry import AnotherPass, LayerContext, MethodOptions, MethodSpec, get_method
from taskmerge.selection import TensorClass, TensorPolicy
from taskmerge.workspace import StackPool

__all__ = ["MergeRequest", "TensorMerger", "iter_merged", "merged_task_vector", "apply_task_vector", "merge_checkpoints",
           "merge_to_lora", "input_identity"]

logger = logging.getLogger(__name__)

_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MergeRequest:
    """A resolved merge: the method, its validated options and how tensors are treated.

    ``weights`` (one per fine-tuned model, ``None``: all 1) multiply each task update before the method sees
    it (MergeKit's ``parameters.weight``; the method also gets them as ``LayerContext.weights``).
    ``cast_inputs`` accepts fine-tuned tensors stored in another floating dtype than the base's (every tensor
    is read in the compute dtype anyway).
    """

    spec: MethodSpec
    options: MethodOptions
    policy: TensorPolicy = TensorPolicy()
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0
    weights: tuple[float, ...] | None = None
    cast_inputs: bool = False

    @classmethod
    def build(
        cls,
        method: str,
        options: Mapping[str, Any] | MethodOptions | None = None,
        *,
        policy: TensorPolicy | None = None,
        compute_dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        weights: Sequence[float] | None = None,
        cast_inputs: bool = False,
    ) -> MergeRequest:
        """Validate a method name, its options, the compute dtype, the device and the weights."""
        spec = get_method(method)
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if not all(math.isfinite(w) for w in weights):
                raise OptionError(f"option weights: every weight must be a finite number, got {list(weights)}")
        if isinstance(compute_dtype, str):
            if compute_dtype not in _COMPUTE_DTYPES:
                raise OptionError(f"option compute_dtype: expected one of {sorted(_COMPUTE_DTYPES)}, got {compute_dtype!r}")
            compute_dtype = _COMPUTE_DTYPES[compute_dtype]
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise OptionError(f"option device: invalid device {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("option device: 'cuda' requested but no CUDA device is available")
        return cls(spec, spec.parse(options), policy or TensorPolicy(), compute_dtype, dev, seed, weights, cast_inputs)


def _check_sources(base: TensorSource, tasks: Sequence[TensorSource], cast_inputs: bool = False) -> list[str]:
    """Check names, shapes and dtypes (floating dtypes may differ with ``cast_inputs``) before any work;
    returns the base's tensor names."""
    if not tasks:
        raise OptionError("a merge needs at least one fine-tuned model")
    names = base.keys()
    for src in tasks:
        have = set(src.keys())
        for name in names:
            if name not in have:
                raise CheckpointError(f"{src.label}: tensor {name!r} of the base model is missing")
            b_shape, b_dtype = base.meta(name)
            t_shape, t_dtype = src.meta(name)
            if t_shape != b_shape:
                raise CheckpointError(
                    f"{src.location(name)}: tensor {name!r} has shape {list(t_shape)}, base has {list(b_shape)}"
                )
            if t_dtype != b_dtype and not (cast_inputs and t_dtype.is_floating_point and b_dtype.is_floating_point):
                raise CheckpointError(
                    f"{src.location(name)}: tensor {name!r} has dtype {t_dtype}, base has {b_dtype}"
                    + (f" (pass {option_hint('cast_inputs')} to read both in the compute dtype)"
                       if t_dtype.is_floating_point and b_dtype.is_floating_point else "")
                )
        extra = have.difference(names)
        if extra:
            logger.warning("%s: %d tensor(s) not in the base model are ignored, e.g. %s", src.label, len(extra), min(extra))
    return names


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``: its min and max are finite (NaN propagates through both). One pass, no
    temporary: far faster than ``isfinite(t).all()``, which builds a boolean tensor."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _task_updates(name: str, base: torch.Tensor, tasks: Sequence[TensorSource], req: MergeRequest,
                  pool: StackPool | None = None, base_location: str = "base model") -> torch.Tensor:
    """Stack ``Δ_t = θ_t − θ₀`` for one tensor, in the compute dtype, checking for NaN / Inf.

    With ``pool`` the stack is one of its buffers (the caller gives it back once merged). A non-finite
    update is blamed on ``base_location`` (the base's file) when θ₀ itself is not finite, else on the
    fine-tuned model's file.

    A source that knows its update exactly (a PEFT adapter: ``task_update(name, dtype)`` returns
    ``scale·B A``) supplies it directly instead of the rounded difference ``θ_t − θ₀``. Memory: the
    ``T`` updates, θ₀ in the compute dtype and one task's tensor as stored (converted in place).
    """
    b = base.to(device=req.device, dtype=req.compute_dtype)
    shape = (len(tasks), *b.shape)
    deltas = (pool.take(shape, req.compute_dtype, req.device) if pool is not None
              else torch.empty(shape, dtype=req.compute_dtype, device=req.device))
    for i, src in enumerate(tasks):
        exact = getattr(src, "task_update", None)
        if exact is not None:
            deltas[i] = exact(name, req.compute_dtype).to(device=req.device)
        else:
            deltas[i].copy_(src.get(name))  # the same values as .to(compute dtype), without a temporary
            deltas[i].sub_(b)
        if not _all_finite(deltas[i]):
            if not _all_finite(b):
                raise CheckpointError(f"{base_location}: tensor {name!r} of the base model contains NaN or Inf")
            raise CheckpointError(f"{src.location(name)}: task vector of tensor {name!r} contains NaN or Inf")
        if req.weights is not None and req.weights[i] != 1.0:
            deltas[i].mul_(req.weights[i])
    return deltas


def _task_factors(name: str, cls: TensorClass, tasks: Sequence[TensorSource]) -> tuple[LowRank, ...] | None:
    """Every task's update of a matrix in factored form (``LayerContext.factors``), or ``None``."""
    if cls is not TensorClass.MATRIX:
        return None
    factors = []
    for src in tasks:
        lowrank = getattr(src, "lowrank", None)
        f = lowrank(name) if lowrank is not None else None
        if f is None:
            return None
        factors.append(f)
    return tuple(factors)


def _layer_context(name: str, cls: TensorClass, req: MergeRequest, state: Any,
                   tasks: Sequence[TensorSource] = ()) -> LayerContext:
    return LayerContext(name=name, seed=LayerContext.tensor_seed(req.seed, name), state=state,
                        matrix=cls is TensorClass.MATRIX, factors=_task_factors(name, cls, tasks) if tasks else None,
                        weights=req.weights, run_seed=req.seed)


def _merge_one(name: str, cls: TensorClass, deltas: torch.Tensor, req: MergeRequest, state: Any,
               tasks: Sequence[TensorSource] = ()) -> torch.Tensor:
    if req.spec.matrix_only and cls is not TensorClass.MATRIX:
        return deltas.mean(dim=0)
    ctx = _layer_context(name, cls, req, state, tasks)
    merged = req.spec.fn(deltas, req.options, ctx)
    if merged.shape != deltas.shape[1:]:
        raise RuntimeError(f"method {req.spec.name!r} returned shape {tuple(merged.shape)} for tensor {name!r}")
    if not _all_finite(merged):
        raise OptionError(f"method {req.spec.name!r} produced NaN or Inf for tensor {name!r}; check its options")
    return merged


def _linear_divisor(req: MergeRequest, cls: TensorClass, tasks: Sequence[TensorSource]) -> float | None:
    """``d`` of a linear method's streaming route (``Σ_t w_t Δ_t / d``, :attr:`MethodSpec.linear`), or ``None``
    for the stacked route: a non-linear method or options, a tensor a ``matrix_only`` method averages, or a
    source that supplies its update exactly (a PEFT adapter's ``task_update``)."""
    spec = req.spec
    if spec.linear is None or (spec.matrix_only and cls is not TensorClass.MATRIX):
        return None
    if any(getattr(src, "task_update", None) is not None for src in tasks):
        return None
    return spec.linear(req.options, len(tasks))


class TensorMerger:
    """The engine's per-tensor work, as an executor runs it: one call per tensor name.

    ``update((name, cls))`` returns ``(θ₀, τ)`` (τ on the CPU in the compute dtype, ``None`` for a kept
    tensor), ``output((name, cls))`` the merged tensor as written (``θ₀ + λ·τ`` in the output dtype), and
    ``collect((name, cls))`` a model-level statistic's summary of the tensor. Each call reads the tensor
    from the base and the T models and frees everything but its result, so its peak is about T + 2
    copies of the tensor in the compute dtype plus the method's own temporaries.

    A merger built with ``paths`` pickles without its open readers and re-opens the checkpoints by path
    where it is unpickled (a Ray worker).
    """

    def __init__(self, base: TensorSource, tasks: Sequence[TensorSource], req: MergeRequest, *, state: Any = None,
                 lam: float = 1.0, out_dtype: torch.dtype | None = None,
                 paths: tuple[str, tuple[str, ...]] | None = None) -> None:
        self.base = base
        self.tasks = list(tasks)
        self.req = req
        self.state = state
        self.lam = lam
        self.out_dtype = out_dtype
        self.paths = paths
        self._stat: Any = None
        self._pool = StackPool()

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if self.paths is not None:
            d["base"], d["tasks"] = None, None
        d["_stat"] = None
        return d

    def _sources(self) -> tuple[TensorSource, Sequence[TensorSource]]:
        if self.base is None:
            assert self.paths is not None
            base = streaming_source(open_checkpoint(self.paths[0]))
            self.tasks = [streaming_source(open_checkpoint(m, base=base)) for m in self.paths[1]]
            self.base = base
        return self.base, self.tasks

    def update(self, item: tuple[str, TensorClass]) -> tuple[torch.Tensor, torch.Tensor | None]:
        name, cls = item
        base, tasks = self._sources()
        theta0 = base.get(name)
        if cls is TensorClass.KEEP:
            return theta0, None
        divisor = _linear_divisor(self.req, cls, tasks)
        if divisor is not None:  # one streaming pass, no stacked updates (taskmerge.linear_stream)
            return theta0, stream_linear(name, theta0, tasks, divisor=divisor, weights=self.req.weights,
                                         dtype=self.req.compute_dtype, device=self.req.device,
                                         base_location=base.location(name), method=self.req.spec.name).cpu()
        deltas = _task_updates(name, theta0, tasks, self.req, self._pool, base.location(name))
        try:
            merged = _merge_one(name, cls, deltas, self.req, self.state, tasks).cpu()
            if self._pool.holds(merged):  # a view of the stack, which the next tensor will overwrite
                merged = merged.clone()
        finally:
            self._pool.give_back(deltas)
        return theta0, merged

    def output(self, item: tuple[str, TensorClass]) -> torch.Tensor:
        """The tensor as written, checked to be finite (after λ and the cast to the output dtype)."""
        name = item[0]
        theta0, tau = self.update(item)
        merged = tau is not None
        value = _scaled(theta0, tau, self.lam)
        del tau
        if self.out_dtype is not None and value.dtype.is_floating_point:
            value = value.to(self.out_dtype)
        if not _all_finite(value):
            if not merged:
                raise CheckpointError(f"{self.base.location(name)}: tensor {name!r} of the base model (kept at the "
                                      "base value) contains NaN or Inf")
            raise OptionError(f"tensor {name!r}: the merged value θ₀ + λ·τ is not finite in {value.dtype} "
                              f"(λ = {self.lam!r}); check λ and the output dtype")
        return value

    def collect(self, item: tuple[str, TensorClass]) -> Any:
        name, cls = item
        base, tasks = self._sources()
        if self._stat is None:
            self._stat = self.req.spec.statistic_for(self.req.options)
        deltas = _task_updates(name, base.get(name), tasks, self.req, base_location=base.location(name))
        if getattr(self._stat, "wants_context", False):
            ctx = _layer_context(name, cls, self.req, self.state, tasks)  # state: the previous pass's, if any
            return self._stat.collect(name, deltas, self.req.options, ctx)
        return self._stat.collect(name, deltas, self.req.options)


def _statistic_pass(merger: TensorMerger, names: Sequence[str], classes: Mapping[str, TensorClass],
                    executor: Executor, progress: bool) -> Any:
    """The statistics pass(es) of a model-level method: every merged tensor's summary, then ``finalize``,
    again while ``finalize`` asks for another pass (:class:`taskmerge.registry.AnotherPass`)."""
    req = merger.req
    stat = req.spec.statistic_for(req.options)
    if stat is None:
        return None
    todo = [(n, classes[n]) for n in names if classes[n] is not TensorClass.KEEP
            and not (req.spec.matrix_only and classes[n] is not TensorClass.MATRIX)]
    merger.state = None
    while True:
        results = executor.map(merger.collect, todo, **_budget(merger.base, todo))
        collected = {name: r for (name, _), r in zip(todo, tqdm(results, total=len(todo),
                                                                desc=f"{req.spec.name}: statistics",
                                                                disable=not progress, unit="tensor"))}
        state = stat.finalize(collected, req.options)
        del collected
        if not isinstance(state, AnotherPass):
            return state
        merger.state = state


def _budget(base: TensorSource, items: Sequence[tuple[str, TensorClass]]) -> dict[str, Any]:
    """An executor's ``cost`` (a tensor's element count) and ``budget`` (the largest count) for ``items``:
    tensors run side by side only while their sizes add up to at most the largest one's."""
    sizes = {}
    for name, _ in items:
        n = 1
        for d in base.meta(name)[0]:
            n *= int(d)
        sizes[name] = n
    return {"cost": lambda item: sizes[item[0]], "budget": max(sizes.values(), default=0)}


def _prepare(base: TensorSource, tasks: Sequence[TensorSource], req: MergeRequest) -> tuple[list[str], dict[str, TensorClass]]:
    if req.weights is not None and len(req.weights) != len(tasks):
        raise OptionError(f"option weights: {len(req.weights)} weight(s) for {len(tasks)} fine-tuned model(s)")
    names = _check_sources(base, tasks, req.cast_inputs)
    classes = {n: req.policy.classify(n, *base.meta(n)) for n in names}
    _log_kept(names, classes, base, req.policy)
    if all(c is TensorClass.KEEP for c in classes.values()):
        raise OptionError("no tensor is selected for merging: check the include / exclude patterns")
    return names, classes


def _log_kept(names: Sequence[str], classes: Mapping[str, TensorClass], base: TensorSource,
              policy: TensorPolicy) -> None:
    """One INFO line: which tensors stay at the base value, grouped by why (:meth:`TensorPolicy.keep_reason`)."""
    why: dict[str, list[str]] = {}
    for n in names:
        if classes[n] is TensorClass.KEEP:
            why.setdefault(policy.keep_reason(n, *base.meta(n)) or "kept", []).append(n)
    if not why:
        logger.info("every tensor is merged (none kept at the base value)")
        return
    parts = [f"{len(v)} {reason} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})" for reason, v in why.items()]
    logger.info("kept at the base value: %s", "; ".join(parts))


def iter_merged(
    base: TensorSource, tasks: Sequence[TensorSource], req: MergeRequest, *, progress: bool = False,
    executor: Executor | None = None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(name, base_tensor, merged_update)`` for each base tensor, in the base's order.

    The update is ``None`` for tensors kept at the base value; otherwise a float tensor (compute dtype)
    on the CPU, before scaling by λ. ``executor`` (default: serial) runs the per-tensor merges, e.g. a
    :class:`taskmerge.executors.ThreadExecutor`; the results are the same whatever it is.
    """
    names, classes = _prepare(base, tasks, req)
    executor = executor or SerialExecutor()
    merger = TensorMerger(base, tasks, req)
    merger.state = _statistic_pass(merger, names, classes, executor, progress)
    items = [(n, classes[n]) for n in names]
    results = executor.map(merger.update, items, **_budget(base, items))
    for name, (theta0, tau) in zip(names, tqdm(results, total=len(items), desc=f"{req.spec.name}: merging",
                                               disable=not progress, unit="tensor")):
        yield name, theta0, tau


def merged_task_vector(
    base_sd: Mapping[str, torch.Tensor],
    task_sds: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    policy: TensorPolicy | None = None,
    compute_dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged update τ (before λ) of in-memory state dicts; tensors kept at the base are absent.

    ``workers > 1`` merges that many tensors at once on a thread pool (same result); ``weights`` multiply
    each task's update (:class:`MergeRequest`).
    """
    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed,
                             weights=weights)
    base = DictSource(base_sd, "base state dict")
    tasks = [DictSource(sd, f"task state dict {i}") for i, sd in enumerate(task_sds)]
    with contextlib.closing(make_executor("thread", workers)) as executor:
        return {name: tau for name, _, tau in iter_merged(base, tasks, req, progress=progress, executor=executor)
                if tau is not None}


def apply_task_vector(
    base_sd: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """``θ₀ + λ·τ`` per tensor, computed in float32 (float64 if τ is) and cast to the base dtype."""
    lam = _checked_lambda(lam)
    return {name: _scaled(base, tau.get(name), lam) for name, base in base_sd.items()}


def _checked_lambda(lam: float) -> float:
    """λ as a float, refused unless finite (NaN or ±Inf would make every merged tensor NaN / Inf)."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise OptionError(f"option lambda: expected a number, got {lam!r}") from None
    if not math.isfinite(value):
        raise OptionError(f"option lambda: must be a finite number, got {lam!r}")
    return value


def _scaled(theta0: torch.Tensor, tau: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``θ₀ + λ·τ`` in τ's dtype, cast back to θ₀'s dtype; θ₀ itself when τ is ``None``.

    Computed as ``(λ·τ) += θ₀`` (one temporary; the same values as ``θ₀.to(τ.dtype) + λ·τ``: the
    conversion is exact and the addition commutative).
    """
    if tau is None:
        return theta0
    out = torch.mul(tau, lam)
    other = theta0.to(out.device)
    if other.dtype.itemsize > out.dtype.itemsize:  # round θ₀ to τ's dtype first, as the formula does
        other = other.to(out.dtype)
    out.add_(other)
    return out.to(theta0.dtype)


_HEAD_BYTES = 1 << 20  # read whole: a safetensors header and the first tensors
_BLOCK_BYTES = 1 << 16
_BLOCKS = 64


def _file_identity(path: Path) -> list[Any]:
    """``[size, digest]``: the size and a SHA-256 of sampled content (the first MiB, 64 blocks of 64 KiB
    spread evenly over the file, and its last block; files up to 4 MiB whole). A ``touch`` or a copy
    keeps it; a re-trained model (every weight differs) changes it. ~5 MB read per file."""
    try:
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if size <= 4 * _HEAD_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(_HEAD_BYTES))
                step = (size - _HEAD_BYTES - _BLOCK_BYTES) // _BLOCKS
                for k in range(_BLOCKS + 1):
                    f.seek(_HEAD_BYTES + k * step if k < _BLOCKS else size - _BLOCK_BYTES)
                    h.update(f.read(_BLOCK_BYTES))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return [size, h.hexdigest()]


def input_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint for ``--resume``: its absolute path and every file's size and sampled
    content digest (:func:`_file_identity`; hidden files and folders such as ``.git`` are left out).
    Content, not modification times, so that a ``touch`` or a copy does not refuse a resume."""
    p = Path(path).resolve()
    if p.is_file():
        return {"path": str(p), "files": {p.name: _file_identity(p)}}
    files = {str(f.relative_to(p)): _file_identity(f) for f in sorted(p.rglob("*"))
             if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)}
    return {"path": str(p), "files": files}


def _contents(ident: dict[str, Any]) -> list[tuple[Any, ...]]:
    """An :func:`input_identity`'s files as sorted (size, digest) pairs: equal for copies of a model."""
    return sorted(tuple(v) for v in ident["files"].values())


def _check_inputs(base: dict[str, Any], models: Sequence[dict[str, Any]], output: str | Path) -> None:
    """Refuse an output that is (or holds) an input; warn about a merge of one model, a model given twice
    (same path or same contents) and the base given as a fine-tuned model. Arguments are
    :func:`input_identity` results."""
    out = Path(output).resolve()
    for which, ident in (("the base model", base), *((f"model {i + 1}", m) for i, m in enumerate(models))):
        if Path(ident["path"]) == out or Path(ident["path"]).is_relative_to(out):
            raise OptionError(f"{output}: the output is also an input ({which}, {ident['path']}); "
                              "write the merge somewhere else")
    if len(models) == 1:
        logger.warning("only one fine-tuned model (%s): nothing is combined, the output is its task vector "
                       "as the method treats it, scaled by λ", models[0]["path"])
    contents = [_contents(m) for m in models]
    for i, m in enumerate(models):
        if m["path"] == base["path"] or contents[i] == _contents(base):
            logger.warning("model %d (%s) is the base model (%s): its task vector is zero", i + 1, m["path"],
                           "same file" if m["path"] == base["path"] else "same contents")
        for j in range(i):
            if m["path"] == models[j]["path"] or contents[i] == contents[j]:
                logger.warning("models %d and %d are the same model (%s%s): it counts twice in the merge", j + 1,
                               i + 1, m["path"], "" if m["path"] == models[j]["path"] else f", {models[j]['path']}")


def _request_description(base: dict[str, Any], models: Sequence[dict[str, Any]], req: MergeRequest, lam: float,
                         output_dtype: str | None, max_shard_bytes: int) -> dict[str, Any]:
    """The merge request as recorded in the resume journal (its digest must match to resume)."""
    return {
        "format": 1,
        "method": req.spec.name,
        "options": req.options.model_dump(mode="json"),
        "lambda": repr(lam),
        "policy": {"include": req.policy.include, "exclude": list(req.policy.exclude),
                   "matrix_exclude": list(req.policy.matrix_exclude)},
        "compute_dtype": str(req.compute_dtype),
        "output_dtype": output_dtype,
        "seed": req.seed,
        "weights": None if req.weights is None else list(req.weights),
        "max_shard_bytes": max_shard_bytes,
        "base": base,
        "models": list(models),
    }


def merge_checkpoints(
    base: str | Path,
    models: Sequence[str | Path],
    output: str | Path,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    lam: float | None = None,
    policy: TensorPolicy | None = None,
    compute_dtype: str = "float32",
    output_dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    output_format: str = "dense",
    lora_rank: int | None = None,
    lora_drop_other: bool = False,
    resume: bool = False,
    workers: int | None = None,
    executor: str | Executor = "thread",
    weights: Sequence[float] | None = None,
    cast_inputs: bool = False,
) -> Path:
    """Merge checkpoint files / folders and write the result atomically.

    Args:
        base: the pretrained model (file or Hugging Face folder).
        models: the T fine-tuned models, same architecture as ``base``: checkpoints, or PEFT LoRA adapter
            folders (``adapter_config.json``), read as ``θ₀ + ΔW`` against ``base``.
        output: a folder (non-weight files of a folder ``base`` are copied into it) or a ``.safetensors`` file.
        method: a registered method name (``taskmerge methods`` lists them).
        options: the method's options.
        lam: the scaling coefficient λ; the method's default when ``None``.
        output_dtype: ``float32`` / ``float16`` / ``bfloat16``; the base's dtype per tensor when ``None``.
        output_format: ``dense`` (a merged model) or ``lora`` (a rank-``lora_rank`` PEFT adapter of ``base``
            holding ``λ·τ``, see :mod:`taskmerge.io.lora_export`; ``lora_drop_other`` drops changed tensors
            a LoRA adapter cannot hold instead of failing).
        overwrite: replace an existing output that taskmerge wrote (a folder holding other files is refused,
            see :func:`taskmerge.io.writers.check_replaceable`); an output that is an input is always refused.
        resume: continue an interrupted merge of the same request from the shards completed in
            ``<output>.partial`` (see :mod:`taskmerge.io.writers`); a different request is refused (inputs are
            identified by content, :func:`input_identity`, so a ``touch`` does not count as a change).
        workers: tensors merged at once (``None``: :func:`taskmerge.executors.default_workers` threads;
            with Ray, the cluster's CPUs).
        executor: ``thread`` (a CPU thread pool, serial for one worker), ``ray``, or an
            :class:`~taskmerge.executors.Executor`.
        weights: one per model, multiplying its task update (MergeKit's ``parameters.weight``); ``None``: all 1.
        cast_inputs: accept fine-tuned models stored in another floating dtype than the base.

    A folder output gets a model card, ``README.md`` (:mod:`taskmerge.model_card`: method, paper, options, λ,
    the inputs' identities, taskmerge's version), and, with ``output_dtype``, the base's ``config.json`` with
    its ``torch_dtype`` / ``dtype`` set to it.

    Dense output streams: shards are planned up front and every tensor is written to its place in its
    shard as soon as it is merged, so memory holds only the tensors being merged (about T + 2 copies of
    the largest tensor per worker, plus the method's temporaries), whatever the model and shard size.
    """
    if output_format not in ("dense", "lora"):
        raise OptionError(f"option output_format: expected dense or lora, got {output_format!r}")
    if output_format == "lora":
        if lora_rank is None:
            raise OptionError(f"option lora_rank: required with {option_hint('output_format', 'lora')} "
                              f"(e.g. {option_hint('lora_rank', 16)})")
        if resume:
            raise OptionError("option resume: not supported with output_format lora")
        return merge_to_lora(
            base, models, output, method, options, rank=lora_rank, lam=lam, policy=policy,
            compute_dtype=compute_dtype, output_dtype=output_dtype, device=device, seed=seed,
            overwrite=overwrite, drop_other=lora_drop_other, progress=progress,
        ).path
    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed,
                             weights=weights, cast_inputs=cast_inputs)
    lam = _checked_lambda(req.spec.default_lambda if lam is None else lam)
    out_dtype = _output_dtype(output_dtype)
    if executor == "ray" and req.device.type != "cpu":
        raise OptionError("option device: the Ray executor runs on CPUs only")
    base_reader = streaming_source(open_checkpoint(base))
    readers = [streaming_source(open_checkpoint(m, base=base_reader)) for m in models]
    names, classes = _prepare(base_reader, readers, req)
    base_id, model_ids = input_identity(base), [input_identity(m) for m in models]
    _check_inputs(base_id, model_ids, output)
    plan = []
    for name in names:
        shape, dtype = base_reader.meta(name)
        plan.append((name, shape, out_dtype if out_dtype is not None and dtype.is_floating_point else dtype))
    merger = TensorMerger(base_reader, readers, req, lam=lam, out_dtype=out_dtype,
                          paths=(str(base), tuple(str(m) for m in models)))
    request = _request_description(base_id, model_ids, req, lam, output_dtype, max_shard_bytes)
    own_executor = isinstance(executor, str)
    pool = make_executor(executor, workers) if isinstance(executor, str) else executor
    try:
        with CheckpointWriter(output, overwrite=overwrite, copy_from=base, max_shard_bytes=max_shard_bytes,
                              metadata={"taskmerge_method": method, "taskmerge_lambda": repr(lam)},
                              request=request, resume=resume,
                              extra_files=output_files(base, request, req.spec)) as writer:
            done = writer.plan(plan)
            todo = [n for n in names if n not in done]
            if any(classes[n] is not TensorClass.KEEP for n in todo):
                merger.state = _statistic_pass(merger, names, classes, pool, progress)
            items = [(n, classes[n]) for n in todo]
            results = pool.map(merger.output, items, **_budget(base_reader, items))
            for name, value in zip(todo, tqdm(results, total=len(todo), desc=f"{req.spec.name}: merging",
                                              disable=not progress, unit="tensor")):
                writer.add(name, value)
                del value
            return writer.commit()
    finally:
        if own_executor:
            pool.close()


def _output_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise OptionError(f"option dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def merge_to_lora(
    base: str | Path,
    models: Sequence[str | Path],
    output: str | Path,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    rank: int,
    lam: float | None = None,
    policy: TensorPolicy | None = None,
    compute_dtype: str = "float32",
    output_dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    drop_other: bool = False,
    progress: bool = True,
) -> LoraExportReport:
    """Merge checkpoints / PEFT adapters and write ``λ·τ`` as a rank-``rank`` LoRA adapter of ``base``
    (:class:`taskmerge.io.lora_export.LoraAdapterWriter`).

    Arguments as :func:`merge_checkpoints`; ``output_dtype`` is the factors' dtype (float32 by default).
    """
    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed)
    lam = _checked_lambda(req.spec.default_lambda if lam is None else lam)
    factor_dtype = _output_dtype(output_dtype) or torch.float32
    base_reader = open_checkpoint(base)
    readers = [open_checkpoint(m, base=base_reader) for m in models]
    base_id, model_ids = input_identity(base), [input_identity(m) for m in models]
    _check_inputs(base_id, model_ids, output)
    described = {**_request_description(base_id, model_ids, req, lam, output_dtype, 0), "lora_rank": rank}
    del described["max_shard_bytes"]
    writer = LoraAdapterWriter(
        output, rank, base_model_name_or_path=str(base), overwrite=overwrite, dtype=factor_dtype,
        drop_other=drop_other, metadata={"taskmerge_method": method, "taskmerge_lambda": repr(lam)},
        extra_files={"README.md": model_card(described, paper=req.spec.paper, summary=req.spec.summary, resumable=False)},
    )
    with writer:
        for name, theta0, tau in iter_merged(base_reader, readers, req, progress=progress):
            if tau is None:
                continue
            cls = req.policy.classify(name, tuple(theta0.shape), theta0.dtype)
            writer.add(name, lam * tau, target=cls is TensorClass.MATRIX)
        return writer.commit()
