"""The method catalog: what ``taskmerge methods`` prints, readable without importing torch.

The registry (:mod:`taskmerge.registry`) is the single source of truth, but importing it imports every
method and torch (seconds). ``catalog.json`` next to this module is generated from it —
``python -m taskmerge.catalog`` rewrites it, ``python -m taskmerge.catalog --check`` exits 1 when it is
out of date (a test runs the check) — and the command line reads only the JSON.

Each method's entry holds its paper, summary, kind, default λ and, per option, what the options' pydantic
fields say: the description, the type with its allowed values (``Literal`` values spelled out,
``Optional`` shown as "or none"), the default and the range (from ``Field(gt=…, ge=…, lt=…, le=…)``).
"""

from __future__ import annotations

import difflib
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from taskmerge.errors import OptionError

__all__ = ["CATALOG_PATH", "build_catalog", "load_catalog", "method_entry", "format_method", "format_list",
           "markdown_table", "type_text", "range_text", "default_text"]

CATALOG_PATH = Path(__file__).with_name("catalog.json")

_SCALARS = {bool: "bool", int: "int", float: "float", str: "str", dict: "mapping", list: "list", tuple: "tuple"}


def _value_text(value: Any) -> str:
    """A value as written in YAML / ``-o KEY=VALUE`` (``none``, ``true``, ``0.2``, ``tensor``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def type_text(annotation: Any) -> str:
    """A field's type in words: ``float``, ``one of tensor, global``, ``int or none``, ``list of int``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(_value_text(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in rest)
        return f"{text} or none" if len(rest) < len(args) else text
    if origin in (list, tuple, set) and args:
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(inner) > 1 and Ellipsis not in args:
            return "(" + ", ".join(type_text(a) for a in inner) + ")"
        return f"list of {type_text(inner[0])}"
    if origin is dict:
        return "mapping"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    return getattr(annotation, "__name__", str(annotation))


def range_text(metadata: list[Any]) -> str | None:
    """The bounds of ``Field(gt=…, ge=…, lt=…, le=…)`` as ``0 < x ≤ 1``, ``x ≥ 1``; ``None`` without bounds."""
    lower: tuple[str, str] | None = None  # (value, "<" or "≤")
    upper: tuple[str, str] | None = None
    for m in metadata:
        for attr, sign in (("gt", "<"), ("ge", "≤")):
            if getattr(m, attr, None) is not None:
                lower = (_value_text(getattr(m, attr)), sign)
        for attr, sign in (("lt", "<"), ("le", "≤")):
            if getattr(m, attr, None) is not None:
                upper = (_value_text(getattr(m, attr)), sign)
    if lower is None and upper is None:
        return None
    if upper is None:
        assert lower is not None
        return f"x {'>' if lower[1] == '<' else '≥'} {lower[0]}"
    if lower is None:
        return f"x {upper[1]} {upper[0]}"
    return f"{lower[0]} {lower[1]} x {upper[1]} {upper[0]}"


def default_text(field: Any) -> str:
    """A pydantic field's default in words (``required`` when it has none; factories are called)."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return _value_text(field.default_factory())
    return _value_text(field.default)


def describe_options(options: type) -> list[dict[str, Any]]:
    """One entry per field of a pydantic options class: name, type, default, range, description."""
    return [
        {"name": name, "type": type_text(f.annotation), "default": default_text(f), "range": range_text(f.metadata),
         "description": f.description or ""}
        for name, f in options.model_fields.items()
    ]


def build_catalog() -> dict[str, Any]:
    """The catalog from the registry and the data-based methods (imports every method, and torch).

    Methods whose name starts with ``_`` (tests register such) are left out.
    """
    from taskmerge.databased import DATA_METHODS
    from taskmerge.registry import list_methods

    methods: dict[str, Any] = {}
    for spec in list_methods():
        if spec.name.startswith("_"):
            continue
        methods[spec.name] = {"kind": "data-free" if spec.data_free else "data-based", "paper": spec.paper,
                              "summary": spec.summary, "default_lambda": spec.default_lambda,
                              "options": describe_options(spec.options)}
    for dm in DATA_METHODS.values():
        methods[dm.name] = {"kind": "data-based", "paper": dm.paper, "summary": dm.summary, "default_lambda": None,
                            "options": describe_options(dm.options)}
    return {"methods": dict(sorted(methods.items()))}


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, Any]:
    """The generated catalog (JSON only: no torch)."""
    return json.loads(path.read_text(encoding="utf-8"))


def method_entry(catalog: dict[str, Any], name: str) -> dict[str, Any]:
    """One method's entry; an unknown name raises :class:`OptionError` with the closest names."""
    methods = catalog["methods"]
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise OptionError(f"unknown method {name!r}{hint}; run `taskmerge methods` for the list")
    return methods[name]


def _lambda_text(entry: dict[str, Any]) -> str:
    return "" if entry["default_lambda"] is None else f", default λ={entry['default_lambda']}"


def format_list(catalog: dict[str, Any]) -> str:
    """``taskmerge methods``: one line per method (name, kind, default λ, summary)."""
    lines = []
    for name, entry in catalog["methods"].items():
        lines.append(f"{name:18} [{entry['kind']}{_lambda_text(entry)}]  {entry['summary']}")
    lines.append("\n`taskmerge methods NAME` shows a method's paper and options.")
    return "\n".join(lines)


def format_method(name: str, entry: dict[str, Any], width: int = 100) -> str:
    """``taskmerge methods NAME``: the paper, the summary and every option with its type, default and range."""
    lines = [f"{name}  [{entry['kind']}{_lambda_text(entry)}]", f"  {entry['summary']}", f"  paper: {entry['paper']}"]
    if not entry["options"]:
        lines.append("  options: none (λ only)")
    else:
        lines.append("  options (-o NAME=VALUE):")
    for opt in entry["options"]:
        facts = [opt["type"], f"default {opt['default']}"]
        if opt["range"]:
            facts.append(opt["range"])
        lines.append(f"    {opt['name']}: " + "; ".join(facts))
        if opt["description"]:
            lines.append(textwrap.fill(opt["description"], width, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


def markdown_table(catalog: dict[str, Any]) -> str:
    """The README's method table (data-free methods of the registry)."""
    rows = ["| method | paper | data | default λ | options |", "|---|---|---|---|---|"]
    for name, entry in catalog["methods"].items():
        if entry["kind"] != "data-free":
            continue
        opts = ", ".join(f"`{o['name']}`" for o in entry["options"]) or "–"
        paper = textwrap.shorten(entry["paper"], 70, placeholder=" …")
        rows.append(f"| `{name}` | {paper} | data-free | {entry['default_lambda']} | {opts} |")
    return "\n".join(rows)


def _dump(catalog: dict[str, Any]) -> str:
    return json.dumps(catalog, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m taskmerge.catalog [--check]``: rewrite ``catalog.json``, or check that it is up to date."""
    argv = sys.argv[1:] if argv is None else argv
    text = _dump(build_catalog())
    if "--check" in argv:
        if not CATALOG_PATH.exists() or CATALOG_PATH.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{CATALOG_PATH} is out of date: run `python -m taskmerge.catalog`\n")
            return 1
        return 0
    CATALOG_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
