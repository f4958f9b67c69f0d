"""Synthetic toy tasks for smoke tests (no external source; generated from the seed).

License: generated here (Apache-2.0, as taskmerge).

Tasks:

* ``toy_letters`` — 2 classes: a "sentence" of random words over the letters ``a-m`` (``first_half``) or
  over ``n-z`` (``second_half``).
* ``toy_length`` — 3 classes: 2, 5 or 9 random words (``short``, ``medium``, ``long``).
"""

from __future__ import annotations

import random
import string

from taskmerge.bench.datasets.common import TaskData, TaskInfo, build_task

_CAPS = {"train": 100, "val": 30, "test": 60}
_V2_TEST_TARGET = 150  # small: the toy tasks keep smoke tests fast under protocol v2 too
_POOL = 400  # texts generated per class (more than the caps need, so the split logic is exercised)


def _words(rng: random.Random, letters: str, count: int) -> str:
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(count))


def _info(name: str, description: str, short: str, class_names: tuple[str, ...]) -> TaskInfo:
    return TaskInfo(name=name, source="synthetic (taskmerge.bench.datasets.toy)", license="Apache-2.0",
                    description=description, install="", short_name=short, class_names=class_names,
                    templates=("{}", "a text of {} words.", "words: {}"))


def toy_letters(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Random words over ``a-m`` versus over ``n-z``."""
    rng = random.Random(1000 + seed)
    lo, hi = string.ascii_lowercase[:13], string.ascii_lowercase[13:]
    groups = {
        "first_half": [_words(rng, lo, rng.randint(2, 6)) for _ in range(_POOL)],
        "second_half": [_words(rng, hi, rng.randint(2, 6)) for _ in range(_POOL)],
    }
    info = _info("toy_letters", "letters a-m vs n-z", "ToyLet", ("abcdefghijklm", "nopqrstuvwxyz"))
    return build_task("toy_letters", groups, seed, info=info, caps=_CAPS, protocol=protocol,
                      test_target=_V2_TEST_TARGET)


def toy_length(seed: int = 0, protocol: str = "v2") -> TaskData:
    """Number of random words: 2, 5 or 9."""
    rng = random.Random(2000 + seed)
    groups = {
        name: [_words(rng, string.ascii_lowercase, n) for _ in range(_POOL)]
        for name, n in (("short", 2), ("medium", 5), ("long", 9))
    }
    info = _info("toy_length", "2 / 5 / 9 words", "ToyLen", ("ab cd", "ab cd ef gh ij", "ab cd ef gh ij kl mn op qr"))
    return build_task("toy_length", groups, seed, info=info, caps=_CAPS, protocol=protocol,
                      test_target=_V2_TEST_TARGET)
