"""Tasks from the Debian fortune cookie databases (``fortunes`` and ``fortunes-{de,es,it,br,pl,cs,ru}``).

Source: the Debian packages ``fortunes`` (English, ~45 topic files under ``/usr/share/games/fortunes``),
``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-br`` (Brazilian Portuguese, file ``brasil``),
``fortunes-pl``, ``fortunes-cs`` and ``fortunes-ru``. A fortune file is plain text with entries separated by
lines holding a single ``%``.

License: the English ``fortunes`` collection is distributed by Debian under the BSD license of
``fortune-mod`` (individual quotations are short excerpts); the language packs are distributed by Debian as
free software (GPL-2 for ``fortunes-de``, ``fortunes-cs``, ``fortunes-br``; GPL for ``fortunes-es``,
``fortunes-it``, ``fortunes-pl``; ``fortunes-ru`` as packaged). See each package's
``/usr/share/doc/<package>/copyright``.

Tasks:

* ``fortune_topic_a`` — which English topic file a fortune comes from; labels :data:`TOPICS_A`.
* ``fortune_topic_b`` — the same over a disjoint set of 8 topic files, :data:`TOPICS_B`.
* ``fortune_language`` — the language of a fortune; labels :data:`LANGUAGES` (``en de es it pt pl cs ru``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from taskmerge.bench.datasets.common import TaskData, TaskInfo, TaskSourceMissing, build_task

FORTUNE_DIR = Path(os.environ.get("TASKMERGE_FORTUNE_DIR", "/usr/share/games/fortunes"))

TOPICS_A: tuple[str, ...] = (
    "computers", "definitions", "people", "politics", "science", "songs-poems", "work", "men-women",
)
TOPICS_B: tuple[str, ...] = ("art", "education", "food", "law", "linux", "literature", "startrek", "zippy")

# Zero-shot prompts: readable topic names (file names like "songs-poems" spelt out) and language names.
TOPIC_NAMES: dict[str, str] = {
    "computers": "computers", "definitions": "definitions of words", "people": "famous people",
    "politics": "politics", "science": "science", "songs-poems": "songs and poems", "work": "work and jobs",
    "men-women": "men and women", "art": "art", "education": "education and school", "food": "food",
    "law": "law and lawyers", "linux": "Linux", "literature": "literature and books", "startrek": "Star Trek",
    "zippy": "Zippy the Pinhead",
}
TOPIC_TEMPLATES: tuple[str, ...] = (
    "{}", "a quotation about {}.", "a fortune cookie saying about {}.", "a joke about {}.",
    "a witty remark on {}.", "this quote is about {}.",
)
LANGUAGES: tuple[str, ...] = ("en", "de", "es", "it", "pt", "pl", "cs", "ru")
LANGUAGE_NAMES: tuple[str, ...] = ("English", "German", "Spanish", "Italian", "Portuguese", "Polish", "Czech", "Russian")
LANGUAGE_TEMPLATES: tuple[str, ...] = (
    "{}", "a text in {}.", "a saying written in {}.", "this is {}.", "a quotation in the {} language.", "{} text.",
)
_LANGUAGE_DIRS: dict[str, str] = {"de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs", "ru": "ru"}

_INSTALL = (
    "apt-get install -y fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-ru"
)
_LICENSE = "BSD (fortune-mod, English); GPL family (language packs) - see /usr/share/doc/fortunes*/copyright"
_SOURCE_TAG = re.compile(r"^#\S+\s*\n")  # fortunes-pl starts each entry with a "#file" line

# Min / max characters kept (after whitespace normalisation): very short entries carry no topic and
# very long ones are truncated to the first 48 tokens anyway.
MIN_CHARS = 20
MAX_CHARS = 1000


def parse_fortune_file(text: str) -> list[str]:
    """Split a fortune file's text into entries (lines holding only ``%`` separate them); empty ones dropped."""
    entries: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    out = []
    for entry in entries:
        entry = _SOURCE_TAG.sub("", entry.strip("\n"))
        if entry.strip():
            out.append(entry)
    return out


def _read(path: Path) -> list[str]:
    return parse_fortune_file(path.read_bytes().decode("utf-8", errors="replace"))


def _require(path: Path) -> None:
    if not path.exists():
        raise TaskSourceMissing(f"{path} not found; install the Debian fortune packages: {_INSTALL}")


