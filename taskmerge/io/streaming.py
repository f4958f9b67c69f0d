"""Reading safetensors tensors with ``pread`` instead of a memory map, for streaming merges.

``safetensors.safe_open`` memory-maps each file and its tensors are read through the map: every page a
merge touches stays mapped into the process until the file is closed, so the resident set (``RSS``,
what ``ru_maxrss``, ``top`` and container memory limits see) grows to the size of all the inputs read,
even though the engine holds one tensor at a time. :class:`PreadReader` wraps a
:class:`~taskmerge.io.readers.CheckpointReader` and reads each safetensors tensor with ``os.preadv``
straight into a freshly allocated torch buffer: one copy, no map, and the memory is returned when the
tensor is freed. Names, shapes, dtypes and error messages stay the wrapped reader's; PyTorch ``.bin``
files are still read by it. Safe to call from several threads (``pread`` has no file position).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from taskmerge.errors import CheckpointError
from taskmerge.io.readers import SAFETENSORS_DTYPES, CheckpointReader

__all__ = ["PreadReader", "streaming_source"]

_MAX_READ = 1 << 30


class PreadReader:
    """A :class:`~taskmerge.io.readers.TensorSource` reading safetensors tensors with ``pread``."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.label = reader.label
        self.files = reader.files
        self._index: dict[str, tuple[str, int, int, tuple[int, ...], torch.dtype]] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        for path in reader.files:
            if Path(path).suffix == ".safetensors":
                self._read_header(Path(path))

    def _read_header(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            return  # leave it to the wrapped reader (and its error messages)
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                continue
            begin, end = info["data_offsets"]
            self._index[name] = (str(path), start + begin, end - begin, tuple(info["shape"]), dtype)

    def keys(self) -> list[str]:
        return self.reader.keys()

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.reader.meta(name)

    def location(self, name: str) -> str:
        return self.reader.location(name)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
                    self._fds[path] = fd
        return fd

    def get(self, name: str) -> torch.Tensor:
        entry = self._index.get(name)
        if entry is None or self.reader.location(name) != entry[0]:
            return self.reader.get(name)
        path, offset, nbytes, shape, dtype = entry
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            fd = self._fd(path)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{path}: tensor {name!r} cannot be read (file truncated)")
                done += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.reader.close()

    def __getattr__(self, attr: str) -> Any:  # other reader attributes pass through
        if attr == "reader":
            raise AttributeError(attr)
        return getattr(self.reader, attr)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def streaming_source(source: Any) -> Any:
    """Wrap a :class:`~taskmerge.io.readers.CheckpointReader` in a :class:`PreadReader`; other sources as is."""
    return PreadReader(source) if isinstance(source, CheckpointReader) else source
