"""VADER sentiment-lexicon polarity (PyPI package ``vaderSentiment``).

Source: ``vaderSentiment/vader_lexicon.txt`` from the PyPI package ``vaderSentiment`` (3.3.2): ~7.5k English
words, slang, emoticons and acronyms, each with the mean of ten human valence ratings on -4..+4.

License: MIT (C.J. Hutto, 2016).

Task ``vader_polarity``: lexicon entry -> ``negative`` (mean rating <= -0.5) or ``positive`` (mean >= +0.5);
entries rated in between are left out as neutral.
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path

from taskmerge.bench.datasets.common import TaskData, TaskInfo, TaskSourceMissing, build_task

LABELS: tuple[str, ...] = ("negative", "positive")
THRESHOLD = 0.5
_INSTALL = "pip install --no-deps vaderSentiment==3.3.2"


def lexicon_path() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    try:
        path = Path(str(importlib.resources.files("vaderSentiment") / "vader_lexicon.txt"))
    except ModuleNotFoundError as exc:
        raise TaskSourceMissing(f"vaderSentiment is not installed; {_INSTALL}") from exc
    if not path.exists():
        raise TaskSourceMissing(f"{path} not found; {_INSTALL}")
    return path


def parse_lexicon(text: str) -> dict[str, float]:
    """``{token: mean valence}`` from the tab-separated lexicon (token, mean, std, raw ratings)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = float(parts[1])
    return out


@lru_cache(maxsize=1)
def lexicon() -> dict[str, float]:
    """The installed VADER lexicon."""
    return parse_lexicon(lexicon_path().read_text(encoding="utf-8"))


CLASS_NAMES: tuple[str, ...] = ("negative", "positive")
TEMPLATES: tuple[str, ...] = (
    "{}", "a {} word.", "something {}.", "a word with a {} meaning.", "a {} feeling.", "this is {}.",
)


def vader_polarity(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Lexicon token -> negative / positive (2 classes, ``|mean| >= 0.5``)."""
    groups: dict[str, list[str]] = {"negative": [], "positive": []}
    for token, mean in lexicon().items():
        if mean <= -THRESHOLD:
            groups["negative"].append(token)
        elif mean >= THRESHOLD:
            groups["positive"].append(token)
    info = TaskInfo(
        name="vader_polarity",
        source="PyPI vaderSentiment 3.3.2, vaderSentiment/vader_lexicon.txt",
        license="MIT",
        description="VADER lexicon entry -> polarity (negative if mean <= -0.5, positive if >= 0.5)",
        install=_INSTALL,
        short_name="VADER",
        class_names=CLASS_NAMES,
        templates=TEMPLATES,
    )
    return build_task("vader_polarity", groups, seed, info=info, labels=LABELS, protocol=protocol)
