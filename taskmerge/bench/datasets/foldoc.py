"""Tasks from the Free On-line Dictionary of Computing (Debian package ``dict-foldoc``).

Source: the dictd database ``/usr/share/dictd/foldoc.{index,dict.dz}`` (FOLDOC, 2023-01-19 snapshot), read with
:mod:`.dictd`. An entry is its headword line(s), then paragraphs indented 3 spaces. A sense starts a paragraph
with its subject labels in angle brackets (``<networking, protocol>``) and/or a sense number (``2.``); later
paragraphs of the same sense, references (``[...]``), "See also" lines and the closing date ``(1997-04-12)``
follow. :func:`parse_senses` returns each sense's first paragraph with its labels.

License: GFDL-1.1+ (FOLDOC, Denis Howe; the Debian package documents it as free), see
``/usr/share/doc/dict-foldoc/copyright``.

Task ``foldoc_subject`` — a sense's first paragraph -> its (first) subject label, 8 classes
(:data:`SUBJECTS`); the labels, a pronunciation ``/.../`` and cross-reference braces are removed, the text is
clipped to :data:`MAX_CHARS`. Senses whose entry credits the Jargon File (``[{Jargon File}]``) are left out,
as they are :mod:`.dictionaries`' Jargon File examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from taskmerge.bench.datasets import dictd
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import clip_text

_INSTALL = "apt-get install -y dict-foldoc"
_SOURCE = "Debian package dict-foldoc (FOLDOC 2023-01-19), /usr/share/dictd/foldoc.dict.dz"
_LICENSE = "GFDL-1.1+ (FOLDOC), /usr/share/doc/dict-foldoc/copyright"
MIN_CHARS = 25
MAX_CHARS = 300

SUBJECTS: tuple[str, ...] = (
    "language", "networking", "programming", "operating system", "hardware", "company", "communications",
    "mathematics",
)
SUBJECT_NAMES: tuple[str, ...] = (
    "a programming language", "computer networking", "programming", "operating systems", "computer hardware",
    "a company", "telecommunications", "mathematics",
)
TEMPLATES: tuple[str, ...] = (
    "{}", "a computing dictionary entry about {}.", "a definition from the field of {}.", "a term related to {}.",
    "this entry is about {}.", "a glossary entry on {}.",
)

# [number.] [<labels>] [/pronunciation/] [number.] — every part optional
_SENSE_HEAD = re.compile(
    r"^(?:(?P<n1>\d+)\.\s+)?(?:<(?P<tags>[^<>]{1,60})>\s*)?(?:/[^/\s][^/]{0,40}/,?\s*)?(?:(?P<n2>\d+)\.\s+)?"
)
_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
_BRACES = re.compile(r"[{}]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Sense:
    """The first paragraph of one sense, its subject labels, and whether its entry credits the Jargon File."""

    tags: tuple[str, ...]
    text: str
    jargon_file: bool


def parse_senses(entry: str) -> list[Sense]:
    """The senses of one FOLDOC entry (module docstring). The first paragraph always starts a sense (labelled or
    not); a later paragraph starts one only if it opens with a sense number or a label."""
    jargon_file = "Jargon File" in entry
    out: list[Sense] = []
    for k, para in enumerate(_PARAGRAPH_BREAK.split(entry)[1:]):  # the headword lines come first
        if not para.startswith("   ") or para.startswith("    "):
            continue
        text = " ".join(para.split())
        if not text or _DATE.match(text) or text.startswith(("[", "See also", "Home page", "E-mail")):
            continue
        head = _SENSE_HEAD.match(text)
        assert head is not None  # every group is optional
        if not (k == 0 or head.group("tags") or head.group("n1") or head.group("n2")):
            continue
        tags = tuple(t.strip() for t in (head.group("tags") or "").split(",") if t.strip())
        out.append(Sense(tags, text[head.end():], jargon_file))
    return out


def sense_text(text: str) -> str:
    """A sense paragraph as an example: cross-reference braces removed, clipped to :data:`MAX_CHARS`."""
    return clip_text(_BRACES.sub("", text).strip(), MAX_CHARS)


@lru_cache(maxsize=1)
def senses() -> tuple[Sense, ...]:
    """Every sense of the installed FOLDOC."""
    return tuple(s for _, entry in dictd.entries("foldoc", _INSTALL) for s in parse_senses(entry))


def foldoc_subject(seed: int = 0, protocol: str = "v2") -> TaskData:
    """FOLDOC sense -> subject label, 8 classes (:data:`SUBJECTS`)."""
    groups: dict[str, list[str]] = {s: [] for s in SUBJECTS}
    for sense in senses():
        if sense.tags and sense.tags[0] in groups and not sense.jargon_file:
            groups[sense.tags[0]].append(sense_text(sense.text))
    info = TaskInfo(
        name="foldoc_subject", source=_SOURCE, license=_LICENSE,
        description="FOLDOC sense -> subject label: " + ", ".join(SUBJECTS), install=_INSTALL,
        short_name="FOLDOC", class_names=SUBJECT_NAMES, templates=TEMPLATES,
    )
    return build_task("foldoc_subject", groups, seed, info=info, labels=SUBJECTS, min_chars=MIN_CHARS,
                      protocol=protocol)
