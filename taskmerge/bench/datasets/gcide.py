"""Tasks from the GNU Collaborative International Dictionary of English (Debian package ``dict-gcide``).

Source: the dictd database ``/usr/share/dictd/gcide.{index,dict.dz}`` (GCIDE 0.48, built on Webster's Revised
Unabridged Dictionary of 1913 with later supplements), read with :mod:`.dictd`. An entry holds one or more
blocks, each a head line (``Abuse \\A*buse"\\, n. [F. abus ...]``: word, pronunciation, part of speech,
etymology) and indented paragraphs: senses (``1.``, ``2.``, optionally a field label such as ``(Zool.)`` and
usage labels such as ``[Obs.]``), quotations illustrating a sense (indented further, ending with a citation
``--Milton.``), and notes (``Syn:``, ``Usage:``, ``Note:``) that no task uses. :func:`parse_blocks` splits
this structure.

License: GPL-2+ (GCIDE; Webster's 1913 text is public domain), see ``/usr/share/doc/dict-gcide/copyright``.

Tasks (disjoint texts: quotations only in the author tasks; a field-labelled sense only in the field tasks;
the first unlabelled sense of a block only in ``gcide_pos`` or, prefixed with its word, ``gcide_origin``):

* ``gcide_field`` — sense with a field label -> the field, 8 classes (:data:`FIELDS_A`: zoology, botany, law,
  medicine, nautical, anatomy, chemistry, music); the label itself is removed from the text.
* ``gcide_field_b`` — the same over 8 other fields (:data:`FIELDS_B`).
* ``gcide_author`` — quotation -> its cited author, 8 classes (:data:`AUTHORS_A`: Shakespeare, Milton,
  Chaucer, Dryden, Spenser, Bacon, Pope, Macaulay); the citation is removed.
* ``gcide_author_b`` — the same over 8 other authors (:data:`AUTHORS_B`).
* ``gcide_pos`` — first sense of a block without a field label nor a listed etymology -> the block's part of
  speech, 5 classes (noun, adjective, adverb, transitive verb, intransitive verb).
* ``gcide_origin`` — ``"word: first sense"`` of a block whose etymology starts with a listed language
  (``[F. abus, L. abusus ...]`` -> French; a leading "Cf.", "fr.", "Prob." is skipped) -> that language, 6
  classes (:data:`ORIGINS`: Latin incl. Late and New Latin, French incl. Old French, Greek, Old English
  (``AS.``/``OE.``), Italian, Spanish).

Definition texts are the sense's first sentences (at most :data:`MAX_CHARS` characters) with cross-reference
braces, bracketed labels, inline citations and the examples after ``; as,`` removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from taskmerge.bench.datasets import dictd
from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task
from taskmerge.bench.datasets.markup import clip_text

_INSTALL = "apt-get install -y dict-gcide"
_LICENSE = "GPL-2+ (GCIDE; Webster 1913 public domain), /usr/share/doc/dict-gcide/copyright"
_SOURCE = "Debian package dict-gcide (GCIDE 0.48), /usr/share/dictd/gcide.dict.dz"
MIN_CHARS = 25
MAX_CHARS = 300

# Field label (as printed, after normalising "Zo[\"o]l." to "Zool.") -> class.
FIELD_LABELS: dict[str, str] = {
    "Zool.": "zoology", "Bot.": "botany", "Law": "law", "Med.": "medicine", "Naut.": "nautical",
    "Anat.": "anatomy", "Chem.": "chemistry", "Mus.": "music",
    "Arch.": "architecture", "Mil.": "military", "Math.": "mathematics", "Geom.": "mathematics",
    "Astron.": "astronomy", "Her.": "heraldry", "Gram.": "grammar", "Mech.": "mechanics", "Mach.": "mechanics",
    "Min.": "mineralogy",
}
FIELDS_A: tuple[str, ...] = ("zoology", "botany", "law", "medicine", "nautical", "anatomy", "chemistry", "music")
FIELDS_B: tuple[str, ...] = (
    "architecture", "military", "mathematics", "astronomy", "heraldry", "grammar", "mechanics", "mineralogy",
)
FIELD_NAMES: dict[str, str] = {
    "zoology": "zoology and animals", "botany": "botany and plants", "law": "law", "medicine": "medicine",
    "nautical": "ships and sailing", "anatomy": "anatomy", "chemistry": "chemistry", "music": "music",
    "architecture": "architecture and building", "military": "the military and warfare", "mathematics": "mathematics",
    "astronomy": "astronomy", "heraldry": "heraldry and coats of arms", "grammar": "grammar",
    "mechanics": "mechanics and machines", "mineralogy": "minerals and mineralogy",
}
FIELD_TEMPLATES: tuple[str, ...] = (
    "{}", "a dictionary definition from {}.", "a term used in {}.", "the meaning of a word in {}.",
    "a definition in the field of {}.", "an old dictionary entry about {}.",
)

# Citation (text after "--", up to the first comma, trailing period dropped) -> class.
AUTHOR_CITATIONS: dict[str, str] = {
    "Shak": "shakespeare", "Milton": "milton", "Chaucer": "chaucer", "Dryden": "dryden", "Spenser": "spenser",
    "Bacon": "bacon", "Pope": "pope", "Macaulay": "macaulay",
    "Addison": "addison", "Tennyson": "tennyson", "Swift": "swift", "Locke": "locke", "Burke": "burke",
    "Cowper": "cowper", "Coleridge": "coleridge", "Longfellow": "longfellow",
}
AUTHORS_A: tuple[str, ...] = ("shakespeare", "milton", "chaucer", "dryden", "spenser", "bacon", "pope", "macaulay")
AUTHORS_B: tuple[str, ...] = ("addison", "tennyson", "swift", "locke", "burke", "cowper", "coleridge", "longfellow")
AUTHOR_NAMES: dict[str, str] = {
    "shakespeare": "William Shakespeare", "milton": "John Milton", "chaucer": "Geoffrey Chaucer",
    "dryden": "John Dryden", "spenser": "Edmund Spenser", "bacon": "Francis Bacon", "pope": "Alexander Pope",
    "macaulay": "Thomas Babington Macaulay", "addison": "Joseph Addison", "tennyson": "Alfred Tennyson",
    "swift": "Jonathan Swift", "locke": "John Locke", "burke": "Edmund Burke", "cowper": "William Cowper",
    "coleridge": "Samuel Taylor Coleridge", "longfellow": "Henry Wadsworth Longfellow",
}
AUTHOR_TEMPLATES: tuple[str, ...] = (
    "{}", "a quotation from {}.", "words written by {}.", "a line by {}.", "from the works of {}.",
    "as {} wrote.",
)

POS_OF_HEAD: dict[str, str] = {
    "n.": "noun", "a.": "adjective", "adj.": "adjective", "adv.": "adverb", "v. t.": "verb_transitive",
    "v. i.": "verb_intransitive",
}
POS_LABELS: tuple[str, ...] = ("noun", "adjective", "adverb", "verb_transitive", "verb_intransitive")
POS_NAMES: tuple[str, ...] = (
    "a noun, naming a thing", "an adjective, describing a thing", "an adverb, describing how something is done",
    "a transitive verb, an action done to something", "an intransitive verb, an action or state with no object",
)
POS_TEMPLATES: tuple[str, ...] = (
    "{}", "the definition of {}.", "a dictionary definition of {}.", "this word is {}.", "the meaning of {}.",
)

# Leading language abbreviation of an etymology -> class (Webster's "OE." is Old/Middle English).
ORIGIN_OF_ABBREVIATION: dict[str, str] = {
    "L": "latin", "LL": "latin", "NL": "latin", "F": "french", "OF": "french", "Gr": "greek", "AS": "english",
    "OE": "english", "It": "italian", "Sp": "spanish",
}
ORIGINS: tuple[str, ...] = ("latin", "french", "greek", "english", "italian", "spanish")
ORIGIN_NAMES: tuple[str, ...] = (
    "Latin", "French", "Greek", "Old English (Anglo-Saxon)", "Italian", "Spanish",
)
ORIGIN_TEMPLATES: tuple[str, ...] = (
    "{}", "a word borrowed from {}.", "an English word of {} origin.", "this word comes from {}.",
    "the etymology of this word is {}.",
)
_ORIGIN = re.compile(r"^(?:(?:Cf|fr|From|Prob|Perh|Probably|Perhaps)\.?,?\s+)*(?P<lang>[A-Z][A-Za-z]{0,2})\.\s")

_HEAD = re.compile(r"^(?P<word>[^\s\\][^\\\n]*?)\s+\\[^\\\n]*\\,?\s*(?:\([^()\n]*\),?\s*)?(?P<pos>[^\[\n]*)")
_NUMBER = re.compile(r"^(?:\d+\.\s*)?(?:\([a-z]\)\s*)?")
_FIELD = re.compile(r"^\((?P<field>[A-Z][^()]{0,30})\)\s*,?\s*")
_CITATION = re.compile(r"--\s*(?P<author>[A-Z][^\n]*?)\s*$")
_INLINE_CITATION = re.compile(r"\s*--\s*(?:[A-Z][\w'.]*\s?){1,4}(?:[\w.]*\s?[ivxlc\d]+\.)*")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_ESCAPE = re.compile(r"\[(?:[\"=^'`~-](?P<a>[A-Za-z])|(?P<b>[A-Za-z])\^|(?P<c>ae|oe|AE|OE|imac|aum|yogh))\]")
_EXAMPLES = re.compile(r";\s+as,\s.*$", re.S)
_SOURCE_LINE = re.compile(r"\n[ \t]*\[[^\]\n]*\][ \t]*(?=\n|$)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_UNINDENTED = re.compile(r"\n(?=\S)")
_HEAD_LINE = re.compile(r"^[^\s\\][^\\\n]*\\[^\\\n]*\\[^\n]*", re.M)
_POS_FIELD = re.compile(r"^(?P<pos>[^(]*?)\s*\((?P<field>[A-Z][^()]{0,30})\)")


@dataclass(frozen=True)
class Block:
    """One head line of an entry and its paragraphs: the head's word, part of speech and etymology (the text
    of its ``[...]``, ``""`` if none), ``senses`` (in order, as ``(field label or "", text)``) and ``quotes``
    (``(citation, text)``)."""

    word: str
    pos: str
    etymology: str
    senses: tuple[tuple[str, str], ...]
    quotes: tuple[tuple[str, str], ...]


def _unescape(text: str) -> str:
    """GCIDE's accent notation (``["o]``, ``[=a]``, ``[-u]``, ``[u^]``, ``[ae]``, ``[imac]``) reduced to its
    letters; other brackets (``[Obs.]``, etymologies) are left alone."""
    return _ESCAPE.sub(lambda m: m.group("a") or m.group("b") or m.group("c"), text)


def parse_blocks(entry: str) -> list[Block]:
    """The head-line blocks of one GCIDE entry with their senses and quotations (module docstring).

    Bare source tags (``[1913 Webster]``) are dropped; a paragraph indented 3 spaces is a sense (``Syn:``,
    ``Usage:``, ``Note:`` and ``{phrase}`` paragraphs excepted), one indented 8 or more whose last line ends
    with a ``--`` citation is a quotation. A field label on the head line (``n. (Zool.)``) belongs to the
    first sense when that sense has none of its own."""
    entry = _SOURCE_LINE.sub("", _unescape(entry))
    heads = list(_HEAD_LINE.finditer(entry))
    out: list[Block] = []
    for k, head_match in enumerate(heads):
        head = _HEAD.match(head_match.group(0))
        if head is None:
            continue
        end = heads[k + 1].start() if k + 1 < len(heads) else len(entry)
        body_start = head_match.end()
        etymology = ""
        bracket = head_match.group(0).find("[")
        if bracket >= 0:  # [inflections] [etymology], either of which may run on over the next lines
            open_at = head_match.start() + bracket
            while open_at >= 0:
                close = entry.find("]", open_at, end)
                close = end if close < 0 else close
                etymology = " ".join(entry[open_at + 1 : close].split())
                after = close + 1
                while after < end and entry[after] in " \t\n":
                    after += 1
                open_at = after if after < end and entry[after] == "[" else -1
            line_end = entry.find("\n", close)
            body_start = max(body_start, end if line_end < 0 else min(line_end, end))
        senses: list[tuple[str, str]] = []
        quotes: list[tuple[str, str]] = []
        for para in _PARAGRAPH_BREAK.split(entry[body_start:end]):
            para = _UNINDENTED.split(para.strip("\n"), 1)[0]  # an unrecognised head line ends the paragraph
            stripped = para.lstrip(" ")
            if not stripped:
                continue
            indent = len(para) - len(stripped)
            if indent >= 8:
                body, _, last = para.rpartition("\n")
                cited = _CITATION.search(last)
                if cited:
                    quotes.append((cited.group("author"), " ".join(f"{body} {last[: cited.start()]}".split())))
                continue
            if indent != 3 or stripped.startswith(("Syn:", "Usage:", "Note:", "{", "[")):
                continue
            text = _NUMBER.sub("", " ".join(stripped.split()))
            field = _FIELD.match(text)
            senses.append((field.group("field"), _NUMBER.sub("", text[field.end():])) if field else ("", text))
        pos = head.group("pos").strip().rstrip(",")
        head_field = _POS_FIELD.match(pos)
        if head_field:
            pos = head_field.group("pos").strip().rstrip(",")
            if senses and not senses[0][0]:
                senses[0] = (head_field.group("field"), senses[0][1])
        out.append(Block(head.group("word"), pos, etymology, tuple(senses), tuple(quotes)))
    return out


def definition_text(text: str) -> str:
    """A sense's text as an example: examples after ``; as,``, inline citations, bracketed labels and braces
    removed, whitespace collapsed, clipped to :data:`MAX_CHARS`."""
    text = _EXAMPLES.sub("", text)
    text = _INLINE_CITATION.sub(" ", text)
    text = _BRACKETS.sub(" ", text).replace("{", "").replace("}", "")
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:])", r"\1", text).strip(" ;,")
    return clip_text(text, MAX_CHARS)


def quote_text(text: str) -> str:
    """A quotation as an example: braces and bracketed editorial notes removed, clipped to :data:`MAX_CHARS`."""
    text = _BRACKETS.sub(" ", text).replace("{", "").replace("}", "")
    return clip_text(" ".join(text.split()), MAX_CHARS)


def author_of(citation: str) -> str | None:
    """The class of a citation (``"Shak."``, ``"Milton, P. L."`` -> shakespeare, milton), ``None`` if not listed."""
    return AUTHOR_CITATIONS.get(citation.split(",")[0].strip().rstrip("."))


def origin_of(etymology: str) -> str | None:
    """The class of an etymology's leading language (``"F. abus, L. abusus"`` -> french), ``None`` if unlisted."""
    found = _ORIGIN.match(etymology + " ")
    return ORIGIN_OF_ABBREVIATION.get(found.group("lang")) if found else None


