"""Reader of dictd databases (the ``dict-*`` Debian packages: ``dict-gcide``, ``dict-foldoc``, ``dict-jargon``,
``dict-devil``).

A database is ``/usr/share/dictd/<name>.index`` plus ``<name>.dict.dz`` (dictzip, a gzip file readable as
one stream). Each index line is ``headword<TAB>offset<TAB>length`` with offset and length in dictd's base-64
digits (``A-Z a-z 0-9 + /``, most significant first) into the uncompressed text. Several headwords may point
to the same entry; :func:`entries` yields each stored entry once, in file order, without the ``00-database-*``
metadata entries.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

from taskmerge.bench.datasets.common import TaskSourceMissing

DICTD_DIR = Path(os.environ.get("TASKMERGE_DICTD_DIR", "/usr/share/dictd"))

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64_number(digits: str) -> int:
    """The value of a dictd base-64 number (``"B"`` = 1, ``"BA"`` = 64)."""
    value = 0
    for c in digits:
        try:
            value = value * 64 + _B64[c]
        except KeyError:
            raise ValueError(f"{digits!r} is not a dictd base-64 number") from None
    return value


@lru_cache(maxsize=8)
def entries(name: str, install: str, root: str = str(DICTD_DIR)) -> tuple[tuple[str, str], ...]:
    """``(headword, entry text)`` of every entry of database ``name``, each stored entry once, in file order;
    :class:`TaskSourceMissing` naming ``install`` if the database is absent."""
    index = Path(root) / f"{name}.index"
    data = Path(root) / f"{name}.dict.dz"
    if not index.exists() or not data.exists():
        raise TaskSourceMissing(f"dictd database {data} not found; install it: {install}")
    raw = gzip.decompress(data.read_bytes())
    spans: dict[tuple[int, int], str] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        span = (b64_number(parts[1]), b64_number(parts[2]))
        spans.setdefault(span, parts[0])
    return tuple(
        (head, raw[start : start + length].decode("utf-8", errors="replace"))
        for (start, length), head in sorted(spans.items())
    )
