"""The benchmark's text-classification tasks: a registry of loaders and the suite's task lists.

``load_task(name, seed, protocol)`` returns a :class:`TaskData` with class-balanced train / val / test splits
of ``(text, label index)`` pairs, a manifest (counts, SHA-256 of each split) and the class names and prompt
templates of its zero-shot head (see :mod:`.common` for the loader interface and the ``"v1"`` / ``"v2"`` split
protocols). One module per source:

* :mod:`.fortunes` — Debian ``fortunes`` + language packs: ``fortune_topic_a``, ``fortune_topic_b``,
  ``fortune_language``;
* :mod:`.wordnet` — Debian ``wordnet-base``: ``wordnet_noun_supersense``, ``wordnet_verb_supersense``,
  ``wordnet_pos``, ``wordnet_domain``;
* :mod:`.vader` — PyPI ``vaderSentiment``: ``vader_polarity``;
* :mod:`.chatterbot` — PyPI ``chatterbot-corpus``: ``chatterbot_category``, ``chatterbot_language``;
* :mod:`.bible` — Debian ``sword-text-web`` (World English Bible): ``bible_section``, ``bible_gospel``;
* :mod:`.mhcc` — Debian ``sword-comm-mhcc`` (Matthew Henry's commentary): ``mhcc_section``;
* :mod:`.tdavid` — Debian ``sword-comm-tdavid`` (Spurgeon's Treasury of David): ``tdavid_section``;
* :mod:`.gcide` — Debian ``dict-gcide``: ``gcide_field``, ``gcide_field_b``, ``gcide_author``, ``gcide_author_b``,
  ``gcide_pos``, ``gcide_origin``;
* :mod:`.foldoc` — Debian ``dict-foldoc``: ``foldoc_subject``;
* :mod:`.dictionaries` — Debian ``dict-gcide``, ``dict-foldoc``, ``dict-jargon``, ``dict-devil``: ``dict_source``;
* :mod:`.toy` — synthetic tasks for smoke tests: ``toy_letters``, ``toy_length``.
"""

from __future__ import annotations

from typing import Protocol

from taskmerge.bench.datasets import (
    bible,
    chatterbot,
    dictionaries,
    foldoc,
    fortunes,
    gcide,
    mhcc,
    tdavid,
    toy,
    vader,
    wordnet,
)
from taskmerge.bench.datasets.common import (
    DEFAULT_BUDGET,
    PROTOCOLS,
    SPLITS,
    Example,
    TaskData,
    TaskInfo,
    TaskSourceMissing,
    split_sha256,
)



class TaskLoader(Protocol):
    """A task's loader: ``loader(seed, protocol) -> TaskData`` (see :mod:`.common`)."""

    def __call__(self, seed: int = 0, protocol: str = "v2") -> TaskData: ...


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
    "bible_section": bible.bible_section,
    "bible_gospel": bible.bible_gospel,
    "mhcc_section": mhcc.mhcc_section,
    "tdavid_section": tdavid.tdavid_section,
    "gcide_field": gcide.gcide_field,
    "gcide_field_b": gcide.gcide_field_b,
    "gcide_author": gcide.gcide_author,
    "gcide_author_b": gcide.gcide_author_b,
    "gcide_pos": gcide.gcide_pos,
    "gcide_origin": gcide.gcide_origin,
    "foldoc_subject": foldoc.foldoc_subject,
    "dict_source": dictionaries.dict_source,
    "toy_letters": toy.toy_letters,
    "toy_length": toy.toy_length,
}
"""Every loadable task, name -> ``loader(seed) -> TaskData``."""

MAIN_TASKS_8: tuple[str, ...] = (
    "fortune_topic_a",
    "wordnet_noun_supersense",
    "vader_polarity",
    "fortune_language",
    "wordnet_verb_supersense",
    "fortune_topic_b",
    "wordnet_pos",
    "chatterbot_category",
)
"""The 8 merged tasks of the first benchmark, ordered so that every prefix (4 = first four) mixes sources."""

