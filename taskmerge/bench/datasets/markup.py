"""Plain text out of the markup of the benchmark's sources: XML-ish tags, dictd cross-reference braces, and
long passages clipped at a sentence boundary.

The encoder reads at most a few dozen tokens of an example, so a long passage (a commentary paragraph, a
dictionary sense) is clipped to its first sentences (:func:`clip_text`) rather than dropped.
"""

from __future__ import annotations

import html
import re

_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?;:][\"'\u201d\u2019)]*\s")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?\u2019\u201d)\]])")
_SPACE_AFTER = re.compile(r"([\u201c\u2018(\[])\s+")


def strip_tags(text: str) -> str:
    """Replace every ``<...>`` tag by a space, unescape HTML entities, collapse whitespace, and remove the spaces
    a tag leaves before closing punctuation (``word ,``) or after an opening quote or bracket (``“ word``)."""
    text = _WS.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def clip_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters: at the last sentence end (``. ! ? ; :``) inside the
    limit if there is one past its first third, else at the last space; texts within the limit are returned
    unchanged."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] > max_chars // 3:
        return head[: ends[-1]].strip()
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head[:max_chars]).strip()
