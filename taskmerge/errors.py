"""Errors raised by taskmerge for bad input.

Every error a user can cause is a :class:`TaskmergeError` whose message names the file, tensor or
option at fault; the CLI prints it on one line and exits with a non-zero code.
"""

from __future__ import annotations


class TaskmergeError(Exception):
    """Bad input: a missing or mismatched tensor, an unreadable file, an invalid option."""


class CheckpointError(TaskmergeError):
    """A checkpoint cannot be read, or its tensors disagree with the base model's."""


class OptionError(TaskmergeError):
    """A method, option or configuration value is invalid."""
