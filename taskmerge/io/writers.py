"""Atomic, sharded, streaming safetensors output with a resume journal.

:class:`CheckpointWriter` writes a Hugging Face style model folder (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` above the shard
size) or a single ``.safetensors`` file. Everything is written under a temporary folder next to the
destination and renamed into place on :meth:`CheckpointWriter.commit`; on an error (or without a
commit) the temporary output is removed, so a failed merge leaves no half-written checkpoint.

Two ways to feed it:

* :meth:`~CheckpointWriter.add` alone: tensors are buffered until a shard is full, then written.
* :meth:`~CheckpointWriter.plan` first (the merge engine): the names, shapes and dtypes of every tensor
  are known before any is computed, so the shard layout and every safetensors header are fixed up
  front and each :meth:`~CheckpointWriter.add` writes its bytes straight to their final offset in the
  shard file (``os.pwrite``). Nothing is buffered: the writer holds no tensor, whatever the shard size.

A writer given a ``request`` (a JSON-able description of the merge, see :func:`request_digest`) is
*resumable*: its temporary folder is the deterministic ``<output>.partial/``, and after each shard is
complete (written and ``fsync``-ed) a small journal, ``journal.json`` (replaced atomically), records the
shard's file, size and tensor names with the request's digest and the layout's digest. A merge killed
or interrupted midway (anything but bad input, which removes the folder) leaves the completed shards
and the journal there; ``resume=True`` re-opens the folder, refuses it if the request or the layout
differ, and reports the tensors of completed shards in :attr:`CheckpointWriter.completed` so the
engine does not recompute them. Since the layout is planned, the resumed output is byte-identical to
an uninterrupted one.

An output that cannot be written (permission denied, disk full: any ``OSError``) raises
:class:`~taskmerge.errors.OutputError` naming the path and the reason, and the temporary output is
removed, except when a resumable writer has completed shards: those are kept in ``<output>.partial``
and the message says to rerun with ``--resume`` once the cause (e.g. a full disk) is fixed.

``overwrite`` replaces only an output taskmerge wrote: every folder output carries a manifest,
``.taskmerge-manifest.json``, listing its files; an existing folder holding anything else (a file of
the user's, a model taskmerge did not write) is refused with a message naming those files, rather
than deleted with the rest. An existing single ``.safetensors`` file is replaced.

The safetensors files are written by this module (same format as ``safetensors.torch.save_file``:
8-byte little-endian header length, compact JSON header padded with spaces to 8 bytes, tensors sorted
by decreasing element size then name, contiguous): unlike ``save_file``, whose metadata order follows
a randomly seeded hash map, the bytes are a deterministic function of the tensors and metadata.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from taskmerge.errors import CheckpointError, OutputError, TaskmergeError, option_hint
from taskmerge.io.readers import SAFETENSORS_DTYPES, WEIGHT_SUFFIXES

__all__ = [
    "CheckpointWriter",
    "DEFAULT_SHARD_BYTES",
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "check_replaceable",
    "copy_non_weight_files",
    "make_output_parent",
    "os_error_reason",
    "partial_path",
    "request_digest",
    "write_manifest",
    "write_safetensors",
]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024**3
JOURNAL_NAME = "journal.json"
MANIFEST_NAME = ".taskmerge-manifest.json"
_JOURNAL_VERSION = 1
_SKIP_COPY_SUFFIXES = WEIGHT_SUFFIXES + (".h5", ".msgpack", ".ckpt", ".onnx")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_DTYPE_NAMES.update({getattr(torch, attr): name for attr, name in (
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
    if hasattr(torch, attr)})
_MAX_WRITE = 1 << 30  # bytes per os.pwrite call (Linux writes at most ~2 GiB at once)


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


def os_error_reason(exc: OSError) -> str:
    """The reason of a failed write, in words (``disk full`` for ENOSPC / EDQUOT)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full: " + (exc.strerror or "no space left on device")
    return exc.strerror or str(exc)


def write_manifest(folder: Path) -> None:
    """List every file under ``folder`` in its manifest (``MANIFEST_NAME``): what ``overwrite`` may replace."""
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir() and f.name != MANIFEST_NAME)
    (folder / MANIFEST_NAME).write_text(json.dumps({"written_by": "taskmerge", "files": files}, indent=1) + "\n")


