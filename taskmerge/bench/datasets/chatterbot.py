"""Tasks from the ChatterBot dialogue corpus (PyPI package ``chatterbot-corpus``).

Source: the YAML files under ``chatterbot_corpus/data/<language>/<category>.yml`` of the PyPI package
``chatterbot-corpus`` (1.3.3); each file holds ``conversations``, lists of dialogue lines. Every distinct line
is one example (prompts and answers alike).

License: BSD-3-Clause (Gunther Cox).

Tasks:

* ``chatterbot_category`` — English dialogue line -> the corpus category it is filed under
  (:data:`CATEGORIES`, the six English categories with at least 115 distinct lines).
* ``chatterbot_language`` — dialogue line -> corpus language (:data:`LANGUAGES`, 8 languages in Latin or
  Cyrillic script with at least 290 distinct lines).
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path

import yaml

from taskmerge.bench.datasets.common import TaskData, TaskInfo, TaskSourceMissing, build_task

CATEGORIES: tuple[str, ...] = ("ai", "coding", "conversations", "emotion", "psychology", "trivia")
LANGUAGES: tuple[str, ...] = (
    "dutch", "english", "indonesian", "italian", "portuguese", "spanish", "turkish", "ukrainian",
)
# The smallest English categories hold ~120 distinct lines, so the category task has smaller caps.
CATEGORY_CAPS: dict[str, int] = {"train": 70, "val": 15, "test": 30}
CATEGORY_NAMES: tuple[str, ...] = (
    "artificial intelligence", "computer programming", "small talk", "emotions", "psychology", "trivia",
)
CATEGORY_TEMPLATES: tuple[str, ...] = (
    "{}", "a chat message about {}.", "a chatbot conversation about {}.", "a question or answer about {}.",
    "talking about {}.", "a line of dialogue on the topic of {}.",
)
LANGUAGE_NAMES: tuple[str, ...] = (
    "Dutch", "English", "Indonesian", "Italian", "Portuguese", "Spanish", "Turkish", "Ukrainian",
)
LANGUAGE_TEMPLATES: tuple[str, ...] = (
    "{}", "a chat message in {}.", "a sentence written in {}.", "this is {}.", "{} text.",
    "a line of dialogue in the {} language.",
)
_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
_LICENSE = "BSD-3-Clause"


def corpus_dir() -> Path:
    """``chatterbot_corpus/data`` inside the installed package."""
    try:
        path = Path(str(importlib.resources.files("chatterbot_corpus") / "data"))
    except ModuleNotFoundError as exc:
        raise TaskSourceMissing(f"chatterbot-corpus is not installed; {_INSTALL}") from exc
    if not path.is_dir():
        raise TaskSourceMissing(f"{path} not found; {_INSTALL}")
    return path


def parse_corpus_file(text: str) -> list[str]:
    """All dialogue lines (strings) of one corpus YAML file, in file order."""
    data = yaml.safe_load(text) or {}
    lines: list[str] = []
    for conversation in data.get("conversations") or []:
        for line in conversation or []:
            if isinstance(line, str):
                lines.append(line)
    return lines


@lru_cache(maxsize=64)
def _language_lines(language: str) -> dict[str, tuple[str, ...]]:
    root = corpus_dir() / language
    if not root.is_dir():
        raise TaskSourceMissing(f"{root} not found; {_INSTALL}")
    return {p.stem: tuple(parse_corpus_file(p.read_text(encoding="utf-8"))) for p in sorted(root.glob("*.yml"))}


def _info(
    name: str, description: str, short: str, class_names: tuple[str, ...], templates: tuple[str, ...]
) -> TaskInfo:
    return TaskInfo(
        name=name, source="PyPI chatterbot-corpus 1.3.3, chatterbot_corpus/data/*/*.yml", license=_LICENSE,
        description=description, install=_INSTALL, short_name=short, class_names=class_names, templates=templates,
    )


def chatterbot_category(seed: int = 0, protocol: str = "v2") -> TaskData:
    """English dialogue line -> category, 6 classes (:data:`CATEGORIES`)."""
    by_file = _language_lines("english")
    groups = {c: list(by_file[c]) for c in CATEGORIES}
    desc = "English chatbot dialogue line -> corpus category: " + ", ".join(CATEGORIES)
    info = _info("chatterbot_category", desc, "ChatCat", CATEGORY_NAMES, CATEGORY_TEMPLATES)
    return build_task("chatterbot_category", groups, seed, info=info, caps=CATEGORY_CAPS, protocol=protocol)


def chatterbot_language(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Dialogue line -> language, 8 classes (:data:`LANGUAGES`)."""
    groups = {lang: [t for lines in _language_lines(lang).values() for t in lines] for lang in LANGUAGES}
    desc = "chatbot dialogue line -> language: " + ", ".join(LANGUAGES)
    info = _info("chatterbot_language", desc, "ChatLang", LANGUAGE_NAMES, LANGUAGE_TEMPLATES)
    return build_task("chatterbot_language", groups, seed, info=info, protocol=protocol)
