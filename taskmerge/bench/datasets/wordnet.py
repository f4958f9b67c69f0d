"""Tasks from Princeton WordNet 3.0 glosses (Debian package ``wordnet-base``).

Source: ``/usr/share/wordnet/data.{noun,verb,adj,adv}`` of the Debian package ``wordnet-base``. Each synset
line holds its lexicographer file number (the *supersense*, e.g. ``18`` = ``noun.person``), its synset type
(``n v a s r``), its pointers (``;c`` = member of a topic domain) and, after ``|``, its gloss. The input text of
every task is the gloss's definition (the part before the first quoted example), never the word itself.

License: WordNet 3.0 license (Princeton University; permissive, BSD-style: "Permission to use, copy,
modify and distribute this software and database ... for any purpose and without fee or royalty is
hereby granted"), see ``/usr/share/doc/wordnet-base/copyright``.

Tasks:

* ``wordnet_noun_supersense`` — noun gloss -> one of 10 noun lexicographer files (:data:`NOUN_SUPERSENSES`).
* ``wordnet_verb_supersense`` — verb gloss -> one of 8 verb lexicographer files (:data:`VERB_SUPERSENSES`).
* ``wordnet_pos`` — gloss -> part of speech of the defined word (noun, verb, adjective, adverb).
* ``wordnet_domain`` — gloss of a synset with a topic-domain pointer -> the domain (:data:`DOMAINS`); a
  leading parenthesised tag such as ``(music)`` is removed from the gloss.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from taskmerge.bench.datasets.common import TaskData, TaskInfo, TaskSourceMissing, build_task

WORDNET_DIR = Path(os.environ.get("TASKMERGE_WORDNET_DIR", "/usr/share/wordnet"))

# The standard WordNet lexicographer file names (lexnames(5WN)), indexed by lex_filenum.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)

NOUN_SUPERSENSES: tuple[str, ...] = (
    "noun.act", "noun.animal", "noun.artifact", "noun.body", "noun.communication",
    "noun.food", "noun.location", "noun.person", "noun.plant", "noun.substance",
)
VERB_SUPERSENSES: tuple[str, ...] = (
    "verb.change", "verb.cognition", "verb.communication", "verb.contact",
    "verb.creation", "verb.motion", "verb.possession", "verb.social",
)
POS_LABELS: tuple[str, ...] = ("noun", "verb", "adjective", "adverb")
_POS_OF_TYPE = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
DOMAINS: tuple[str, ...] = (
    "law", "military", "chemistry", "computer_science", "biology", "physics", "music", "mathematics",
)

# Zero-shot prompts: supersense codes as plain words, domains without underscores.
SUPERSENSE_NAMES: dict[str, str] = {
    "noun.act": "an act or action", "noun.animal": "an animal", "noun.artifact": "a man-made object",
    "noun.body": "a part of the body", "noun.communication": "communication or language",
    "noun.food": "food or drink", "noun.location": "a place or location", "noun.person": "a person",
    "noun.plant": "a plant", "noun.substance": "a substance or material",
    "verb.change": "changing something", "verb.cognition": "thinking or knowing",
    "verb.communication": "speaking or communicating", "verb.contact": "touching or hitting",
    "verb.creation": "making or creating something", "verb.motion": "moving or travelling",
    "verb.possession": "owning, buying or giving", "verb.social": "social life and groups",
}
NOUN_TEMPLATES: tuple[str, ...] = (
    "{}", "a definition of {}.", "the meaning of a word for {}.", "a dictionary entry describing {}.",
    "a word that names {}.", "this is {}.",
)
VERB_TEMPLATES: tuple[str, ...] = (
    "{}", "a verb about {}.", "a definition of a verb meaning {}.", "a dictionary entry for an action of {}.",
    "to do with {}.",
)
POS_NAMES: tuple[str, ...] = ("a noun, naming a thing", "a verb, naming an action", "an adjective, describing a thing",
                              "an adverb, describing how something is done")
POS_TEMPLATES: tuple[str, ...] = (
    "{}", "the definition of {}.", "a dictionary definition of {}.", "a gloss that defines {}.",
    "the meaning of {}.",
)
DOMAIN_NAMES: tuple[str, ...] = (
    "law", "the military", "chemistry", "computer science", "biology", "physics", "music", "mathematics",
)
DOMAIN_TEMPLATES: tuple[str, ...] = (
    "{}", "a term from {}.", "a definition in the field of {}.", "a word used in {}.", "jargon of {}.",
)

_INSTALL = "apt-get install -y wordnet-base"
_LICENSE = "WordNet 3.0 license (Princeton; permissive BSD-style), /usr/share/doc/wordnet-base/copyright"
_SOURCE = "Debian package wordnet-base (WordNet 3.0), /usr/share/wordnet/data.*"
MIN_CHARS = 10


@dataclass(frozen=True)
class Synset:
    """The fields of one ``data.*`` line the tasks use."""

    offset: str
    lex_filenum: int
    ss_type: str
    words: tuple[str, ...]
    pointers: tuple[tuple[str, str, str], ...]  # (symbol, target offset, target pos)
    definition: str


def parse_data_line(line: str) -> Synset | None:
    """Parse one line of a WordNet ``data.*`` file (see wndb(5WN)); license header lines give ``None``."""
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    w_cnt = int(f[3], 16)
    words = tuple(f[4 + 2 * k] for k in range(w_cnt))
    i = 4 + 2 * w_cnt
    p_cnt = int(f[i])
    i += 1
    pointers = tuple((f[i + 4 * k], f[i + 4 * k + 1], f[i + 4 * k + 2]) for k in range(p_cnt))
    definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
    return Synset(f[0], int(f[1]), f[2], words, pointers, definition)


@lru_cache(maxsize=2)
def synsets(root: str = str(WORDNET_DIR)) -> dict[str, tuple[Synset, ...]]:
    """All synsets of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` keyed by file suffix."""
    out: dict[str, tuple[Synset, ...]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(root) / f"data.{pos}"
        if not path.exists():
            raise TaskSourceMissing(f"{path} not found; install WordNet: {_INSTALL}")
        with path.open(encoding="utf-8", errors="replace") as fh:
            out[pos] = tuple(s for s in map(parse_data_line, fh) if s is not None)
    return out


def _info(
    name: str, description: str, short: str, class_names: tuple[str, ...], templates: tuple[str, ...]
) -> TaskInfo:
    return TaskInfo(name=name, source=_SOURCE, license=_LICENSE, description=description, install=_INSTALL,
                    short_name=short, class_names=class_names, templates=templates)


def _supersense_task(
    name: str, short: str, pos: str, labels: tuple[str, ...], templates: tuple[str, ...], seed: int, protocol: str
) -> TaskData:
    groups: dict[str, list[str]] = {label: [] for label in labels}
    for s in synsets()[pos]:
        lex = LEXNAMES[s.lex_filenum]
        if lex in groups:
            groups[lex].append(s.definition)
    desc = f"{pos} gloss -> lexicographer file: " + ", ".join(labels)
    info = _info(name, desc, short, tuple(SUPERSENSE_NAMES[label] for label in labels), templates)
    return build_task(name, groups, seed, info=info, min_chars=MIN_CHARS, protocol=protocol)


def wordnet_noun_supersense(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Noun gloss -> noun supersense, 10 classes (:data:`NOUN_SUPERSENSES`)."""
    return _supersense_task("wordnet_noun_supersense", "WN-Noun", "noun", NOUN_SUPERSENSES, NOUN_TEMPLATES, seed,
                            protocol)


def wordnet_verb_supersense(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Verb gloss -> verb supersense, 8 classes (:data:`VERB_SUPERSENSES`)."""
    return _supersense_task("wordnet_verb_supersense", "WN-Verb", "verb", VERB_SUPERSENSES, VERB_TEMPLATES, seed,
                            protocol)


def wordnet_pos(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Gloss -> part of speech of the defined word, 4 classes (:data:`POS_LABELS`)."""
    groups: dict[str, list[str]] = {label: [] for label in POS_LABELS}
    for pos_synsets in synsets().values():
        for s in pos_synsets:
            groups[_POS_OF_TYPE[s.ss_type]].append(s.definition)
    desc = "gloss -> part of speech: " + ", ".join(POS_LABELS)
    info = _info("wordnet_pos", desc, "WN-POS", POS_NAMES, POS_TEMPLATES)
    return build_task("wordnet_pos", groups, seed, info=info, min_chars=MIN_CHARS, protocol=protocol)


# Glosses of domain members often start with the domain itself, "(music) a short lively tune ...":
# stripped, or the task would be string matching.
_DOMAIN_TAG = re.compile(r"^\([^)]*\)\s*")

# Domain classes hold 145-598 synsets, so the per-class caps are smaller than the suite default.
DOMAIN_CAPS: dict[str, int] = {"train": 75, "val": 20, "test": 40}


def wordnet_domain(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Gloss of a synset with a topic-domain (``;c``) pointer -> its domain, 8 classes (:data:`DOMAINS`)."""
    all_synsets = synsets()
    first_word = {(s.offset, s.ss_type[0] if s.ss_type != "s" else "a"): s.words[0].lower()
                  for v in all_synsets.values() for s in v}
    groups: dict[str, list[str]] = defaultdict(list)
    for v in all_synsets.values():
        for s in v:
            for sym, target, tpos in s.pointers:
                if sym == ";c":
                    domain = first_word.get((target, tpos))
                    if domain in DOMAINS:
                        groups[domain].append(_DOMAIN_TAG.sub("", s.definition))
    desc = "gloss -> topic domain: " + ", ".join(DOMAINS)
    info = _info("wordnet_domain", desc, "WN-Dom", DOMAIN_NAMES, DOMAIN_TEMPLATES)
    return build_task(
        "wordnet_domain", {d: groups[d] for d in DOMAINS}, seed, info=info, caps=DOMAIN_CAPS, min_chars=MIN_CHARS,
        protocol=protocol,
    )