def _manifest_files(folder: Path) -> set[str]:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
        return {str(f) for f in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_replaceable(output: Path) -> None:
    """Refuse to replace ``output`` unless taskmerge wrote it (see the module docstring).

    A single ``.safetensors`` file may be replaced; a folder only if every file in it is listed in its
    manifest (an empty folder too). Raises :class:`OutputError` naming the files taskmerge did not write.
    """
    if output.suffix == ".safetensors":
        if output.is_dir():
            raise OutputError(f"{output}: is a folder; a .safetensors output replaces a file only")
        return
    if not output.is_dir():
        raise OutputError(f"{output}: is a file, not a model folder taskmerge wrote; not replaced")
    listed = _manifest_files(output)
    parents = {str(p) for f in listed for p in Path(f).parents}
    foreign = sorted(str(f.relative_to(output)) for f in output.rglob("*")
                     if f.name != MANIFEST_NAME and str(f.relative_to(output)) not in (parents if f.is_dir() else listed))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{output}: holds files taskmerge did not write ({shown}); overwrite replaces only a folder taskmerge "
            "wrote: move them away or choose another output folder"
        )


def make_output_parent(output: Path) -> None:
    """Create ``output``'s parent folders; a file in the way is an :class:`OutputError` naming it."""
    above = next((p for p in output.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputError(f"{above}: is a file, not a folder; cannot write the output {output} below it")
    output.parent.mkdir(parents=True, exist_ok=True)


def partial_path(output: str | Path) -> Path:
    """Where a resumable merge into ``output`` keeps its completed shards: ``<output>.partial``."""
    out = Path(output)
    return out.with_name(out.name + ".partial")


def request_digest(request: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-able request description (keys sorted), as hex."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------------------- safetensors


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int = 0  # absolute offset of the data in the shard file


@dataclass
class _Shard:
    index: int
    entries: dict[str, _Entry]
    header: bytes = b""
    size: int = 0
    missing: set[str] = field(default_factory=set)
    fd: int | None = None

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors") from None


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _layout(entries: Iterable[_Entry], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    """Fix the data order and offsets of ``entries`` (in place); returns the header bytes and file size."""
    order = sorted(entries, key=lambda e: (-torch.empty((), dtype=e.dtype).element_size(), e.name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for e in order:
        header[e.name] = {"dtype": _dtype_name(e.dtype, e.name), "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        e.offset = pos
        pos += e.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    for e in order:
        e.offset += start
    return len(blob).to_bytes(8, "little") + blob, start + pos


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + _MAX_WRITE], offset + done)
        if n <= 0:
            raise OSError("short write")
        done += n


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, deterministically and without an in-memory copy."""
    entries = [_Entry(n, tuple(t.shape), t.dtype, t.numel() * t.element_size()) for n, t in tensors.items()]
    header, size = _layout(entries, {"format": "pt", **(metadata or {})})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, header, 0)
        for e in entries:
            if e.nbytes:
                _pwrite_all(fd, _tensor_bytes(tensors[e.name]), e.offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- the writer

_F = TypeVar("_F", bound=Callable[..., Any])


def _output_errors(method: _F) -> _F:
    """A :class:`CheckpointWriter` method whose ``OSError`` becomes an :class:`OutputError`."""

    @functools.wraps(method)
    def wrapper(self: CheckpointWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise self._output_error(exc) from None

    return wrapper  # type: ignore[return-value]


class CheckpointWriter:
    """Writes tensors as an atomic, optionally sharded, safetensors checkpoint (see the module docstring).

    Args:
        output: a folder (Hugging Face layout) or a path ending in ``.safetensors`` (one file).
        max_shard_bytes: shard size limit for folder output.
        overwrite: replace an existing output (and discard an interrupted merge's ``<output>.partial``);
            otherwise an existing output is an error.
        copy_from: a base model folder whose non-weight files (config, tokenizer) are copied.
        metadata: safetensors header metadata (``{"format": "pt"}`` is always set).
        request: a JSON-able description of what is being written (for a merge: method, options, λ,
            the inputs' identities); makes the writer resumable (journal in ``<output>.partial``).
        resume: continue the interrupted write of the same request found in ``<output>.partial``.
        extra_files: more files of a folder output, name → text (e.g. a model card ``README.md``),
            written after the base's copied files (replacing one of the same name).
    """

    def __init__(
        self,
        output: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        copy_from: str | Path | None = None,
        metadata: dict[str, str] | None = None,
        request: Mapping[str, Any] | None = None,
        resume: bool = False,
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        self.output = Path(output)
        self.single_file = self.output.suffix == ".safetensors"
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if resume and request is None:
            raise CheckpointError(f"{self.output}: resuming needs a request description")
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = Path(copy_from) if copy_from is not None and Path(copy_from).is_dir() else None
        self.metadata = {"format": "pt", **(metadata or {})}
        self.request = dict(request) if request is not None else None
        self.request_digest = request_digest(self.request) if self.request is not None else None
        self.resume = resume
        self.extra_files = dict(extra_files or {})
        self.completed: frozenset[str] = frozenset()
        self._lock_fd: int | None = None
        self._keep_partial = False  # a resume refused: the partial folder belongs to another request
        self._keep_on_error = False  # an OutputError after completed shards: keep them for --resume
        self._committing = False
        self._journal: dict[str, Any] | None = None
        self._tmp = partial_path(self.output)  # an unplanned writer's is a fresh temporary folder (below)
        created = False
        try:
            if self.output.exists():
                if not overwrite:
                    raise OutputError(f"{self.output}: output already exists ({option_hint('overwrite')} replaces it)")
                check_replaceable(self.output)
            make_output_parent(self.output)
            if self.request is not None:
                created = not self._tmp.exists()
                self._open_partial(overwrite)
            else:
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        except OSError as exc:
            self._unlock()
            if created:
                shutil.rmtree(self._tmp, ignore_errors=True)
            raise OutputError(f"{exc.filename or self.output}: cannot write the output ({os_error_reason(exc)})") from None
        # unplanned mode
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: set[str] = set()
        # both modes: finished shards (index, names) in order
        self._shards: list[_Shard] = []
        self._total_bytes = 0
        # planned mode
        self._planned: list[_Shard] | None = None
        self._shard_of: dict[str, _Shard] = {}
        self._committed = False

    # ------------------------------------------------------------------ partial folder and journal

    def _open_partial(self, overwrite: bool) -> None:
        tmp = self._tmp
        if tmp.exists() and not self.resume:
            if not overwrite:
                raise CheckpointError(
                    f"{tmp}: an interrupted merge into {self.output} is there; {option_hint('resume')} continues it, "
                    f"{option_hint('overwrite')} starts over"
                )
            self._lock(tmp)
            self._clear_partial()
            return
        if tmp.exists():
            self._lock(tmp)
            journal_path = tmp / JOURNAL_NAME
            journal = None
            if journal_path.is_file():
                try:
                    journal = json.loads(journal_path.read_text())
                except ValueError:
                    journal = None
            if journal is None or journal.get("version") != _JOURNAL_VERSION:
                logger.warning("%s: no readable journal; starting the merge over", tmp)
                self._clear_partial()
                return
            if journal.get("request_digest") != self.request_digest:
                self._unlock()
                changed = sorted(k for k in set(journal.get("request", {})) | set(self.request or {})
                                 if journal.get("request", {}).get(k) != (self.request or {}).get(k))
                raise CheckpointError(
                    f"{tmp}: cannot resume: the interrupted merge was a different request "
                    f"(differs in: {', '.join(changed) or 'request digest'}); rerun it unchanged, "
                    f"or start over with {option_hint('overwrite')} instead of {option_hint('resume')}"
                )
            self._journal = journal
            return
        if self.resume:
            logger.info("%s: nothing to resume; starting the merge", tmp)
        tmp.mkdir(parents=True)
        self._lock(tmp)

    def _lock(self, folder: Path) -> None:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"{folder}: another merge is writing this output") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear_partial(self) -> None:
        for item in self._tmp.iterdir():
            if item.name == ".lock":
                continue
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()

    def _write_journal(self) -> None:
        assert self.request is not None and self._planned is not None
        journal = {
            "version": _JOURNAL_VERSION,
            "output": str(self.output),
            "request_digest": self.request_digest,
            "request": self.request,
            "layout_digest": self._layout_digest,
            "shards_total": len(self._planned),
            "shards": {s.file: {"bytes": s.size, "tensors": sorted(s.entries)} for s in self._shards},
        }
        _write_json_atomic(self._tmp / JOURNAL_NAME, journal)

    def _output_error(self, exc: OSError) -> OutputError:
        """``exc`` as the one-line error of this output; completed shards of a resumable writer are kept
        (before the commit) and the message says how to continue."""
        msg = f"{exc.filename or self._tmp}: cannot write the output ({os_error_reason(exc)})"
        done = len(self._shards)
        if self.request is not None and self._planned is not None and done and not self._committing:
            self._keep_on_error = True
            return OutputError(f"{msg}; {done} of {len(self._planned)} shard(s) are complete in {self._tmp}: "
                               f"fix this and rerun with {option_hint('resume')} to continue")
        return OutputError(msg)

    # ------------------------------------------------------------------ planned mode

    @_output_errors
    def plan(self, tensors: Iterable[tuple[str, Sequence[int], torch.dtype]]) -> frozenset[str]:
        """Fix the shard layout from every tensor's ``(name, shape, dtype)``, in output order.

        Shards fill in the given order exactly as with :meth:`add` alone. Returns the names already
        written by an interrupted merge being resumed (also :attr:`completed`), which must not be added.
        """
        if self._planned is not None or self._pending or self._shards:
            raise CheckpointError(f"{self.output}: plan() must come first, once")
        groups: list[dict[str, _Entry]] = [{}]
        size = 0
        for name, shape, dtype in tensors:
            if any(name in g for g in groups):
                raise CheckpointError(f"{self.output}: tensor {name!r} planned twice")
            nbytes = _nbytes(shape, dtype)
            if not self.single_file and groups[-1] and size + nbytes > self.max_shard_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = _Entry(name, tuple(int(d) for d in shape), dtype, nbytes)
            size += nbytes
        if not groups[-1]:
            raise CheckpointError(f"{self.output}: nothing to write (no tensors were merged)")
        shards = []
        for i, entries in enumerate(groups):
            header, fsize = _layout(entries.values(), self.metadata)
            shards.append(_Shard(i, entries, header, fsize, missing=set(entries)))
        self._planned = shards
        self._shard_of = {name: s for s in shards for name in s.entries}
        self._total_bytes = sum(e.nbytes for s in shards for e in s.entries.values())
        self._layout_digest = hashlib.sha256(b"".join(s.header for s in shards)).hexdigest()
        if self.request is not None:
            self._restore_completed()
        return self.completed

    def _restore_completed(self) -> None:
        assert self._planned is not None
        keep = {".lock", JOURNAL_NAME}
        done: list[_Shard] = []
        if self._journal is not None:
            if self._journal.get("layout_digest") != self._layout_digest:
                self._keep_partial = True
                raise CheckpointError(
                    f"{self._tmp}: cannot resume: the shard layout differs from the interrupted merge's "
                    f"(tensor list, shapes, dtypes or shard size changed); {option_hint('overwrite')} starts over"
                )
            recorded = self._journal.get("shards", {})
            for shard in self._planned:
                info = recorded.get(shard.file)
                path = self._tmp / shard.file
                if info is None:
                    continue
                if info.get("tensors") != sorted(shard.entries) or not path.is_file() or path.stat().st_size != shard.size:
                    logger.warning("%s: damaged or missing; it is written again", path)
                    continue
                shard.missing.clear()
                done.append(shard)
                keep.add(shard.file)
        for item in self._tmp.iterdir():  # shards in progress when interrupted, stale temporaries
            if item.name not in keep:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        self._shards = done
        self.completed = frozenset(n for s in done for n in s.entries)
        if self._journal is not None:
            logger.info("%s: resuming: %d of %d shard(s), %d tensor(s) already written",
                        self._tmp, len(done), len(self._planned), len(self.completed))
        self._write_journal()

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointError(f"{self.output}: tensor {name!r} was not planned")
        if name not in shard.missing:
            raise CheckpointError(f"{self.output}: tensor {name!r} written twice")
        entry = shard.entries[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise CheckpointError(
                f"{self.output}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned as "
                f"{entry.dtype} {list(entry.shape)}"
            )
        path = self._tmp / (shard.file + ".tmp")
        if shard.fd is None:
            shard.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(shard.fd, shard.header, 0)
        if entry.nbytes:
            _pwrite_all(shard.fd, _tensor_bytes(tensor), entry.offset)
        shard.missing.discard(name)
        if not shard.missing:
            self._finish_shard(shard, path)

    def _finish_shard(self, shard: _Shard, path: Path) -> None:
        if shard.fd is None:  # a shard of empty tensors only
            shard.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(shard.fd, shard.header, 0)
        os.ftruncate(shard.fd, shard.size)
        if self.request is not None:
            os.fsync(shard.fd)
        os.close(shard.fd)
        shard.fd = None
        os.replace(path, self._tmp / shard.file)
        self._shards.append(shard)
        self._shards.sort(key=lambda s: s.index)
        if self.request is not None:
            self._write_journal()

    # ------------------------------------------------------------------ both modes

    @_output_errors
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor: at its planned offset (after :meth:`plan`), else queued until a shard is full."""
        if self._planned is not None:
            self._write_planned(name, tensor)
            return
        if self.request is not None:
            raise CheckpointError(f"{self.output}: a resumable writer needs plan() before add()")
        if name in self._written:
            raise CheckpointError(f"{self.output}: tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if not self.single_file and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._written.add(name)
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        shard = _Shard(len(self._shards), {n: _Entry(n, tuple(t.shape), t.dtype, 0) for n, t in self._pending.items()})
        write_safetensors(self._tmp / shard.file, self._pending, self.metadata)
        self._shards.append(shard)
        self._pending = {}
        self._pending_bytes = 0

    @_output_errors
    def commit(self) -> Path:
        """Finish writing and move the output into place; returns the output path."""
        self._committing = True
        if self._planned is not None:
            missing = [n for s in self._planned for n in sorted(s.missing)]
            if missing:
                raise CheckpointError(f"{self.output}: {len(missing)} planned tensor(s) were never written, e.g. {missing[0]!r}")
        else:
            self._flush()
        if not self._shards:
            raise CheckpointError(f"{self.output}: nothing to write (no tensors were merged)")
        if self.single_file:
            if len(self._shards) != 1:
                raise CheckpointError(f"{self.output}: single-file output cannot be sharded")
            final_tmp = self._tmp / self._shards[0].file
        else:
            final_tmp = self._tmp / "out"
            if final_tmp.exists():
                shutil.rmtree(final_tmp)
            final_tmp.mkdir()
            n = len(self._shards)
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(self._shards, start=1):
                fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
                (self._tmp / shard.file).rename(final_tmp / fname)
                weight_map.update({name: fname for name in shard.entries})
            if n > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                (final_tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            if self.copy_from is not None:
                copy_non_weight_files(self.copy_from, final_tmp)
            for fname, text in self.extra_files.items():
                (final_tmp / fname).write_text(text)
            write_manifest(final_tmp)
        self._replace(final_tmp)
        self._committed = True
        self._remove_tmp()
        logger.info("wrote %s (%d shard(s), %.1f MB)", self.output, len(self._shards), self._total_bytes / 1e6)
        return self.output

    def _replace(self, final_tmp: Path) -> None:
        if self.output.exists():
            check_replaceable(self.output)  # again: files may have been added during the merge
            trash = self._tmp / "replaced"
            os.replace(self.output, trash)
        os.replace(final_tmp, self.output)

    def _close_files(self) -> None:
        for shard in self._planned or ():
            if shard.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(shard.fd)
                shard.fd = None

    def _remove_tmp(self) -> None:
        self._close_files()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._unlock()

    def abort(self) -> None:
        """Discard everything written so far (a resumable writer's ``<output>.partial`` included)."""
        self._remove_tmp()

    def _keep_completed(self) -> None:
        self._close_files()
        self._unlock()
        if self.request is not None:
            for item in self._tmp.glob("*.tmp"):
                with contextlib.suppress(OSError):
                    item.unlink()

    def suspend(self) -> None:
        """Leave ``<output>.partial`` (completed shards and journal) for a later ``resume``."""
        self._keep_completed()
        if self.request is not None:
            logger.warning("merge interrupted: %d of %d shard(s) complete in %s; rerun with %s to continue",
                           len(self._shards), len(self._planned or ()), self._tmp, option_hint("resume"))

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._committed:
            return
        if self._keep_partial:
            self._close_files()
            self._unlock()
            return
        if self._keep_on_error and exc_type is not None and issubclass(exc_type, OutputError):
            self._keep_completed()  # the message says how to continue
            return
        resumable = self.request is not None and self._planned is not None
        if resumable and exc_type is not None and not issubclass(exc_type, TaskmergeError):
            self.suspend()  # interrupted (Ctrl-C, a crash in a method, out of memory): keep what is done
        else:
            self.abort()  # bad input or no commit: leave nothing behind
