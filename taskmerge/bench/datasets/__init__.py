"""The benchmark's text-classification tasks: a registry of loaders and the suite's task lists.

``load_task(name, seed)`` returns a :class:`TaskData` with class-balanced train / val / test splits of
``(text, label index)`` pairs and a manifest (counts, SHA-256 of each split). One module per source:

* :mod:`.fortunes` — Debian ``fortunes`` + language packs: ``fortune_topic_a``, ``fortune_topic_b``,
  ``fortune_language``;
* :mod:`.wordnet` — Debian ``wordnet-base``: ``wordnet_noun_supersense``, ``wordnet_verb_supersense``,
  ``wordnet_pos``, ``wordnet_domain``;
* :mod:`.vader` — PyPI ``vaderSentiment``: ``vader_polarity``;
* :mod:`.chatterbot` — PyPI ``chatterbot-corpus``: ``chatterbot_category``, ``chatterbot_language``;
* :mod:`.toy` — synthetic tasks for smoke tests: ``toy_letters``, ``toy_length``.
"""

from __future__ import annotations

from collections.abc import Callable

from taskmerge.bench.datasets import chatterbot, fortunes, toy, vader, wordnet
from taskmerge.bench.datasets.common import (
    DEFAULT_BUDGET,
    SPLITS,
    Example,
    TaskData,
    TaskInfo,
    TaskSourceMissing,
    split_sha256,
)

TaskLoader = Callable[[int], TaskData]

TASKS: dict[str, TaskLoader] = {
    "fortune_topic_a": fortunes.fortune_topic_a,
    "fortune_topic_b": fortunes.fortune_topic_b,
    "fortune_language": fortunes.fortune_language,
    "wordnet_noun_supersense": wordnet.wordnet_noun_supersense,
    "wordnet_verb_supersense": wordnet.wordnet_verb_supersense,
    "wordnet_pos": wordnet.wordnet_pos,
    "wordnet_domain": wordnet.wordnet_domain,
    "vader_polarity": vader.vader_polarity,
    "chatterbot_category": chatterbot.chatterbot_category,
    "chatterbot_language": chatterbot.chatterbot_language,
    "toy_letters": toy.toy_letters,
    "toy_length": toy.toy_length,
}
"""Every loadable task, name -> ``loader(seed) -> TaskData``."""

MAIN_TASKS: tuple[str, ...] = (
    "fortune_topic_a",
    "wordnet_noun_supersense",
    "vader_polarity",
    "fortune_language",
    "wordnet_verb_supersense",
    "fortune_topic_b",
    "wordnet_pos",
    "chatterbot_category",
)
"""The 8 merged tasks, ordered so that every prefix (4 = first four) mixes sources."""

UNSEEN_TASKS: tuple[str, ...] = ("wordnet_domain", "chatterbot_language")
"""Tasks held out of the merge, for generalisation tables (evaluated with their linear-probe heads)."""

TOY_TASKS: tuple[str, ...] = ("toy_letters", "toy_length")


def load_task(name: str, seed: int = 0) -> TaskData:
    """Load task ``name`` with splits cut from ``seed``; raises :class:`TaskSourceMissing` if its source is absent."""
    try:
        loader = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return loader(seed)


def resolve_tasks(tasks: int | str | list[str] | tuple[str, ...]) -> list[str]:
    """A task selection as a list of names: an int ``n`` is the first ``n`` of :data:`MAIN_TASKS`;
    ``"all"`` is :data:`MAIN_TASKS` + :data:`UNSEEN_TASKS`; a comma-separated string or a list names tasks."""
    if isinstance(tasks, int) or (isinstance(tasks, str) and tasks.isdigit()):
        n = int(tasks)
        if not 1 <= n <= len(MAIN_TASKS):
            raise ValueError(f"task count must be 1..{len(MAIN_TASKS)}, got {n}")
        return list(MAIN_TASKS[:n])
    if tasks == "all":
        return list(MAIN_TASKS + UNSEEN_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    for name in names:
        if name not in TASKS:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return names


__all__ = [
    "DEFAULT_BUDGET", "MAIN_TASKS", "SPLITS", "TASKS", "TOY_TASKS", "UNSEEN_TASKS", "Example", "TaskData",
    "TaskInfo", "TaskSourceMissing", "load_task", "resolve_tasks", "split_sha256",
]