EXTRA_TASKS: tuple[str, ...] = (
    "bible_section",
    "gcide_field",
    "foldoc_subject",
    "gcide_author",
    "tdavid_section",
    "gcide_pos",
    "dict_source",
    "gcide_field_b",
    "mhcc_section",
    "gcide_origin",
    "bible_gospel",
    "gcide_author_b",
)
"""Tasks 9-20 of the suite, in order (9-14 make the 14-task setting, 15-20 the 20-task one). Each half draws on
four sources and no two neighbours come from the same database, except ``dict_source``, whose Webster texts come
from GCIDE like its two neighbours' (the texts themselves are disjoint)."""

MAIN_TASKS: tuple[str, ...] = MAIN_TASKS_8 + EXTRA_TASKS
"""The merged tasks: ``--tasks n`` is the first ``n`` (8, 14, 20 as in the papers; every setting is a prefix
of the next)."""

SUITE_SIZES: tuple[int, ...] = (8, 14, 20)
"""The task counts of the benchmark's settings."""

UNSEEN_TASKS: tuple[str, ...] = ("wordnet_domain", "chatterbot_language")
"""Tasks held out of the merge, for generalisation tables (evaluated with their linear-probe heads)."""

TOY_TASKS: tuple[str, ...] = ("toy_letters", "toy_length")

SHORT_NAMES: dict[str, str] = {
    "fortune_topic_a": "FortTopA",
    "fortune_topic_b": "FortTopB",
    "fortune_language": "FortLang",
    "wordnet_noun_supersense": "WN-Noun",
    "wordnet_verb_supersense": "WN-Verb",
    "wordnet_pos": "WN-POS",
    "wordnet_domain": "WN-Dom",
    "vader_polarity": "VADER",
    "chatterbot_category": "ChatCat",
    "chatterbot_language": "ChatLang",
    "bible_section": "Bible-Sec",
    "bible_gospel": "Gospel",
    "mhcc_section": "MHCC",
    "tdavid_section": "TDavid",
    "gcide_field": "GCIDE-Field",
    "gcide_field_b": "GCIDE-Field-B",
    "gcide_author": "GCIDE-Auth",
    "gcide_author_b": "GCIDE-Auth-B",
    "gcide_pos": "GCIDE-POS",
    "gcide_origin": "GCIDE-Orig",
    "foldoc_subject": "FOLDOC",
    "dict_source": "DictSrc",
    "toy_letters": "ToyLet",
    "toy_length": "ToyLen",
}
"""Column headers of the result tables (a task missing here is shown under its full name)."""


def load_task(name: str, seed: int = 0, protocol: str = "v2") -> TaskData:
    """Load task ``name`` with splits cut from ``seed`` under split ``protocol`` (``"v2"``, or ``"v1"`` for the
    first benchmark's splits); raises :class:`TaskSourceMissing` if its source is absent."""
    try:
        loader = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return loader(seed, protocol)


def resolve_tasks(tasks: int | str | list[str] | tuple[str, ...]) -> list[str]:
    """A task selection as a list of names: an int ``n`` is the first ``n`` of :data:`MAIN_TASKS` (8, 14, 20);
    ``"all"`` is :data:`MAIN_TASKS` + :data:`UNSEEN_TASKS`; a comma-separated string or a list names tasks."""
    if isinstance(tasks, int) or (isinstance(tasks, str) and tasks.isdigit()):
        n = int(tasks)
        if not 1 <= n <= len(MAIN_TASKS):
            raise ValueError(f"task count must be 1..{len(MAIN_TASKS)} (the tasks of MAIN_TASKS), got {n}")
        return list(MAIN_TASKS[:n])
    if tasks == "all":
        return list(MAIN_TASKS + UNSEEN_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    for name in names:
        if name not in TASKS:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return names


__all__ = [
    "DEFAULT_BUDGET", "EXTRA_TASKS", "MAIN_TASKS", "MAIN_TASKS_8", "PROTOCOLS", "SHORT_NAMES", "SPLITS", "SUITE_SIZES",
    "TASKS", "TOY_TASKS", "UNSEEN_TASKS", "Example", "TaskData", "TaskInfo", "TaskLoader", "TaskSourceMissing",
    "load_task", "resolve_tasks", "split_sha256",
]
