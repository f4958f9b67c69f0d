"""Write a merged update as a PEFT LoRA adapter.

Where the merged update ``λ·τ`` of every weight matrix has rank ≤ k (task arithmetic of rank-r adapters
has rank ≤ T·r, KnOTS's update lies in the span of the stacked LoRA factors), it is stored exactly as a
rank-k LoRA adapter, a few MB instead of a whole model. Per matrix ``W`` (m × n) with the top-k SVD
``λτ ≈ U_k S_k V_kᵀ``:

    B = U_k √S_k  (m × k),   A = √S_k V_kᵀ  (k × n),   lora_alpha = r = k  (scale 1),

zero-padded to rank k when ``min(m, n) < k`` or the update has fewer non-zero singular values. The relative
truncation error ``‖λτ − B A‖_F / ‖λτ‖_F`` of every matrix is logged, and the report holds the maximum
(0 up to rounding when every update has rank ≤ k).

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), loadable with
``peft.PeftModel.from_pretrained(base_model, folder)``. ``target_modules`` lists the full module paths,
which are the base checkpoint's tensor names without ``.weight``: load the adapter onto the same model
class whose checkpoint was merged. It is written under a temporary name and renamed into place.

Only 2-D weight matrices of the matrix class are LoRA targets (as ``nn.Linear`` layers; weights stored
(in, out) like GPT-2's ``Conv1D`` are not supported). Other tensors the merge changed — biases, norms,
embedding tables, excluded matrices — cannot be expressed: by default that is an error naming the tensor;
with ``drop_other`` they are dropped (kept at the base value) with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from taskmerge import linalg
from taskmerge.errors import CheckpointError, OptionError
from taskmerge.io.peft import ADAPTER_CONFIG, PEFT_PREFIX
from taskmerge.selection import TensorClass, TensorPolicy

__all__ = ["LoraExportReport", "LoraAdapterWriter", "lora_factors", "merge_to_lora"]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoraExportReport:
    """What an export wrote: the folder, the rank, per-matrix relative truncation errors, dropped tensors."""

    path: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        """The largest relative truncation error over the exported matrices (0.0 if none)."""
        return max(self.errors.values(), default=0.0)

    @property
    def max_tensor(self) -> str | None:
        """The matrix with the largest truncation error."""
        return max(self.errors, key=self.errors.__getitem__) if self.errors else None


def lora_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` LoRA factors ``B = U√S``, ``A = √S Vᵀ`` of a matrix and the relative truncation error.

    Computed in float64; ``B`` is (m, rank) and ``A`` (rank, n), zero-padded where the matrix has fewer
    than ``rank`` singular triplets.
    """
    if update.ndim != 2:
        raise ValueError(f"lora_factors expects a matrix, got shape {tuple(update.shape)}")
    u = update.double()
    m, n = u.shape
    dec = linalg.truncated_svd(u, rank)
    root = dec.S.clamp_min(0).sqrt()
    b = u.new_zeros(m, rank)
    a = u.new_zeros(rank, n)
    k = root.shape[0]
    b[:, :k] = dec.U * root
    a[:k] = root.unsqueeze(1) * dec.Vh
    norm = torch.linalg.matrix_norm(u)
    err = float(torch.linalg.matrix_norm(u - b @ a) / norm) if norm > 0 else 0.0
    return b, a, err


