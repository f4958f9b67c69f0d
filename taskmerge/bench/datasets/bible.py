"""Tasks from the World English Bible (Debian package ``sword-text-web``).

Source: the SWORD module ``engWEB2015eb`` (World English Bible with Deuterocanon, 2015 edition, OSIS markup
with Strong's numbers) under ``/usr/share/sword/modules/texts/ztext/engWEB2015eb``, read with
:mod:`.sword`. Every verse is one example: footnotes (``<note>``) and headings (``<title>``) are dropped, the
remaining markup stripped.

License: public domain (the World English Bible is not copyrighted; see
``/usr/share/doc/sword-text-web/copyright``).

Tasks (disjoint verse sets; Revelation and the deuterocanonical books are used by neither):

* ``bible_section`` — verse -> the part of the canon its book belongs to, 8 classes (:data:`SECTIONS`): the
  Law (Genesis-Deuteronomy), the historical books (Joshua-Esther), wisdom and poetry (Job-Song of Songs),
  the major prophets (Isaiah-Daniel), the minor prophets (Hosea-Malachi), Acts, Paul's letters
  (Romans-Philemon), the general letters (Hebrews-Jude). The four gospels are left to ``bible_gospel``.
* ``bible_gospel`` — gospel verse -> Matthew, Mark, Luke or John (4 classes).
"""

from __future__ import annotations

import re

from taskmerge.bench.datasets import sword
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import strip_tags

MODULE = "texts/ztext/engWEB2015eb"
_INSTALL = "apt-get install -y sword-text-web"
_LICENSE = "public domain (World English Bible), /usr/share/doc/sword-text-web/copyright"
_SOURCE = "Debian package sword-text-web (World English Bible 2015, SWORD module engWEB2015eb)"

# OSIS book ids of each part of the canon (Protestant order); ``CANON_SECTIONS`` is also used by the commentary
# tasks, which group the first five and the last three more coarsely.
CANON_SECTIONS: dict[str, tuple[str, ...]] = {
    "law": ("Gen", "Exod", "Lev", "Num", "Deut"),
    "history": ("Josh", "Judg", "Ruth", "1Sam", "2Sam", "1Kgs", "2Kgs", "1Chr", "2Chr", "Ezra", "Neh", "Esth"),
    "wisdom": ("Job", "Ps", "Prov", "Eccl", "Song"),
    "major_prophets": ("Isa", "Jer", "Lam", "Ezek", "Dan"),
    "minor_prophets": ("Hos", "Joel", "Amos", "Obad", "Jonah", "Mic", "Nah", "Hab", "Zeph", "Hag", "Zech", "Mal"),
    "gospels": ("Matt", "Mark", "Luke", "John"),
    "acts": ("Acts",),
    "pauline_epistles": ("Rom", "1Cor", "2Cor", "Gal", "Eph", "Phil", "Col", "1Thess", "2Thess", "1Tim", "2Tim",
                         "Titus", "Phlm"),
    "general_epistles": ("Heb", "Jas", "1Pet", "2Pet", "1John", "2John", "3John", "Jude"),
    "revelation": ("Rev",),
}

SECTIONS: tuple[str, ...] = (
    "law", "history", "wisdom", "major_prophets", "minor_prophets", "acts", "pauline_epistles", "general_epistles",
)
SECTION_NAMES: tuple[str, ...] = (
    "the Law of Moses", "the historical books of Israel", "the Psalms and wisdom books", "the major prophets",
    "the minor prophets", "the Acts of the Apostles", "the letters of Paul", "the general letters to the churches",
)
SECTION_TEMPLATES: tuple[str, ...] = (
    "{}", "a verse from {}.", "a Bible verse from {}.", "this passage is from {}.", "scripture from {}.",
    "a quotation from {}.",
)
GOSPELS: tuple[str, ...] = ("Matt", "Mark", "Luke", "John")
GOSPEL_NAMES: tuple[str, ...] = (
    "the Gospel of Matthew", "the Gospel of Mark", "the Gospel of Luke", "the Gospel of John",
)
GOSPEL_TEMPLATES: tuple[str, ...] = (
    "{}", "a verse from {}.", "a passage from {}.", "this verse is from {}.", "a Bible verse from {}.",
)

MIN_CHARS = 20
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)


def verse_text(osis: str) -> str:
    """Plain text of one verse's OSIS: footnotes and headings removed, tags stripped, whitespace collapsed."""
    return strip_tags(_TITLE.sub(" ", _NOTE.sub(" ", osis)))


def verses_by_book() -> dict[str, list[str]]:
    """``{OSIS book id: [verse texts]}`` of the installed World English Bible, in canonical order."""
    out: dict[str, list[str]] = {}
    for book, osis in sword.book_entries(str(sword.module_dir(MODULE, _INSTALL))):
        text = verse_text(osis)
        if text:
            out.setdefault(book, []).append(text)
    return out


def _info(name: str, short: str, description: str, names: tuple[str, ...], templates: tuple[str, ...]) -> TaskInfo:
    return TaskInfo(name=name, source=_SOURCE, license=_LICENSE, description=description, install=_INSTALL,
                    short_name=short, class_names=names, templates=templates)


def bible_section(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Verse -> part of the canon, 8 classes (:data:`SECTIONS`)."""
    books = verses_by_book()
    groups = {s: [v for b in CANON_SECTIONS[s] for v in books.get(b, ())] for s in SECTIONS}
    info = _info("bible_section", "Bible-Sec", "World English Bible verse -> part of the canon: " + ", ".join(SECTIONS),
                 SECTION_NAMES, SECTION_TEMPLATES)
    return build_task("bible_section", groups, seed, info=info, labels=SECTIONS, min_chars=MIN_CHARS,
                      protocol=protocol)


def bible_gospel(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Gospel verse -> which gospel, 4 classes (:data:`GOSPELS`)."""
    books = verses_by_book()
    groups = {g: list(books.get(g, ())) for g in GOSPELS}
    info = _info("bible_gospel", "Gospel", "World English Bible gospel verse -> Matthew, Mark, Luke or John",
                 GOSPEL_NAMES, GOSPEL_TEMPLATES)
    return build_task("bible_gospel", groups, seed, info=info, labels=GOSPELS, min_chars=MIN_CHARS, protocol=protocol)
