"""Errors raised by taskmerge for bad input, and how their messages name options.

Every error a user can cause is a :class:`TaskmergeError` whose message names the file, tensor or
option at fault; the CLI prints it on one line and exits with code 2.

A message that tells the user what to pass spells the option for whoever called: ``overwrite=True`` to
a Python caller of :func:`taskmerge.merge.merge_checkpoints`, ``--overwrite`` on the command line
(:func:`option_hint`; the CLI wraps its work in :func:`cli_spelling`).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["TaskmergeError", "CheckpointError", "OptionError", "OutputError", "cli_spelling", "option_hint",
           "unknown_name"]


class TaskmergeError(Exception):
    """Bad input: a missing or mismatched tensor, an unreadable file, an invalid option."""


class CheckpointError(TaskmergeError):
    """A checkpoint cannot be read, or its tensors disagree with the base model's."""


class OptionError(TaskmergeError):
    """A method, option or configuration value is invalid."""


class OutputError(CheckpointError):
    """The output cannot be written: permission denied, disk full, a folder that is not ours to replace."""


_CLI: ContextVar[bool] = ContextVar("taskmerge_cli_spelling", default=False)


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, :func:`option_hint` spells options as command-line flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option_hint(name: str, value: Any = True) -> str:
    """How the caller sets option ``name`` to ``value``: ``--lora-rank 16`` on the command line,
    ``lora_rank=16`` in Python (a true flag is just ``--overwrite`` / ``overwrite=True``)."""
    if _CLI.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value!r}"


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """``unknown <kind> 'nme' (did you mean 'name'?); known <kind>s: …`` (the closest by ``difflib``)."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known {kind}s: {', '.join(known) or '(none)'}"
