"""Image splits of the vision suite: the on-disk format, the papers' validation carve, CLIP preprocessing.

On-disk format (read by :func:`read_image_folder`; no dependency beyond Pillow)::

    <data_dir>/<task>/test/<label>/<any name>.png      # the test split (required)
    <data_dir>/<task>/train/<label>/...                 # the training split the validation split is carved from
    <data_dir>/<task>/val/<label>/...                   # optional: your own validation split (train/ is then unused)
    <data_dir>/<task>/classnames.txt                    # optional: one class name per line, replaces the built-in names

``<task>`` is the task's name (:data:`taskmerge.bench.vision.tasks.TASK_ORDER`), ``<label>`` the class index
as a decimal directory name (``0``, ``7``, ``017``), indexing the task's class names; any image format Pillow
reads (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``, ``.tif``). Examples are ordered by label,
then file name.

Validation (:func:`carve_validation`) follows ``task_vectors`` / TALL masks (the protocol of TSV-M, Iso-C,
DC-Merge and MDA): ``⌊0.1 · N_train⌋`` examples, at most 5000, drawn by ``torch.utils.data.random_split`` with
a generator seeded 0 — the last ``n_val`` entries of ``torch.randperm(N_train)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from taskmerge.errors import TaskmergeError

__all__ = ["ImageSplit", "ImageInputs", "Preprocess", "read_image_folder", "read_classnames", "carve_validation",
           "pixel_batches", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageSplit:
    """The examples of one split of one task: labels, and a function that reads image ``i`` (RGB)."""

    task: str
    split: str
    labels: torch.Tensor
    read: Callable[[int], Image.Image]
    source: str

    def __len__(self) -> int:
        return int(self.labels.numel())

    def image(self, index: int) -> Image.Image:
        """Example ``index`` as an RGB image."""
        return self.read(index)

    def subset(self, indices: Sequence[int], split: str) -> ImageSplit:
        """The examples at ``indices`` (in that order), as split ``split``."""
        idx = [int(i) for i in indices]
        read = self.read
        return ImageSplit(self.task, split, self.labels[torch.as_tensor(idx, dtype=torch.long)],
                          lambda i: read(idx[i]), f"{self.source} [{len(idx)} of {len(self)}]")


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def read_image_folder(root: Path, task: str, split: str, num_classes: int) -> ImageSplit:
    """Read ``root`` = ``<data_dir>/<task>/<split>`` (module docstring). Errors name the folder at fault."""
    if not root.is_dir():
        raise TaskmergeError(f"{root}: no such folder (expected {root}/<label>/<image files>)")
    entries: list[tuple[int, Path]] = []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir():
            continue
        if not sub.name.isdigit():
            raise TaskmergeError(f"{sub}: label folders must be class indices (0 … {num_classes - 1}), "
                                 f"got {sub.name!r}")
        label = int(sub.name)
        if label >= num_classes:
            raise TaskmergeError(f"{sub}: label {label} but task {task!r} has {num_classes} classes")
        entries += [(label, p) for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise TaskmergeError(f"{root}: no images (expected {root}/<label>/<image files>)")
    entries.sort(key=lambda e: (e[0], e[1].name))
    paths = [p for _, p in entries]
    labels = torch.tensor([label for label, _ in entries], dtype=torch.long)
    return ImageSplit(task, split, labels, lambda i: _open_rgb(paths[i]), str(root))


def read_classnames(path: Path, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names from ``classnames.txt`` (one per line; blank lines skipped)."""
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names or (num_classes is not None and len(names) != num_classes):
        raise TaskmergeError(f"{path}: {len(names)} class names, expected {num_classes or 'at least one'}")
    return names


def carve_validation(train: ImageSplit, fraction: float = 0.1, max_size: int | None = 5000,
                     seed: int = 0) -> ImageSplit:
    """The papers' validation split (module docstring): ``n = min(⌊fraction·N⌋, max_size)`` examples, the last
    ``n`` of ``torch.randperm(N)`` under a generator seeded ``seed`` (what ``random_split(train, [N − n, n])``
    gives its second part)."""
    total = len(train)
    size = int(total * fraction)
    if max_size is not None:
        size = min(size, max_size)
    if not 0 < size < total:
        raise TaskmergeError(f"task {train.task!r}: cannot carve {size} validation examples from {total} "
                             f"training examples ({train.source})")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return train.subset(perm[total - size:], "val")


class Preprocess:
    """CLIP's image preprocessing (resize, center crop, normalise) by the checkpoint's own image processor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 pixel values."""
        out = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out).float()


@dataclass(frozen=True)
class ImageInputs:
    """Unlabeled inputs of a data-based method (:class:`taskmerge.databased.loop.UnlabeledInputs`): the images
    of a split, preprocessed when a batch is drawn."""

    split: ImageSplit
    preprocess: Preprocess

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.preprocess([self.split.image(int(i)) for i in indices])


def pixel_batches(split: ImageSplit, preprocess: Preprocess, batch_size: int,
                  workers: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(positions, pixel values)`` of consecutive batches of the whole split, in order; with ``workers > 1``
    batches are decoded and preprocessed on a thread pool, at most ``workers + 1`` ahead of the consumer."""
    spans = [slice(s, min(s + batch_size, len(split))) for s in range(0, len(split), batch_size)]

    def work(span: slice) -> torch.Tensor:
        return preprocess([split.image(i) for i in range(span.start, span.stop)])

    if workers <= 1:
        for span in spans:
            yield span, work(span)
        return
    with ThreadPoolExecutor(workers) as pool:
        todo = iter(spans)
        pending = deque((span, pool.submit(work, span)) for span in islice(todo, workers + 1))
        while pending:
            span, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
            yield span, future.result()
