"""Matthew Henry's Concise Commentary on the Whole Bible (Debian package ``sword-comm-mhcc``).

Source: the SWORD module ``MHCC`` under ``/usr/share/sword/modules/comments/zcom/mhcc`` (read with
:mod:`.sword`): one commentary paragraph per passage ("Verses 11-15 Moses boldly owned the cause of God's
people. ..."), 18th-century English prose. Each stored paragraph is one example: passage references
("Verses 11-15", "Verse 3", an outline's "(1-7)") are removed, and the paragraph is clipped to its first
sentences (at most :data:`MAX_CHARS` characters, :func:`~taskmerge.bench.datasets.markup.clip_text`). Book
introductions (entries before a book's first passage) are examples of their book too.

License: public domain (module ``DistributionLicense=Public Domain``; see
``/usr/share/doc/sword-comm-mhcc/copyright``).

Task ``mhcc_section`` — commentary paragraph -> the part of the Bible it comments on, 6 classes
(:data:`SECTIONS`): the Law, the historical books, wisdom and poetry, the prophets (major and minor), the
gospels and Acts, the letters and Revelation. The text is commentary, not scripture, so it shares no
examples with :mod:`.bible`'s tasks.
"""

from __future__ import annotations

import re

from taskmerge.bench.datasets import sword
from taskmerge.bench.datasets.bible import CANON_SECTIONS
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import clip_text, strip_tags

MODULE = "comments/zcom/mhcc"
_INSTALL = "apt-get install -y sword-comm-mhcc"

SECTIONS: tuple[str, ...] = ("law", "history", "wisdom", "prophets", "gospels_acts", "letters_revelation")
_PARTS: dict[str, tuple[str, ...]] = {
    "law": ("law",), "history": ("history",), "wisdom": ("wisdom",),
    "prophets": ("major_prophets", "minor_prophets"), "gospels_acts": ("gospels", "acts"),
    "letters_revelation": ("pauline_epistles", "general_epistles", "revelation"),
}
SECTION_NAMES: tuple[str, ...] = (
    "the Law of Moses", "the history of Israel", "the Psalms and wisdom books", "the prophets",
    "the gospels and the Acts of the Apostles", "the apostles' letters and Revelation",
)
TEMPLATES: tuple[str, ...] = (
    "{}", "a commentary on {}.", "a Bible commentary on a passage from {}.", "notes on {}.",
    "a preacher's explanation of {}.", "this commentary is about {}.",
)
MIN_CHARS = 40
MAX_CHARS = 400
# Passage references: "Verses 1-7", "Verse 3", and the "(1-7)" of chapter outlines.
_REFERENCE = re.compile(r"(?:\b(?:Verses?|Ver\.)\s+\d+(?:\s*[-,]\s*\d+)*[.:]?|\(\d+(?:\s*[-,]\s*\d+)*\))\s*")


def paragraph_text(osis: str) -> str:
    """Plain text of one commentary entry, its passage references removed, clipped to :data:`MAX_CHARS`."""
    text = strip_tags(re.sub(r"<title\b.*?</title>", " ", osis, flags=re.S))
    return clip_text(" ".join(_REFERENCE.sub(" ", text).split()), MAX_CHARS)


def mhcc_section(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Commentary paragraph -> part of the Bible, 6 classes (:data:`SECTIONS`)."""
    section_of = {book: s for s in SECTIONS for part in _PARTS[s] for book in CANON_SECTIONS[part]}
    groups: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for book, osis in sword.book_entries(str(sword.module_dir(MODULE, _INSTALL))):
        if book in section_of:
            groups[section_of[book]].append(paragraph_text(osis))
    info = TaskInfo(
        name="mhcc_section", source="Debian package sword-comm-mhcc (Matthew Henry's Concise Commentary, SWORD MHCC)",
        license="public domain, /usr/share/doc/sword-comm-mhcc/copyright",
        description="Matthew Henry commentary paragraph -> part of the Bible: " + ", ".join(SECTIONS),
        install=_INSTALL, short_name="MHCC", class_names=SECTION_NAMES, templates=TEMPLATES,
    )
    return build_task("mhcc_section", groups, seed, info=info, labels=SECTIONS, min_chars=MIN_CHARS, protocol=protocol)
