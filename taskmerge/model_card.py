"""The files that describe a merged model: its model card (``README.md``) and its ``config.json``'s dtype.

The card is the merge request that ``--resume`` checks (:func:`taskmerge.merge.merge_checkpoints` records
it in the resume journal), written for people: the method and its paper, λ, the options, per-model weights,
which tensors were kept at the base, the dtypes and seed, every input with its identity (path, files, size
and a fingerprint of the sampled-content digests), the taskmerge version, and the request itself as JSON
with its SHA-256 (the digest a resume must match). A Hugging Face model card opens with YAML metadata;
the card's lists ``library_name`` and ``tags`` as MergeKit's cards do.

A base model folder's ``config.json`` is copied into the output; with an output dtype, its ``torch_dtype``
(transformers < 4.56) and ``dtype`` (later versions) keys are set to it (:func:`config_with_dtype`), so that
``from_pretrained`` loads a bfloat16 merge as bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskmerge import __version__

if TYPE_CHECKING:
    from taskmerge.registry import MethodSpec

__all__ = ["model_card", "config_with_dtype", "output_files"]

logger = logging.getLogger(__name__)

_DTYPE_KEYS = ("torch_dtype", "dtype")


def _digest(request: Mapping[str, Any]) -> str:
    """SHA-256 of the request as the resume journal computes it (:func:`taskmerge.io.writers.request_digest`)."""
    from taskmerge.io.writers import request_digest

    return request_digest(request)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _fingerprint(identity: Mapping[str, Any]) -> str:
    """A short fingerprint of an input's files (names, sizes, content digests): equal inputs, equal prints."""
    blob = json.dumps(identity.get("files", {}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _input_row(role: str, identity: Mapping[str, Any]) -> str:
    files = identity.get("files", {})
    total = sum(int(v[0]) for v in files.values() if isinstance(v, (list, tuple)) and v)
    return f"| {role} | `{identity.get('path', '?')}` | {len(files)} | {_size(total)} | `{_fingerprint(identity)}` |"


def _yaml_value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def model_card(request: Mapping[str, Any], *, paper: str = "", summary: str = "", version: str = __version__,
               resumable: bool = True) -> str:
    """The Markdown model card of a merge described by ``request`` (the resume journal's description:
    ``method``, ``options``, ``lambda``, ``policy``, ``compute_dtype``, ``output_dtype``, ``seed``, ``weights``,
    ``base`` and ``models`` identities); ``resumable=False`` for a merge that has no resume journal (a
    data-based one)."""
    method = request.get("method", "?")
    options = request.get("options") or {}
    policy = request.get("policy") or {}
    models = list(request.get("models") or [])
    weights = request.get("weights")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [merge, taskmerge, {method}]",
        "---",
        f"# Merged model: `{method}` of {len(models)} fine-tuned model(s)",
        "",
        f"Written by taskmerge {version} (`taskmerge merge`): θ = θ₀ + λ·τ, with θ₀ the base model and τ the "
        f"merged task vector of the fine-tuned models' updates θ_t − θ₀.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}`" + (f": {summary}" if summary else "") + " |",
    ]
    if paper:
        lines.append(f"| paper | {paper} |")
    lines += [
        f"| λ | {request.get('lambda', '?')} |",
        "| options | " + (", ".join(f"`{k}: {_yaml_value(v)}`" for k, v in options.items()) or "none") + " |",
        "| per-model weights | " + ("none (all 1)" if weights is None else ", ".join(f"{w:g}" for w in weights)) + " |",
        "| kept at the base | " + _policy_text(policy) + " |",
        f"| compute dtype | {str(request.get('compute_dtype', '?')).removeprefix('torch.')} |",
        f"| output dtype | {request.get('output_dtype') or 'the base model’s'} |",
        f"| seed | {request.get('seed', 0)} |",
        f"| taskmerge version | {version} |",
        "",
        "## Inputs",
        "",
        "Fingerprint: a hash of each input's file names, sizes and sampled-content digests (equal models, equal "
        "fingerprints).",
        "",
        "| role | path | files | size | fingerprint |",
        "|---|---|---|---|---|",
        _input_row("base", request.get("base") or {}),
        *(_input_row(f"model {i + 1}", m) for i, m in enumerate(models)),
        "",
        "## The request",
        "",
        (f"`taskmerge merge --resume` continues an interrupted merge only for this exact request (SHA-256 "
         f"`{_digest(request)}`):" if resumable else "The merge as requested:"),
        "",
        "```json",
        json.dumps(request, indent=1, sort_keys=True, ensure_ascii=False, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def _policy_text(policy: Mapping[str, Any]) -> str:
    parts = ["non-floating tensors"]
    if policy.get("include") is not None:
        parts.append("tensors not matching include " + ", ".join(f"`{p}`" for p in policy["include"]))
    if policy.get("exclude"):
        parts.append("tensors matching exclude " + ", ".join(f"`{p}`" for p in policy["exclude"]))
    return "; ".join(parts).replace("|", "\\|")


def config_with_dtype(config_text: str, dtype: str) -> str:
    """A ``config.json``'s text with every ``torch_dtype`` / ``dtype`` key (sub-configs included) set to
    ``dtype``; ``torch_dtype`` is added at the top when there is none."""
    data = json.loads(config_text)

    def visit(node: Any) -> bool:
        found = False
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _DTYPE_KEYS and (value is None or isinstance(value, str)):
                    node[key] = dtype
                    found = True
                elif isinstance(value, dict):
                    found |= visit(value)
        return found

    if not visit(data) and isinstance(data, dict):
        data["torch_dtype"] = dtype
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def output_files(base: str | Path, request: Mapping[str, Any], spec: MethodSpec | Any | None = None,
                 resumable: bool = True) -> dict[str, str]:
    """The descriptive files of a folder output, name → text: the model card, and the base's ``config.json``
    with the output dtype when ``request["output_dtype"]`` is set (a base folder without one: none).
    ``spec``: anything with ``paper`` and ``summary`` (a registry or data-based method)."""
    files = {"README.md": model_card(request, paper=getattr(spec, "paper", ""), summary=getattr(spec, "summary", ""),
                                     resumable=resumable)}
    dtype = request.get("output_dtype")
    config = Path(base) / "config.json"
    if dtype and Path(base).is_dir() and config.is_file():
        try:
            files["config.json"] = config_with_dtype(config.read_text(encoding="utf-8"), dtype)
        except ValueError:  # not JSON: copied unchanged with the base's other files
            logger.warning("%s: not valid JSON; its dtype is left as it is", config)
    return files
