"""Shared machinery of the benchmark's text-classification tasks.

Every task is built the same way: a source module yields ``{label name: [texts]}``; :func:`build_task`
normalises and de-duplicates the texts, drops texts claimed by two labels, and cuts class-balanced
train / validation / test splits from a seed with :func:`balanced_split`. The result is a
:class:`TaskData` whose :attr:`TaskData.manifest` records counts and a SHA-256 content hash of every split
(see :func:`split_sha256`), so a table can name exactly the data it was computed on.

**Writing a task loader** (one function per task in a source module, registered in
:data:`taskmerge.bench.datasets.TASKS`)::

    def my_task(seed: int = 0, protocol: str = "v2") -> TaskData:
        groups = {"label_a": [...texts...], "label_b": [...]}
        info = TaskInfo(name="my_task", source=..., license=..., description=..., install=...,
                        short_name="MyTask", class_names=("first thing", "second thing"),
                        templates=("{}", "a text about {}.", ...))
        return build_task("my_task", groups, seed, info=info, protocol=protocol)

**Split protocols** (``protocol`` of :func:`build_task`; ``caps`` are the *v1* per-class caps, default
:func:`per_class_caps` of :data:`DEFAULT_BUDGET`):

* ``"v1"`` — the first benchmark's splits: test / val / train per class up to ``caps`` (400 / 200 / 1000
  examples per task by default). Its manifests, and so every v1 fine-tuning cache key, are unchanged.
* ``"v2"`` (default) — test splits as large as the source allows up to :data:`V2_TEST_TARGET` examples per
  task (see :func:`v2_caps`): validation keeps its v1 size, training keeps its v1 size unless the smallest
  class is too small, in which case training gives way down to :data:`V2_MIN_TRAIN_FRACTION` of it. The
  manifest records ``"protocol": "v2"`` and the test target, so v2 data never shares a cache key with v1.

**Zero-shot head interface.** :class:`TaskInfo` carries what a CLIP-style zero-shot head needs (see
:func:`taskmerge.bench.finetune.zero_shot_head`): ``class_names`` (human-readable names of the labels, in label order, used
in prompts; default: the label strings themselves) and ``templates`` (prompt templates, each with exactly one
``{}`` where the class name goes; default :data:`DEFAULT_TEMPLATES`). :attr:`TaskData.class_names` and
:attr:`TaskData.templates` resolve the defaults. They are not part of the manifest (they do not change the
data); the zero-shot head's cache key includes them.
"""

from __future__ import annotations

import hashlib
import json
import math
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

PROTOCOLS: tuple[str, ...] = ("v1", "v2")

V2_TEST_TARGET = 1000
"""Protocol v2: examples per task in the test split when the source allows (``ceil(target / classes)`` per class)."""

V2_MIN_TRAIN_FRACTION = 0.5
"""Protocol v2: when a source is too small for the test target, training may shrink to this fraction of its v1
per-class size to make room for test examples (``1.0`` keeps the v1 training size and gives the test split only
what is left)."""

DEFAULT_TEMPLATES: tuple[str, ...] = ("{}",)

_WS = re.compile(r"\s+")


class TaskSourceMissing(RuntimeError):
    """A task's offline source (a Debian or PyPI package) is not installed; the message names the install command."""


@dataclass(frozen=True)
class TaskInfo:
    """Static description of one task: where its data comes from, under which license, and how to prompt it.

    ``short_name`` is the task's column header in result tables; ``class_names`` (label order) and
    ``templates`` (each with one ``{}``) define its zero-shot head (module docstring); empty means default.
    """

    name: str
    source: str
    license: str
    description: str
    install: str
    short_name: str = ""
    class_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


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
    def class_names(self) -> list[str]:
        """Human-readable class names for prompts, in label order (default: the labels)."""
        if self.info is not None and self.info.class_names:
            return list(self.info.class_names)
        return list(self.labels)

    @property
    def templates(self) -> tuple[str, ...]:
        """Prompt templates of the zero-shot head, each with one ``{}`` (default :data:`DEFAULT_TEMPLATES`)."""
        if self.info is not None and self.info.templates:
            return tuple(self.info.templates)
        return DEFAULT_TEMPLATES

    @property
    def protocol(self) -> str:
        """The split protocol the task was cut with (``"v1"`` manifests carry no protocol field)."""
        return str(self.manifest.get("protocol", "v1"))

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


def v2_caps(
    class_sizes: Sequence[int],
    base: Mapping[str, int],
    test_target: int = V2_TEST_TARGET,
    min_train_fraction: float = V2_MIN_TRAIN_FRACTION,
) -> dict[str, int]:
    """Per-class caps of protocol v2 from the classes' sizes (after cleaning) and the v1 per-class caps ``base``.

    Validation keeps ``base["val"]``. The test split takes ``ceil(test_target / k)`` per class if the smallest
    class ``n_min`` still leaves ``base["val"] + base["train"]``; otherwise it takes what is left after
    validation and a training floor of ``ceil(min_train_fraction · base["train"])``, and never less than
    ``base["test"]`` (v1's test size). Training (cap ``base["train"]``) then takes what remains of each class
    in :func:`balanced_split`, so only small sources lose training examples.
    """
    k = len(class_sizes)
    if k == 0:
        raise ValueError("v2_caps: no classes")
    n_min = min(class_sizes)
    target = math.ceil(test_target / k)
    floor = math.ceil(min_train_fraction * base["train"])
    room = n_min - base["val"] - floor
    test = max(base["test"], min(target, room))
    return {"train": base["train"], "val": base["val"], "test": test}


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
    name: str,
    labels: Sequence[str],
    splits: Mapping[str, Sequence[Example]],
    seed: int,
    info: TaskInfo | None,
    protocol: str = "v1",
    test_target: int | None = None,
) -> dict[str, Any]:
    """Counts (overall and per label) and content hashes of a task's splits, plus its source and license;
    v2 manifests also name the protocol and the test target (v1 manifests are exactly as before v2 existed)."""
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
    if protocol != "v1":
        manifest["protocol"] = protocol
        manifest["test_target"] = test_target
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
    protocol: str = "v2",
    test_target: int = V2_TEST_TARGET,
) -> TaskData:
    """Clean ``groups``, cut balanced splits and attach a manifest.

    ``caps`` are the v1 per-class caps (default :func:`per_class_caps`); under ``protocol="v2"`` they are
    widened by :func:`v2_caps` towards ``test_target`` test examples (module docstring). ``info`` (if given)
    must have as many ``class_names`` as labels and templates with exactly one ``{}`` each."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"task {name!r}: unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    labels = list(groups) if labels is None else list(labels)
    _check_info(name, labels, info)
    cleaned = clean_groups(groups, min_chars=min_chars, max_chars=max_chars)
    caps = dict(per_class_caps(len(labels)) if caps is None else caps)
    if protocol == "v2":
        caps = v2_caps([len(cleaned.get(label, ())) for label in labels], caps, test_target)
    splits = balanced_split(cleaned, labels, caps, seed, name)
    manifest = make_manifest(name, labels, splits, seed, info, protocol, test_target if protocol == "v2" else None)
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


def _check_info(name: str, labels: Sequence[str], info: TaskInfo | None) -> None:
    if info is None:
        return
    if info.class_names and len(info.class_names) != len(labels):
        raise ValueError(f"task {name!r}: {len(info.class_names)} class_names for {len(labels)} labels")
    for template in info.templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise ValueError(f"task {name!r}: template {template!r} must hold exactly one '{{}}' and no other braces")
