"""The merge engine: stream tensors from a base and T fine-tuned models through a registered method.

For every tensor name the engine reads the base tensor and the T fine-tuned tensors, forms the task
updates ``Δ_t = θ_t − θ₀`` in the compute dtype (float32 by default, whatever the stored dtype),
checks them, calls the method's per-layer function (or averages, for tensors a ``matrix_only`` method
does not treat), and hands back the merged update. Only one tensor name is resident at a time, so a
merge never holds T whole models in memory. Methods with a model-level statistic get a first
statistics pass over all tensors.

Entry points: :func:`merged_task_vector` / :func:`apply_task_vector` for in-memory state dicts (the
benchmark's λ sweeps), and :func:`merge_checkpoints` for files and folders (the CLI).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from taskmerge.errors import CheckpointError, OptionError
from taskmerge.io.readers import DictSource, TensorSource, open_checkpoint
from taskmerge.io.writers import DEFAULT_SHARD_BYTES, CheckpointWriter
from taskmerge.linalg import LowRank
from taskmerge.registry import LayerContext, MethodOptions, MethodSpec, get_method
from taskmerge.selection import TensorClass, TensorPolicy

__all__ = ["MergeRequest", "iter_merged", "merged_task_vector", "apply_task_vector", "merge_checkpoints"]

logger = logging.getLogger(__name__)

_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MergeRequest:
    """A resolved merge: the method, its validated options and how tensors are treated."""

    spec: MethodSpec
    options: MethodOptions
    policy: TensorPolicy = TensorPolicy()
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0

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
    ) -> MergeRequest:
        """Validate a method name, its options, the compute dtype and the device."""
        spec = get_method(method)
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
        return cls(spec, spec.parse(options), policy or TensorPolicy(), compute_dtype, dev, seed)


def _check_sources(base: TensorSource, tasks: Sequence[TensorSource]) -> list[str]:
    """Check names, shapes and dtypes before any work; returns the base's tensor names."""
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
            if t_dtype != b_dtype:
                raise CheckpointError(
                    f"{src.location(name)}: tensor {name!r} has dtype {t_dtype}, base has {b_dtype}"
                )
        extra = have.difference(names)
        if extra:
            logger.warning("%s: %d tensor(s) not in the base model are ignored, e.g. %s", src.label, len(extra), min(extra))
    return names


def _task_updates(name: str, base: torch.Tensor, tasks: Sequence[TensorSource], req: MergeRequest) -> torch.Tensor:
    """Stack ``Δ_t = θ_t − θ₀`` for one tensor, in the compute dtype, checking for NaN / Inf.

    A source that knows its update exactly (a PEFT adapter: ``task_update(name, dtype)`` returns
    ``scale·B A``) supplies it directly instead of the rounded difference ``θ_t − θ₀``.
    """
    b = base.to(device=req.device, dtype=req.compute_dtype)
    deltas = torch.empty((len(tasks), *b.shape), dtype=req.compute_dtype, device=req.device)
    for i, src in enumerate(tasks):
        exact = getattr(src, "task_update", None)
        if exact is not None:
            deltas[i] = exact(name, req.compute_dtype).to(device=req.device)
        else:
            torch.sub(src.get(name).to(device=req.device, dtype=req.compute_dtype), b, out=deltas[i])
        if not torch.isfinite(deltas[i]).all():
            raise CheckpointError(f"{src.location(name)}: task vector of tensor {name!r} contains NaN or Inf")
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
                        matrix=cls is TensorClass.MATRIX, factors=_task_factors(name, cls, tasks) if tasks else None)


def _merge_one(name: str, cls: TensorClass, deltas: torch.Tensor, req: MergeRequest, state: Any,
               tasks: Sequence[TensorSource] = ()) -> torch.Tensor:
    if req.spec.matrix_only and cls is not TensorClass.MATRIX:
        return deltas.mean(dim=0)
    ctx = _layer_context(name, cls, req, state, tasks)
    merged = req.spec.fn(deltas, req.options, ctx)
    if merged.shape != deltas.shape[1:]:
        raise RuntimeError(f"method {req.spec.name!r} returned shape {tuple(merged.shape)} for tensor {name!r}")
    if not torch.isfinite(merged).all():
        raise OptionError(f"method {req.spec.name!r} produced NaN or Inf for tensor {name!r}; check its options")
    return merged


