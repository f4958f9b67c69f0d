"""Shared machinery of the benchmark's text-classification tasks.

Every task is built the same way: a source module yields ``{label name: [texts]}``; :func:`build_task`
normalises and de-duplicates the texts, drops texts claimed by two labels, and cuts class-balanced
train / validation / test splits from a seed with :func:`balanced_split`. The result is a
:class:`TaskData` whose :attr:`TaskData.manifest` records counts and a SHA-256 content hash of every split
(see :func:`split_sha256`), so a table can name exactly the data it was computed on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Example = tuple[str, int]
"""One labelled example: ``(text, label index)``."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

# The suite-wide budget: at most this many examples per split and task, divided evenly over the classes.
DEFAULT_BUDGET: dict[str, int] = {"train": 1000, "val": 200, "test": 400}

_WS = re.compile(r"\s+")


class TaskSourceMissing(RuntimeError):
    """A task's offline source (a Debian or PyPI package) is not installed; the message names the install command."""


@dataclass(frozen=True)
class TaskInfo:
    """Static description of one task: where its data comes from and under which license."""

    name: str
    source: str
    license: str
    description: str
    install: str


@dataclass
class TaskData:
    """A task's label names and its three splits, each a list of ``(text, label index)`` pairs."""

    name: str
    labels: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    seed: int = 0
    info: TaskInfo | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def manifest_hash(self) -> str:
        """SHA-256 over the whole manifest (labels, counts and split hashes); keys fine-tuning caches."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode("utf-8")).hexdigest()


def normalize_text(text: str) -> str:
    """NFC-normalise, collapse runs of whitespace to one space and strip."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def split_sha256(examples: Sequence[Example]) -> str:
    """SHA-256 of a split: the UTF-8 bytes of ``json.dumps([[text, label], ...], ensure_ascii=False)``."""
    payload = json.dumps([[t, int(y)] for t, y in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _rng(seed: int, *parts: str) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and some names, independent of Python's hash seed."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def per_class_caps(num_classes: int, budget: Mapping[str, int] | None = None) -> dict[str, int]:
    """Divide a per-split budget (default :data:`DEFAULT_BUDGET`) evenly over ``num_classes`` classes."""
    budget = dict(DEFAULT_BUDGET if budget is None else budget)
    return {s: budget[s] // num_classes for s in SPLITS}


def clean_groups(
    groups: Mapping[str, Sequence[str]], min_chars: int = 1, max_chars: int | None = None
) -> dict[str, list[str]]:
    """Normalise texts, keep lengths in ``[min_chars, max_chars]``, de-duplicate within a label, and drop
    every text that occurs under more than one label (an ambiguous example has no right answer)."""
    cleaned: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    ambiguous: set[str] = set()
    for label, texts in groups.items():
        seen: set[str] = set()
        kept: list[str] = []
        for raw in texts:
            text = normalize_text(raw)
            if len(text) < min_chars or (max_chars is not None and len(text) > max_chars) or "\ufffd" in text:
                continue
            if text in seen:
                continue
            seen.add(text)
            kept.append(text)
            if owner.setdefault(text, label) != label:
                ambiguous.add(text)
        cleaned[label] = kept
    return {label: sorted(t for t in texts if t not in ambiguous) for label, texts in cleaned.items()}


def balanced_split(
    groups: Mapping[str, Sequence[str]],
    labels: Sequence[str],
    caps: Mapping[str, int],
    seed: int,
    task: str,
) -> dict[str, list[Example]]:
    """Cut class-balanced splits from ``{label: texts}``.

    For each label (in the order of ``labels``, whose index is the label id) the texts are sorted, shuffled
    with a generator seeded by ``(seed, task, label)``, and consumed test first, then validation, then
    training, each up to its cap in ``caps``. Test and validation are therefore exactly balanced whenever
    every class has ``caps["test"] + caps["val"]`` texts (checked: a smaller class raises); training takes
    what is left, up to its cap. Each split is finally shuffled with a generator seeded by
    ``(seed, task, split)``. Same inputs and seed give byte-identical splits.
    """
    need = caps["test"] + caps["val"]
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for idx, label in enumerate(labels):
        texts = sorted(set(groups.get(label, ())))
        if len(texts) < need + 1:
            raise ValueError(
                f"task {task!r}: label {label!r} has {len(texts)} texts, fewer than the "
                f"{need + 1} needed for test {caps['test']} + val {caps['val']} + 1 train"
            )
        _rng(seed, task, "label", label).shuffle(texts)
        start = 0
        for split in ("test", "val", "train"):
            chunk = texts[start : start + caps[split]]
            start += len(chunk)
            splits[split].extend((t, idx) for t in chunk)
    for split in SPLITS:
        _rng(seed, task, "split", split).shuffle(splits[split])
    return splits


def make_manifest(
    name: str, labels: Sequence[str], splits: Mapping[str, Sequence[Example]], seed: int, info: TaskInfo | None
) -> dict[str, Any]:
    """Counts (overall and per label) and content hashes of a task's splits, plus its source and license."""
    manifest: dict[str, Any] = {
        "task": name,
        "seed": seed,
        "labels": list(labels),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "per_class": {
            s: {labels[i]: sum(1 for _, y in splits[s] if y == i) for i in range(len(labels))} for s in SPLITS
        },
        "sha256": {s: split_sha256(splits[s]) for s in SPLITS},
    }
    if info is not None:
        manifest["source"] = info.source
        manifest["license"] = info.license
    return manifest


def build_task(
    name: str,
    groups: Mapping[str, Sequence[str]],
    seed: int,
    info: TaskInfo | None = None,
    caps: Mapping[str, int] | None = None,
    labels: Sequence[str] | None = None,
    min_chars: int = 1,
    max_chars: int | None = None,
) -> TaskData:
    """Clean ``groups``, cut balanced splits (caps default to :func:`per_class_caps`) and attach a manifest."""
    labels = list(groups) if labels is None else list(labels)
    cleaned = clean_groups(groups, min_chars=min_chars, max_chars=max_chars)
    caps = dict(per_class_caps(len(labels)) if caps is None else caps)
    splits = balanced_split(cleaned, labels, caps, seed, name)
    manifest = make_manifest(name, labels, splits, seed, info)
    return TaskData(
        name=name,
        labels=labels,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        seed=seed,
        info=info,
        manifest=manifest,
    )