@lru_cache(maxsize=1)
def blocks() -> tuple[Block, ...]:
    """Every block of the installed GCIDE."""
    return tuple(b for _, entry in dictd.entries("gcide", _INSTALL) for b in parse_blocks(entry))


def _info(name: str, short: str, description: str, names: tuple[str, ...], templates: tuple[str, ...]) -> TaskInfo:
    return TaskInfo(name=name, source=_SOURCE, license=_LICENSE, description=description, install=_INSTALL,
                    short_name=short, class_names=names, templates=templates)


def _field_task(name: str, short: str, fields: tuple[str, ...], seed: int, protocol: str) -> TaskData:
    groups: dict[str, list[str]] = {f: [] for f in fields}
    for block in blocks():
        for label, text in block.senses:
            field = FIELD_LABELS.get(label)
            if field in groups:
                groups[field].append(definition_text(text))
    info = _info(name, short, "GCIDE sense with a field label -> the field: " + ", ".join(fields),
                 tuple(FIELD_NAMES[f] for f in fields), FIELD_TEMPLATES)
    return build_task(name, groups, seed, info=info, labels=fields, min_chars=MIN_CHARS, protocol=protocol)


def _author_task(name: str, short: str, authors: tuple[str, ...], seed: int, protocol: str) -> TaskData:
    groups: dict[str, list[str]] = {a: [] for a in authors}
    for block in blocks():
        for citation, text in block.quotes:
            author = author_of(citation)
            if author in groups:
                groups[author].append(quote_text(text))
    info = _info(name, short, "GCIDE quotation -> cited author: " + ", ".join(authors),
                 tuple(AUTHOR_NAMES[a] for a in authors), AUTHOR_TEMPLATES)
    return build_task(name, groups, seed, info=info, labels=authors, min_chars=MIN_CHARS, protocol=protocol)