class LoraAdapterWriter:
    """Collects merged updates and writes them atomically as a rank-``rank`` PEFT LoRA adapter.

    Args:
        output: the adapter folder to create.
        rank: the LoRA rank k (``r`` and ``lora_alpha`` of the config).
        base_model_name_or_path: recorded in ``adapter_config.json``.
        overwrite: replace an existing output.
        dtype: dtype of the stored factors (float32 by default).
        drop_other: drop changed tensors that are not LoRA targets (warning) instead of failing.
        metadata: extra safetensors header metadata.
    """

    def __init__(
        self,
        output: str | Path,
        rank: int,
        *,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_other: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if rank < 1:
            raise OptionError(f"option lora_rank: must be at least 1, got {rank}")
        self.output = Path(output)
        if self.output.suffix == ".safetensors":
            raise OptionError(f"{self.output}: a LoRA adapter is a folder, not a .safetensors file")
        if self.output.exists() and not overwrite:
            raise CheckpointError(f"{self.output}: output already exists (pass --overwrite to replace it)")
        self.rank = rank
        self.base_model_name_or_path = base_model_name_or_path
        self.dtype = dtype
        self.drop_other = drop_other
        self.metadata = {"format": "pt", **(metadata or {})}
        self._tensors: dict[str, torch.Tensor] = {}
        self._modules: list[str] = []
        self.report = LoraExportReport(self.output, rank)
        self._committed = False

    def add(self, name: str, update: torch.Tensor, *, target: bool) -> float | None:
        """Add one tensor's merged update ``λ·τ``; returns its truncation error (``None`` if not written).

        ``target``: whether the tensor is a LoRA-targetable weight matrix. All-zero updates are skipped.
        """
        if not bool(torch.any(update != 0)):
            return None
        if not target or update.ndim != 2 or not name.endswith(".weight"):
            what = f"tensor {name!r} of shape {list(update.shape)}"
            if not self.drop_other:
                raise OptionError(
                    f"{what} is changed by the merge but is not a LoRA-targetable weight matrix (a bias, norm, "
                    "embedding or excluded matrix): write a dense model, or pass --lora-drop-other to drop such changes"
                )
            logger.warning("%s is changed by the merge but cannot be stored in a LoRA adapter: dropped "
                           "(max |change| %.3g)", what, float(update.abs().max()))
            self.report.dropped.append(name)
            return None
        b, a, err = lora_factors(update, self.rank)
        module = name[: -len(".weight")]
        self._tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(self.dtype).contiguous()
        self._tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(self.dtype).contiguous()
        self._modules.append(module)
        self.report.errors[name] = err
        logger.info("%s: rank-%d LoRA, relative truncation error %.3g", name, self.rank, err)
        return err

    def config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.rank,
            "target_modules": sorted(self._modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def commit(self) -> LoraExportReport:
        """Write the adapter under a temporary name and move it into place."""
        if not self._tensors:
            raise CheckpointError(f"{self.output}: nothing to write (the merge changed no LoRA-targetable matrix)")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        try:
            final = tmp / "out"
            final.mkdir()
            meta = {**self.metadata, "taskmerge_max_truncation_error": repr(self.report.max_error)}
            save_file(self._tensors, str(final / ADAPTER_FILE), metadata=meta)
            (final / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2, sort_keys=True))
            if self.output.exists():
                os.replace(self.output, tmp / "replaced")
            os.replace(final, self.output)
            self._committed = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote LoRA adapter %s (%d matrices, rank %d, max relative truncation error %.3g)",
                    self.output, len(self._modules), self.rank, self.report.max_error)
        return self.report

    def __enter__(self) -> LoraAdapterWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tensors.clear()


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
    """Merge checkpoints / PEFT adapters and write ``λ·τ`` as a rank-``rank`` LoRA adapter of ``base``.

    Arguments as :func:`taskmerge.merge.merge_checkpoints`; ``output_dtype`` is the factors' dtype
    (float32 by default).
    """
    from taskmerge.io.readers import open_checkpoint
    from taskmerge.merge import MergeRequest, iter_merged

    req = MergeRequest.build(method, options, policy=policy, compute_dtype=compute_dtype, device=device, seed=seed)
    lam = req.spec.default_lambda if lam is None else float(lam)
    table = {None: torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if output_dtype not in table:
        raise OptionError(f"option dtype: expected one of float32, float16, bfloat16, got {output_dtype!r}")
    base_reader = open_checkpoint(base)
    readers = [open_checkpoint(m, base=base_reader) for m in models]
    writer = LoraAdapterWriter(
        output, rank, base_model_name_or_path=str(base), overwrite=overwrite, dtype=table[output_dtype],
        drop_other=drop_other, metadata={"taskmerge_method": method, "taskmerge_lambda": repr(lam)},
    )
    with writer:
        for name, theta0, tau in iter_merged(base_reader, readers, req, progress=progress):
            if tau is None:
                continue
            cls = req.policy.classify(name, tuple(theta0.shape), theta0.dtype)
            writer.add(name, lam * tau, target=cls is TensorClass.MATRIX)
        return writer.commit()
