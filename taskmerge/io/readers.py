"""Lazy tensor sources.

A :class:`TensorSource` lists tensor names, tells a tensor's shape and dtype without loading it, and
loads one tensor at a time. :func:`open_checkpoint` opens any supported checkpoint:

* a single ``.safetensors`` file, or sharded safetensors with ``model.safetensors.index.json``;
* a PyTorch state dict (``.bin`` / ``.pt`` / ``.pth``), loaded with ``weights_only=True`` and memory
  mapped, or sharded with ``pytorch_model.bin.index.json``;
* a Hugging Face model folder holding any of the above.

Every failure is a :class:`~taskmerge.errors.CheckpointError` naming the file (and tensor); a file that
cannot be opened says why (``Permission denied`` is not reported as a missing file).

The files a checkpoint folder names (an index's shards, the weights found in the folder, a PEFT adapter's
files) are confined to the folder (:func:`confined_path`): an absolute shard name, one that climbs out
with ``..``, or a symlink whose target lies outside is refused, so a crafted checkpoint cannot pull other
weights files on the machine into a merge. The one exception is a Hugging Face hub cache snapshot
(``models--org--name/snapshots/<revision>/``), whose files are links into the repository's ``blobs/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError, safe_open

from taskmerge.errors import CheckpointError

if TYPE_CHECKING:
    from taskmerge.io.peft import PeftAdapterSource

__all__ = ["TensorSource", "DictSource", "CheckpointReader", "open_checkpoint", "confined_path", "SAFETENSORS_DTYPES"]

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _hub_blobs(root: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face hub cache repository that ``root`` is a snapshot (or a
    folder inside a snapshot) of, else ``None``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
            return folder.parent.parent / "blobs"
    return None


def confined_path(folder: str | Path, name: str | Path, what: str) -> Path:
    """``folder / name``, refused unless it lies inside ``folder`` once symlinks are resolved.

    ``name`` is a file a checkpoint names (an index's shard, an adapter's weights file). An absolute
    name, a ``..`` that climbs out of ``folder``, or a symlink whose target is outside it raises
    :class:`CheckpointError` naming ``what`` (the index or folder that names the file). Links from a
    Hugging Face hub cache snapshot into the repository's ``blobs/`` folder are allowed.
    """
    folder = Path(folder)
    if Path(name).is_absolute():
        raise CheckpointError(f"{what}: names the absolute path {str(name)!r}; a checkpoint's files must lie in "
                              f"its folder {folder}")
    root = folder.resolve()
    target = (folder / name).resolve()
    blobs = _hub_blobs(root)
    if not (target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs.resolve()))):
        raise CheckpointError(f"{what}: {str(name)!r} resolves to {target}, outside the checkpoint's folder {root}; "
                              "refused (a checkpoint's files must lie in its folder)")
    return folder / name


def _check_readable(path: Path) -> None:
    """Open ``path`` for reading once, so that a failure reports the real reason (``Permission denied``)."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None


class TensorSource(Protocol):
    """Where a merge reads one model's tensors from."""

    label: str

    def keys(self) -> list[str]:
        """Tensor names, in storage order."""

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``name`` without loading it."""

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (on the CPU)."""

    def location(self, name: str) -> str:
        """The file holding ``name`` (for error messages)."""


