"""C. H. Spurgeon's *Treasury of David* (Debian package ``sword-comm-tdavid``).

Source: the SWORD module ``TDavid`` under ``/usr/share/sword/modules/comments/zcom/tdavid`` (read with
:mod:`.sword`), a commentary on the Psalms (1869-1885). Each psalm's commentary is divided into sections
with fixed headings; the paragraphs (``<div type="x-p">``) under a heading are the examples of its class:

* ``exposition`` — "EXPOSITION" (Spurgeon's own verse-by-verse exposition);
* ``notes`` — "EXPLANATORY NOTES AND QUAINT SAYINGS" (excerpts from other, mostly Puritan, writers);
* ``hints`` — "HINTS TO THE VILLAGE PREACHER" / "HINTS TO PREACHERS" (sermon outlines).

Other headings are skipped: the psalm's own heading, lists of works on a psalm, and the introductory
"TITLE.", "SUBJECT.", "DIVISION." (under 200 paragraphs in all, too few for a class). Verse labels ("Ver. 12.",
"Verse 3."), enumerators ("1.", "(a)") and the attributions that end most excerpts ("Richard Greenham,
1531-1591.", "T. Manton.") are removed so that the task is about the register of the prose, not its
bookkeeping; paragraphs are clipped to their first sentences (:data:`MAX_CHARS`), and fragments shorter than
:data:`MIN_CHARS` (the source breaks some paragraphs mid-sentence) are dropped.

License: public domain (module ``DistributionLicense=Public Domain``; see
``/usr/share/doc/sword-comm-tdavid/copyright``).

Task ``tdavid_section`` — paragraph -> the section of the commentary it belongs to, 3 classes (:data:`SECTIONS`).
"""

from __future__ import annotations

import re

from taskmerge.bench.datasets import sword
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import clip_text, strip_tags

MODULE = "comments/zcom/tdavid"
_INSTALL = "apt-get install -y sword-comm-tdavid"

SECTIONS: tuple[str, ...] = ("exposition", "notes", "hints")
HEADINGS: dict[str, str] = {
    "EXPOSITION": "exposition", "EXPLANATORY NOTES AND QUAINT SAYINGS": "notes",
    "HINTS TO THE VILLAGE PREACHER": "hints", "HINTS TO PREACHERS": "hints",
}
SECTION_NAMES: tuple[str, ...] = (
    "an exposition explaining the verse",
    "a quotation from an old writer on the verse", "an outline for a sermon",
)
TEMPLATES: tuple[str, ...] = (
    "{}", "this paragraph is {}.", "a commentary paragraph: {}.", "from a commentary on the Psalms, {}.",
    "a passage that is {}.",
)
MIN_CHARS = 40
MAX_CHARS = 400

_PIECE = re.compile(r"(<title\b[^>]*>.*?</title>|<div\b[^>]*\btype=\"x-p\"[^>]*/>)", re.S)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_LEAD = re.compile(r"^(?:(?:[Vv]er(?:se)?s?\.?\s+\d+(?:\s*[-,]\s*\d+)*\.?|\(?(?:\d{1,3}|[a-z])[.)])\s*)+")
_NAME = r"(?:[A-Z][\w'\u2019-]*\.?,?\s+){0,5}[A-Z][\w'\u2019-]*"
# "Richard Greenham, 1531-1591." / "T. Manton." / a bare "Matthew Henry." after a sentence end.
_ATTRIBUTIONS = (
    re.compile(r"\s+" + _NAME + r",?\s+(?:in\s+[^.]{1,80}?,?\s+)?\d{4}(?:\s*[-\u2013]\s*\d{2,4})?\.?\s*$"),
    re.compile(r"\s+(?:[A-Z]\.\s*){1,3}[A-Z][\w'\u2019-]+\.\s*$"),
    re.compile(r"(?<=[.!?\"\u201d])\s+(?:[A-Z][\w'\u2019-]+\s+){0,3}[A-Z][\w'\u2019-]+\.\s*$"),
)


def section_paragraphs() -> dict[str, list[str]]:
    """``{section: [paragraph texts]}`` over every psalm of the installed module (cleaned, not yet clipped)."""
    groups: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for _, osis in sword.book_entries(str(sword.module_dir(MODULE, _INSTALL))):  # one entry per psalm
        section: str | None = None
        for piece in _PIECE.split(osis):
            title = _TITLE.fullmatch(piece.strip())
            if title:
                section = HEADINGS.get(strip_tags(title.group(1)).rstrip(". ").upper())
                continue
            if section is None or piece.startswith("<div"):
                continue
            text = clean_paragraph(strip_tags(piece))
            if text:
                groups[section].append(text)
    return groups


def clean_paragraph(text: str) -> str:
    """A paragraph without its leading verse label or enumerator and its trailing attribution."""
    text = _LEAD.sub("", text)
    for pattern in _ATTRIBUTIONS:
        text = pattern.sub("", text)
    return text.strip()


def tdavid_section(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Treasury of David paragraph -> commentary section, 3 classes (:data:`SECTIONS`)."""
    groups = {s: [clip_text(t, MAX_CHARS) for t in texts] for s, texts in section_paragraphs().items()}
    info = TaskInfo(
        name="tdavid_section",
        source="Debian package sword-comm-tdavid (Spurgeon, The Treasury of David, SWORD TDavid)",
        license="public domain, /usr/share/doc/sword-comm-tdavid/copyright",
        description="Treasury of David paragraph -> commentary section: " + ", ".join(SECTIONS),
        install=_INSTALL, short_name="TDavid", class_names=SECTION_NAMES, templates=TEMPLATES,
    )
    return build_task("tdavid_section", groups, seed, info=info, labels=SECTIONS, min_chars=MIN_CHARS,
                      protocol=protocol)
