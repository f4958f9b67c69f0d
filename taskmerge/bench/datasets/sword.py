"""Reader of compressed SWORD Bible and commentary modules (the ``sword-text-*`` / ``sword-comm-*`` Debian packages).

A compressed SWORD module (drivers ``zText``, ``zCom``, ``zCom4``) keeps each testament in three files named
``{ot,nt}.{b,c}z{s,v,z}`` (``b`` for one block per book, ``c`` per chapter):

* ``*.?zs`` — the block index: one little-endian ``(offset, compressed size, uncompressed size)`` uint32
  triple per zlib-compressed block of ``*.?zz``;
* ``*.?zv`` — the entry index, one entry per verse slot of the module's versification, in canonical order:
  ``(block, offset in the uncompressed block, size)`` with a uint16 size (10-byte entries) or a uint32 size
  (12-byte entries; :func:`entry_size` tells which from the files themselves);
* ``*.?zz`` — the compressed blocks.

Entry texts are OSIS XML fragments. A book starts with a ``<div ... osisID="Gen" ... type="book"/>`` marker
in its first entry, so :func:`book_entries` labels every entry with the last book marker before it. Entries
of a commentary that cover several verses are stored once and pointed to by every verse: the reader yields
each stored text once.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from taskmerge.bench.datasets.common import TaskSourceMissing

SWORD_DIR = Path(os.environ.get("TASKMERGE_SWORD_DIR", "/usr/share/sword"))

_BOOK_MARKER = re.compile(r"<div\b[^>]*\btype=\"book\"[^>]*>")
_OSIS_ID = re.compile(r"\bosisID=\"([^\"]+)\"")


def module_dir(relative: str, install: str, root: Path | None = None) -> Path:
    """``<root>/modules/<relative>`` (root: ``$TASKMERGE_SWORD_DIR`` or ``/usr/share/sword``), checked to exist."""
    path = (SWORD_DIR if root is None else root) / "modules" / relative
    if not path.is_dir():
        raise TaskSourceMissing(f"SWORD module {path} not found; install it: {install}")
    return path


def _files(directory: Path, testament: str) -> tuple[Path, Path, Path] | None:
    for kind in ("b", "c", "v"):
        paths = tuple(directory / f"{testament}.{kind}z{ext}" for ext in ("s", "v", "z"))
        if all(p.exists() for p in paths):
            return paths  # type: ignore[return-value]
    return None


def entry_size(index: bytes, blocks: list[tuple[int, int, int]]) -> int:
    """The entry width of a ``*.?zv`` index: 10 (uint16 size) or 12 (uint32 size), whichever divides the file and
    gives entries that all point inside their block; ``ValueError`` if neither does."""
    for width in (10, 12):
        if len(index) % width:
            continue
        fmt = "<IIH" if width == 10 else "<III"
        ok = True
        for block, offset, size in struct.iter_unpack(fmt, index):
            if size and (block >= len(blocks) or offset + size > blocks[block][2]):
                ok = False
                break
        if ok:
            return width
    raise ValueError(f"entry index of {len(index)} bytes is neither 10- nor 12-byte entries of {len(blocks)} blocks")


def testament_entries(directory: Path, testament: str) -> Iterator[str]:
    """The stored entry texts of one testament (``"ot"`` or ``"nt"``) in canonical order, each stored text once."""
    paths = _files(directory, testament)
    if paths is None:
        return
    bzs, bzv, bzz = (p.read_bytes() for p in paths)
    blocks = [tuple(t) for t in struct.iter_unpack("<III", bzs)]
    width = entry_size(bzv, blocks)  # type: ignore[arg-type]
    fmt = "<IIH" if width == 10 else "<III"
    cache: dict[int, bytes] = {}
    seen: set[tuple[int, int]] = set()
    for block, offset, size in struct.iter_unpack(fmt, bzv):
        if not size or (block, offset) in seen:
            continue
        seen.add((block, offset))
        if block not in cache:
            start, csize, _ = blocks[block]
            cache[block] = zlib.decompress(bzz[start : start + csize])
        yield cache[block][offset : offset + size].decode("utf-8", errors="replace")


@lru_cache(maxsize=8)
def book_entries(directory: str) -> tuple[tuple[str, str], ...]:
    """``(OSIS book id, raw OSIS entry)`` for every stored entry of a module, Old then New Testament; entries
    before the first book marker get the book id ``""``."""
    out: list[tuple[str, str]] = []
    book = ""
    for testament in ("ot", "nt"):
        for text in testament_entries(Path(directory), testament):
            for marker in _BOOK_MARKER.findall(text):
                found = _OSIS_ID.search(marker)
                if found:
                    book = found.group(1)
            out.append((book, text))
    if not out:
        raise TaskSourceMissing(f"no SWORD module data under {directory}")
    return tuple(out)