def gcide_field(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Field-labelled sense -> field, 8 classes (:data:`FIELDS_A`)."""
    return _field_task("gcide_field", "GCIDE-Field", FIELDS_A, seed, protocol)


def gcide_field_b(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Field-labelled sense -> field, 8 classes disjoint from ``gcide_field`` (:data:`FIELDS_B`)."""
    return _field_task("gcide_field_b", "GCIDE-Field-B", FIELDS_B, seed, protocol)


def gcide_author(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Quotation -> cited author, 8 classes (:data:`AUTHORS_A`)."""
    return _author_task("gcide_author", "GCIDE-Auth", AUTHORS_A, seed, protocol)


def gcide_author_b(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Quotation -> cited author, 8 classes disjoint from ``gcide_author`` (:data:`AUTHORS_B`)."""
    return _author_task("gcide_author_b", "GCIDE-Auth-B", AUTHORS_B, seed, protocol)


def gcide_pos(seed: int = 0, protocol: str = "v2") -> TaskData:
    """First unlabelled sense of a block -> the block's part of speech, 5 classes (:data:`POS_LABELS`)."""
    groups: dict[str, list[str]] = {p: [] for p in POS_LABELS}
    for block in blocks():
        pos = POS_OF_HEAD.get(block.pos)
        if pos is not None and block.senses and not block.senses[0][0] and origin_of(block.etymology) is None:
            groups[pos].append(definition_text(block.senses[0][1]))
    info = _info("gcide_pos", "GCIDE-POS", "GCIDE first unlabelled sense -> part of speech: " + ", ".join(POS_LABELS),
                 POS_NAMES, POS_TEMPLATES)
    return build_task("gcide_pos", groups, seed, info=info, labels=POS_LABELS, min_chars=MIN_CHARS, protocol=protocol)


def gcide_origin(seed: int = 0, protocol: str = "v2") -> TaskData:
    """``word: first sense`` of a block whose etymology starts with a listed language -> that language,
    6 classes (:data:`ORIGINS`)."""
    groups: dict[str, list[str]] = {o: [] for o in ORIGINS}
    for block in blocks():
        origin = origin_of(block.etymology)
        if origin is not None and block.senses:
            groups[origin].append(f"{block.word}: {definition_text(block.senses[0][1])}")
    info = _info("gcide_origin", "GCIDE-Orig", "GCIDE word and first sense -> etymology's language: "
                 + ", ".join(ORIGINS), ORIGIN_NAMES, ORIGIN_TEMPLATES)
    return build_task("gcide_origin", groups, seed, info=info, labels=ORIGINS, min_chars=MIN_CHARS, protocol=protocol)
