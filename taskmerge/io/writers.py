"""Atomic, sharded safetensors output.

:class:`CheckpointWriter` writes a Hugging Face style model folder (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` above the shard
size) or a single ``.safetensors`` file. Everything is written under a temporary name next to the
destination and renamed into place on :meth:`CheckpointWriter.commit`; on an error (or without a
commit) the temporary output is removed, so a failed merge leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from taskmerge.errors import CheckpointError
from taskmerge.io.readers import WEIGHT_SUFFIXES

__all__ = ["CheckpointWriter", "DEFAULT_SHARD_BYTES", "copy_non_weight_files"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024**3
_SKIP_COPY_SUFFIXES = WEIGHT_SUFFIXES + (".h5", ".msgpack", ".ckpt", ".onnx")


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy ``config.json``, tokenizer files and other non-weight files of folder ``src`` into ``dst``."""
    copied: list[str] = []
    for item in sorted(src.iterdir()):
        if item.name.endswith(".index.json") or item.suffix in _SKIP_COPY_SUFFIXES or item.name.startswith("."):
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
        copied.append(item.name)
    return copied


class CheckpointWriter:
    """Collects tensors and writes them as an atomic, optionally sharded, safetensors checkpoint.

    Args:
        output: a folder (Hugging Face layout) or a path ending in ``.safetensors`` (one file).
        max_shard_bytes: shard size limit for folder output.
        overwrite: replace an existing output; otherwise an existing output is an error.
        copy_from: a base model folder whose non-weight files (config, tokenizer) are copied.
        metadata: safetensors header metadata (``{"format": "pt"}`` is always set).
    """

    def __init__(
        self,
        output: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        copy_from: str | Path | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.output = Path(output)
        self.single_file = self.output.suffix == ".safetensors"
        if self.output.exists() and not overwrite:
            raise CheckpointError(f"{self.output}: output already exists (pass --overwrite to replace it)")
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = Path(copy_from) if copy_from is not None and Path(copy_from).is_dir() else None
        self.metadata = {"format": "pt", **(metadata or {})}
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._committed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a full shard is written to disk at once (folder output)."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise CheckpointError(f"{self.output}: tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if not self.single_file and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self._tmp / f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def commit(self) -> Path:
        """Finish writing and move the output into place; returns the output path."""
        self._flush()
        if not self._shards:
            raise CheckpointError(f"{self.output}: nothing to write (no tensors were merged)")
        if self.single_file:
            if len(self._shards) != 1:
                raise CheckpointError(f"{self.output}: single-file output cannot be sharded")
            final_tmp = self._shards[0][0]
        else:
            final_tmp = self._tmp / "out"
            final_tmp.mkdir()
            n = len(self._shards)
            weight_map: dict[str, str] = {}
            for i, (path, names) in enumerate(self._shards, start=1):
                fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
                path.rename(final_tmp / fname)
                weight_map.update({name: fname for name in names})
            if n > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                (final_tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            if self.copy_from is not None:
                copy_non_weight_files(self.copy_from, final_tmp)
        self._replace(final_tmp)
        self._committed = True
        shutil.rmtree(self._tmp, ignore_errors=True)
        logger.info("wrote %s (%d shard(s), %.1f MB)", self.output, len(self._shards), self._total_bytes / 1e6)
        return self.output

    def _replace(self, final_tmp: Path) -> None:
        if self.output.exists():
            trash = self._tmp / "replaced"
            os.replace(self.output, trash)
        os.replace(final_tmp, self.output)

    def abort(self) -> None:
        """Discard everything written so far."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or not self._committed:
            self.abort()