def _statistic_pass(base: TensorSource, tasks: Sequence[TensorSource], names: list[str],
                    classes: dict[str, TensorClass], req: MergeRequest, progress: bool) -> Any:
    stat = req.spec.statistic_for(req.options)
    if stat is None:
        return None
    collected: dict[str, Any] = {}
    todo = [n for n in names if classes[n] is not TensorClass.KEEP
            and not (req.spec.matrix_only and classes[n] is not TensorClass.MATRIX)]
    with_ctx = bool(getattr(stat, "wants_context", False))
    for name in tqdm(todo, desc=f"{req.spec.name}: statistics", disable=not progress, unit="tensor"):
        deltas = _task_updates(name, base.get(name), tasks, req)
        if with_ctx:
            collected[name] = stat.collect(name, deltas, req.options, _layer_context(name, classes[name], req, None, tasks))
        else:
            collected[name] = stat.collect(name, deltas, req.options)
    return stat.finalize(collected, req.options)


def iter_merged(
    base: TensorSource, tasks: Sequence[TensorSource], req: MergeRequest, *, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(name, base_tensor, merged_update)`` for each base tensor.

    The update is ``None`` for tensors kept at the base value; otherwise a float tensor (compute dtype)
    on the CPU, before scaling by λ.
    """
    names = _check_sources(base, tasks)
    classes = {n: req.policy.classify(n, *base.meta(n)) for n in names}
    if all(c is TensorClass.KEEP for c in classes.values()):
        raise OptionError("no tensor is selected for merging: check the include / exclude patterns")
    state = _statistic_pass(base, tasks, names, classes, req, progress)
    for name in tqdm(names, desc=f"{req.spec.name}: merging", disable=not progress, unit="tensor"):
        cls = classes[name]
        theta0 = base.get(name)
        if cls is TensorClass.KEEP:
            yield name, theta0, None
            continue
        deltas = _task_updates(name, theta0, tasks, req)
        yield name, theta0, _merge_one(name, cls, deltas, req, state, tasks).cpu()


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
) -> dict[str, torch.Tensor]:
    """The merged update τ (before λ) of in-memory state dicts; tensors kept at the base are absent."""
    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed)
    base = DictSource(base_sd, "base state dict")
    tasks = [DictSource(sd, f"task state dict {i}") for i, sd in enumerate(task_sds)]
    return {name: tau for name, _, tau in iter_merged(base, tasks, req, progress=progress) if tau is not None}


def apply_task_vector(
    base_sd: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """``θ₀ + λ·τ`` per tensor, computed in float32 (float64 if τ is) and cast to the base dtype."""
    return {name: _scaled(base, tau.get(name), lam) for name, base in base_sd.items()}


def _scaled(theta0: torch.Tensor, tau: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``θ₀ + λ·τ`` in τ's dtype, cast back to θ₀'s dtype; θ₀ itself when τ is ``None``."""
    if tau is None:
        return theta0
    return (theta0.to(tau.dtype) + lam * tau).to(theta0.dtype)


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
    """
    if output_format not in ("dense", "lora"):
        raise OptionError(f"option output_format: expected dense or lora, got {output_format!r}")
    if output_format == "lora":
        from taskmerge.io.lora_export import merge_to_lora

        if lora_rank is None:
            raise OptionError("option lora_rank: required with output_format lora (e.g. --lora-rank 16)")
        return merge_to_lora(
            base, models, output, method, options, rank=lora_rank, lam=lam, policy=policy,
            compute_dtype=compute_dtype, output_dtype=output_dtype, device=device, seed=seed,
            overwrite=overwrite, drop_other=lora_drop_other, progress=progress,
        ).path
    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed)
    lam = req.spec.default_lambda if lam is None else float(lam)
    out_dtype = _output_dtype(output_dtype)
    base_reader = open_checkpoint(base)
    readers = [open_checkpoint(m, base=base_reader) for m in models]
    with CheckpointWriter(output, overwrite=overwrite, copy_from=base, max_shard_bytes=max_shard_bytes,
                          metadata={"taskmerge_method": method, "taskmerge_lambda": repr(lam)}) as writer:
        for name, theta0, tau in iter_merged(base_reader, readers, req, progress=progress):
            value = _scaled(theta0, tau, lam)
            if out_dtype is not None and value.dtype.is_floating_point:
                value = value.to(out_dtype)
            writer.add(name, value)
        return writer.commit()


def _output_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise OptionError(f"option dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]
