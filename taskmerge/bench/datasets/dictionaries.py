"""Which dictionary a definition comes from, over four dictd databases (Debian packages ``dict-gcide``,
``dict-foldoc``, ``dict-jargon``, ``dict-devil``).

Sources, read with :mod:`.dictd`:

* ``webster`` — GCIDE (Webster's Revised Unabridged Dictionary of 1913 and supplements): the second and later
  senses of a block that carry no field label (:func:`taskmerge.bench.datasets.gcide.parse_blocks`), so no text
  is shared with the ``gcide_*`` tasks (which use first senses, labelled senses and quotations);
* ``foldoc`` — FOLDOC: senses whose subject label is not one of ``foldoc_subject``'s classes (or that have
  none), and that do not come from the Jargon File;
* ``jargon`` — the Jargon File 4.4.7 (``jargon.dict.dz``): the first paragraph of each entry's definition, a
  leading bracketed usage note (``[common]``, ``[from ...]``) removed;
* ``devil`` — Ambrose Bierce's *The Devil's Dictionary* (1911, ``devil.dict.dz``): the first paragraph of each
  entry, its ``WORD, n.`` head removed.

Every text is clipped to :data:`MAX_CHARS`; cross-reference braces are removed.

Licenses: GPL-2+ (GCIDE), GFDL-1.1+ (FOLDOC), public domain (Jargon File, Devil's Dictionary); see
``/usr/share/doc/dict-{gcide,foldoc,jargon,devil}/copyright``.

Task ``dict_source`` — definition -> its dictionary, 4 classes (:data:`SOURCES`): a question of register and
period (1913 lexicography, computing reference, hacker slang, satire) more than of topic.
"""

from __future__ import annotations

import re

from taskmerge.bench.datasets import dictd, foldoc, gcide
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import clip_text

SOURCES: tuple[str, ...] = ("webster", "foldoc", "jargon", "devil")
SOURCE_NAMES: tuple[str, ...] = (
    "Webster's dictionary of 1913", "a dictionary of computing", "the hacker's Jargon File",
    "Ambrose Bierce's satirical Devil's Dictionary",
)
TEMPLATES: tuple[str, ...] = (
    "{}", "a definition from {}.", "an entry in {}.", "this definition comes from {}.", "quoted from {}.",
    "a word as defined in {}.",
)
_INSTALL = "apt-get install -y dict-gcide dict-foldoc dict-jargon dict-devil"
MIN_CHARS = 25
MAX_CHARS = 300

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_DEVIL_HEAD = re.compile(r"^[^,\n]{1,40},\s*(?:[a-z]{1,5}\.\s*){1,3}")
_LEADING_NOTE = re.compile(r"^\[[^\]]*\]\s*")


def jargon_definition(entry: str) -> str:
    """The first definition paragraph of a Jargon File entry (after the headword and part-of-speech lines)."""
    paragraphs = [" ".join(p.split()) for p in _PARAGRAPH_BREAK.split(entry)[1:]]
    first = next((p for p in paragraphs if p), "")
    return _LEADING_NOTE.sub("", first).replace("{", "").replace("}", "")


def devil_definition(entry: str) -> str:
    """The first paragraph of a Devil's Dictionary entry without its ``WORD, n.`` head ('' if it has none)."""
    first = " ".join(_PARAGRAPH_BREAK.split(entry.strip())[0].split())
    head = _DEVIL_HEAD.match(first)
    return first[head.end():] if head else ""


def source_texts() -> dict[str, list[str]]:
    """``{source: [definition texts]}`` for :data:`SOURCES` (module docstring)."""
    webster = [gcide.definition_text(t) for b in gcide.blocks() for label, t in b.senses[1:] if not label]
    subjects = set(foldoc.SUBJECTS)
    folds = [foldoc.sense_text(s.text) for s in foldoc.senses()
             if not s.jargon_file and not (s.tags and s.tags[0] in subjects)]
    jargon = [clip_text(jargon_definition(e), MAX_CHARS) for _, e in dictd.entries("jargon", _INSTALL)]
    devil = [clip_text(devil_definition(e), MAX_CHARS) for _, e in dictd.entries("devil", _INSTALL)]
    return {"webster": webster, "foldoc": folds, "jargon": jargon, "devil": devil}


def dict_source(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Definition -> source dictionary, 4 classes (:data:`SOURCES`)."""
    info = TaskInfo(
        name="dict_source",
        source="Debian packages dict-gcide, dict-foldoc, dict-jargon, dict-devil (/usr/share/dictd)",
        license="GPL-2+ (GCIDE), GFDL-1.1+ (FOLDOC), public domain (Jargon File, Devil's Dictionary)",
        description="definition -> dictionary: " + ", ".join(SOURCES), install=_INSTALL,
        short_name="DictSrc", class_names=SOURCE_NAMES, templates=TEMPLATES,
    )
    return build_task("dict_source", source_texts(), seed, info=info, labels=SOURCES, min_chars=MIN_CHARS,
                      protocol=protocol)