def _data_files(directory: Path) -> list[Path]:
    """Regular fortune files of a directory (no ``.dat`` index, no ``.u8`` alias, no symlink, no subfolder)."""
    _require(directory)
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and not p.name.endswith("-sk")
    )


ENGLISH_FILES: frozenset[str] = frozenset((
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "love", "magic",
    "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets", "platitudes",
    "politics", "pratchett", "science", "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom",
    "work", "zippy",  # Debian package fortunes 1:1.99.1
    "fortunes", "literature", "riddles",  # fortunes-min
))
"""The English fortune files of the Debian packages ``fortunes`` and ``fortunes-min``. Other packages install
into the same folder (``fortunes-mario`` is Portuguese, ``fortunes-bofh-excuses``, ``fortunes-debian-hints``...):
the English class reads only these files, so the task's data does not depend on what else is installed."""


@lru_cache(maxsize=4)
def english_topics(root: str = str(FORTUNE_DIR)) -> dict[str, tuple[str, ...]]:
    """English topic files of the ``fortunes`` / ``fortunes-min`` packages (:data:`ENGLISH_FILES`):
    ``{topic: entries}``."""
    files = [p for p in _data_files(Path(root)) if p.name in ENGLISH_FILES]
    return {p.name: tuple(_read(p)) for p in files}


@lru_cache(maxsize=4)
def languages(root: str = str(FORTUNE_DIR)) -> dict[str, tuple[str, ...]]:
    """Entries per language code of :data:`LANGUAGES`."""
    base = Path(root)
    out: dict[str, tuple[str, ...]] = {"en": tuple(e for v in english_topics(root).values() for e in v)}
    _require(base / "brasil")
    out["pt"] = tuple(_read(base / "brasil"))
    for code, sub in _LANGUAGE_DIRS.items():
        out[code] = tuple(e for p in _data_files(base / sub) for e in _read(p))
    return {code: out[code] for code in LANGUAGES}


def _topic_task(name: str, short: str, topics: Iterable[str], seed: int, protocol: str) -> TaskData:
    topics = tuple(topics)
    info = TaskInfo(
        name=name,
        source="Debian package fortunes (/usr/share/games/fortunes/{" + ",".join(topics) + "})",
        license=_LICENSE,
        description="English fortune -> the topic file it comes from: " + ", ".join(topics),
        install=_INSTALL,
        short_name=short,
        class_names=tuple(TOPIC_NAMES[t] for t in topics),
        templates=TOPIC_TEMPLATES,
    )
    all_topics = english_topics()
    missing = [t for t in topics if t not in all_topics]
    if missing:
        raise TaskSourceMissing(f"fortune topic files {missing} not found under {FORTUNE_DIR}; {_INSTALL}")
    groups = {t: list(all_topics[t]) for t in topics}
    return build_task(name, groups, seed, info=info, min_chars=MIN_CHARS, max_chars=MAX_CHARS, protocol=protocol)


def fortune_topic_a(seed: int = 0, protocol: str = "v2") -> TaskData:
    """English fortune topic, 8 classes (:data:`TOPICS_A`)."""
    return _topic_task("fortune_topic_a", "FortTopA", TOPICS_A, seed, protocol)


def fortune_topic_b(seed: int = 0, protocol: str = "v2") -> TaskData:
    """English fortune topic, 8 classes disjoint from task A (:data:`TOPICS_B`)."""
    return _topic_task("fortune_topic_b", "FortTopB", TOPICS_B, seed, protocol)


def fortune_language(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Language identification of fortunes over 8 languages (:data:`LANGUAGES`)."""
    info = TaskInfo(
        name="fortune_language",
        source="Debian packages fortunes, fortunes-de, -es, -it, -br (pt), -pl, -cs, -ru",
        license=_LICENSE,
        description="fortune -> its language: " + ", ".join(LANGUAGES),
        install=_INSTALL,
        short_name="FortLang",
        class_names=LANGUAGE_NAMES,
        templates=LANGUAGE_TEMPLATES,
    )
    groups = {code: list(v) for code, v in languages().items()}
    return build_task("fortune_language", groups, seed, info=info, min_chars=MIN_CHARS, max_chars=MAX_CHARS,
                      protocol=protocol)
