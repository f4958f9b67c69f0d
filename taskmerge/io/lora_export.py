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

Factors that are not finite once cast to the stored dtype (an overflow in float16) are an error naming
the tensor. The merge that feeds the writer is driven by :func:`taskmerge.merge.merge_to_lora`; this
module only writes (``io`` depends on nothing above it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from taskmerge import linalg
from taskmerge.errors import CheckpointError, OptionError, OutputError, option_hint
from taskmerge.io.peft import ADAPTER_CONFIG, PEFT_PREFIX
from taskmerge.io.writers import make_output_parent, check_replaceable, os_error_reason, write_manifest

__all__ = ["LoraExportReport", "LoraAdapterWriter", "lora_factors"]

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
        extra_files: more files of the adapter folder, name → text (e.g. a model card ``README.md``).
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
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        if rank < 1:
            raise OptionError(f"option lora_rank: must be at least 1, got {rank}")
        self.output = Path(output)
        if self.output.suffix == ".safetensors":
            raise OptionError(f"{self.output}: a LoRA adapter is a folder, not a .safetensors file")
        if self.output.exists():
            if not overwrite:
                raise OutputError(f"{self.output}: output already exists ({option_hint('overwrite')} replaces it)")
            check_replaceable(self.output)
        self.rank = rank
        self.base_model_name_or_path = base_model_name_or_path
        self.dtype = dtype
        self.drop_other = drop_other
        self.metadata = {"format": "pt", **(metadata or {})}
        self.extra_files = dict(extra_files or {})
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
                    f"embedding or excluded matrix): write a dense model, or pass {option_hint('lora_drop_other')} "
                    "to drop such changes"
                )
            logger.warning("%s is changed by the merge but cannot be stored in a LoRA adapter: dropped "
                           "(max |change| %.3g)", what, float(update.abs().max()))
            self.report.dropped.append(name)
            return None
        b, a, err = lora_factors(update, self.rank)
        module = name[: -len(".weight")]
        a, b = a.to(self.dtype).contiguous(), b.to(self.dtype).contiguous()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise OptionError(f"tensor {name!r}: its LoRA factors are not finite in {self.dtype} (the merged update "
                              f"overflows; max |λ·τ| {float(update.abs().max()):.3g}): check λ and the output dtype")
        self._tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        self._tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
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
        tmp: Path | None = None
        try:
            make_output_parent(self.output)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
            final = tmp / "out"
            final.mkdir()
            meta = {**self.metadata, "taskmerge_max_truncation_error": repr(self.report.max_error)}
            save_file(self._tensors, str(final / ADAPTER_FILE), metadata=meta)
            (final / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2, sort_keys=True))
            for fname, text in self.extra_files.items():
                (final / fname).write_text(text, encoding="utf-8")
            write_manifest(final)
            if self.output.exists():
                check_replaceable(self.output)
                os.replace(self.output, tmp / "replaced")
            os.replace(final, self.output)
            self._committed = True
        except OSError as exc:
            raise OutputError(f"{exc.filename or self.output}: cannot write the output ({os_error_reason(exc)})") from None
        except SafetensorError as exc:  # safetensors' own write errors (e.g. no space left)
            raise OutputError(f"{self.output}: cannot write the output ({exc})") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote LoRA adapter %s (%d matrices, rank %d, max relative truncation error %.3g)",
                    self.output, len(self._modules), self.rank, self.report.max_error)
        return self.report

    def __enter__(self) -> LoraAdapterWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tensors.clear()

