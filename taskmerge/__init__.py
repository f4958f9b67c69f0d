"""taskmerge: merge models fine-tuned from one pretrained model into one multi-task model."""

from __future__ import annotations

__version__ = "0.1.0"