class DictSource:
    """A :class:`TensorSource` over an in-memory state dict."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state dict") -> None:
        self._sd = state_dict
        self.label = label

    def keys(self) -> list[str]:
        return list(self._sd.keys())

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def location(self, name: str) -> str:
        return self.label


class CheckpointReader:
    """A lazy reader over one checkpoint's weight files (see the module docstring)."""

    def __init__(self, label: str, files: list[Path], weight_map: dict[str, Path] | None = None) -> None:
        self.label = label
        self.files = files
        self._handles: dict[Path, object] = {}
        self._torch_dicts: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._where: dict[str, Path] = {}
        if weight_map is not None:
            self._where = dict(weight_map)
            missing = sorted({p for p in self._where.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{label}: the index names a shard that does not exist: {missing[0]}")
        else:
            for f in files:
                for name in self._file_keys(f):
                    self._where[name] = f

    def _open(self, path: Path) -> object:
        if path.suffix == ".safetensors":
            if path not in self._handles:
                _check_readable(path)
                try:
                    self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
                except (SafetensorError, OSError, ValueError) as exc:
                    raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
            return self._handles[path]
        if path not in self._torch_dicts:
            self._torch_dicts[path] = _load_torch_state_dict(path)
        return self._torch_dicts[path]

    def _file_keys(self, path: Path) -> list[str]:
        handle = self._open(path)
        return list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._where.keys())

    def location(self, name: str) -> str:
        return str(self._where.get(name, self.label))

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        path = self._path_of(name)
        handle = self._open(path)
        if path.suffix == ".safetensors":
            try:
                sl = handle.get_slice(name)
            except (SafetensorError, KeyError) as exc:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
            dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
            return tuple(sl.get_shape()), dtype
        t = self._torch_tensor(handle, path, name)
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        path = self._path_of(name)
        handle = self._open(path)
        if path.suffix == ".safetensors":
            try:
                return handle.get_tensor(name)
            except (SafetensorError, KeyError, OSError) as exc:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
        return self._torch_tensor(handle, path, name)

    def _path_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None

    @staticmethod
    def _torch_tensor(handle: Mapping[str, torch.Tensor], path: Path, name: str) -> torch.Tensor:
        try:
            t = handle[name]
        except KeyError:
            raise CheckpointError(f"{path}: no tensor named {name!r}") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        return t

    def close(self) -> None:
        """Release file handles and memory maps."""
        self._handles.clear()
        self._torch_dicts.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_torch_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a PyTorch state dict safely (``weights_only``), memory-mapped when the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or unsafe pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load as a PyTorch state dict ({first})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _read_index(index: Path) -> dict[str, Path]:
    """An index's ``weight_map``: tensor name → shard file, every shard confined to the index's folder."""
    try:
        data = json.loads(index.read_text())
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read shard index ({exc.strerror})") from None
    except ValueError as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index (no weight_map of tensor names to shard files)")
    shards = {shard: confined_path(index.parent, shard, str(index)) for shard in set(weight_map.values())}
    return {name: shards[shard] for name, shard in weight_map.items()}


def open_checkpoint(
    path: str | Path, *, base: TensorSource | str | Path | None = None
) -> CheckpointReader | PeftAdapterSource:
    """Open a checkpoint file or Hugging Face model folder for lazy reading.

    A PEFT adapter folder (holding ``adapter_config.json``) is read against ``base``, the model it was
    trained on, as a :class:`taskmerge.io.peft.PeftAdapterSource` (``θ₀ + ΔW``); without ``base`` it is an
    error.
    """
    p = Path(path)
    try:
        return _open_checkpoint(p, base)
    except OSError as exc:  # stat / listing a folder we may not read: say why, not "no such file"
        raise CheckpointError(f"{exc.filename or p}: cannot open ({exc.strerror})") from None


def _open_checkpoint(p: Path, base: TensorSource | str | Path | None) -> CheckpointReader | PeftAdapterSource:
    try:
        p.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file or folder") from None
    from taskmerge.io.peft import is_adapter, open_adapter  # noqa: PLC0415 (peft imports this module)

    if is_adapter(p):
        return open_adapter(p, base)
    if p.is_file():
        if p.name.endswith(".index.json"):
            wm = _read_index(p)
            return CheckpointReader(str(p), sorted(set(wm.values())), wm)
        if p.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{p}: unsupported checkpoint type (expected .safetensors, .bin, .pt, .pth or a folder)")
        return CheckpointReader(str(p), [p])
    for index_name in _INDEX_FILES:
        index = p / index_name
        if index.is_file():
            wm = _read_index(index)
            return CheckpointReader(str(p), sorted(set(wm.values())), wm)
    for single in _SINGLE_FILES:
        if (p / single).is_file():
            return CheckpointReader(str(p), [confined_path(p, single, str(p))])
    shards = sorted(confined_path(p, f.name, str(p)) for f in p.glob("*.safetensors"))
    if shards:
        return CheckpointReader(str(p), shards)
    raise CheckpointError(f"{p}: folder holds no model weights (model.safetensors, an index, or pytorch_model.bin)")
