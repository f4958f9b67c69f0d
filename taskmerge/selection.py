"""Which tensors a merge touches, and how.

Every tensor falls in one of three classes:

* ``KEEP`` — left at the base model's value: non-floating tensors (index buffers), tensors matched
  by ``exclude`` (default: classification heads — ``classifier``, ``score``, ``qa_outputs``, ``head(s)`` —
  whose classes differ per task), tensors not matched by ``include`` when it is given;
* ``MATRIX`` — 2-D weight matrices, which get a method's matrix (SVD-based) treatment;
* ``OTHER`` — everything else that is merged (biases, norms, 4-D convs, and 2-D tensors matched by
  ``matrix_exclude``: embedding tables and CLIP's ``text_projection``). Methods flagged
  ``matrix_only`` average these, as the TSV-M and Iso-C reference implementations do.

Patterns are Python regular expressions searched (``re.search``) in the tensor name.

A causal LM's ``lm_head`` is merged like any other matrix, as MergeKit does (its rows are the shared
vocabulary, not per-task classes); ``--exclude 'lm_head'`` keeps it at the base.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from taskmerge.errors import OptionError

__all__ = ["TensorClass", "TensorPolicy", "DEFAULT_EXCLUDE", "DEFAULT_MATRIX_EXCLUDE"]

DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(classifier|score|qa_outputs|heads?)\.",
)
DEFAULT_MATRIX_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(word|position|token_type)_embeddings\.",
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|shared)\.",
    r"(^|\.)(position_embedding|class_embedding|positional_embedding)(\.|$)",
    r"text_projection",
)


class TensorClass(Enum):
    """How a tensor is merged (see the module docstring)."""

    KEEP = "keep"
    MATRIX = "matrix"
    OTHER = "other"


def _compile(patterns: Sequence[str], option: str) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise OptionError(f"option {option}: invalid regular expression {p!r} ({exc})") from None
    return compiled


@dataclass(frozen=True)
class TensorPolicy:
    """Regex include / exclude lists deciding each tensor's :class:`TensorClass`."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    matrix_exclude: tuple[str, ...] = DEFAULT_MATRIX_EXCLUDE
    _include: list[re.Pattern[str]] | None = field(init=False, repr=False, compare=False)
    _exclude: list[re.Pattern[str]] = field(init=False, repr=False, compare=False)
    _matrix_exclude: list[re.Pattern[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", None if self.include is None else _compile(self.include, "include"))
        object.__setattr__(self, "_exclude", _compile(self.exclude, "exclude"))
        object.__setattr__(self, "_matrix_exclude", _compile(self.matrix_exclude, "matrix_exclude"))

    def keep_reason(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> str | None:
        """Why tensor ``name`` is kept at the base value (``None`` if it is merged), in words."""
        if not dtype.is_floating_point:
            return "non-floating tensor(s)"
        if self._include is not None and not any(p.search(name) for p in self._include):
            return "tensor(s) not matched by include"
        for pattern, compiled in zip(self.exclude, self._exclude):
            if compiled.search(name):
                head = " (classification heads)" if pattern in DEFAULT_EXCLUDE else ""
                return f"tensor(s) matched by exclude {pattern!r}{head}"
        return None

    def classify(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> TensorClass:
        """The class of tensor ``name`` with the given shape and dtype."""
        if not dtype.is_floating_point:
            return TensorClass.KEEP
        if self._include is not None and not any(p.search(name) for p in self._include):
            return TensorClass.KEEP
        if any(p.search(name) for p in self._exclude):
            return TensorClass.KEEP
        if len(shape) == 2 and not any(p.search(name) for p in self._matrix_exclude):
            return TensorClass.MATRIX
        return TensorClass.OTHER
