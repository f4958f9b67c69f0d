"""PEFT LoRA adapters as fine-tuned models.

A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``)
describes a fine-tuned model relative to its base: for every adapted module

    ΔW = scale · B A,    scale = lora_alpha / r   (lora_alpha / √r when ``use_rslora`` is true),

with ``lora_alpha`` taken from ``alpha_pattern`` where a pattern matches the module (PEFT's rule) and ``r``
the rank of the stored factors. Modules an adapter does not touch have ΔW = 0. :class:`PeftAdapterSource`
exposes ``θ_t = θ₀ + ΔW`` as a :class:`~taskmerge.io.readers.TensorSource` over the base, so every method
runs through the unchanged engine, and additionally

* ``task_update(name, dtype)``: ΔW itself, computed from the factors (the engine uses it instead of the
  rounded difference ``θ_t − θ₀``, which in bfloat16 would lose most of a small update);
* ``lowrank(name)``: ΔW as :class:`taskmerge.linalg.LowRank` ``(B, A, scale)`` in the base tensor's
  orientation (rank 0 for an untouched matrix), which the engine hands to methods as
  ``LayerContext.factors``.

What is read, per adapter key (the ``base_model.model.`` prefix of PEFT's LoRA state dicts removed; the config and weights files must lie in the
adapter folder once symlinks are resolved, :func:`taskmerge.io.readers.confined_path`):

* ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``: ``nn.Linear`` (``fan_in_fan_out`` transposes
  ΔW, as for GPT-2's ``Conv1D``) and ``nn.Conv*d`` (ΔW = B A over the flattened kernel, B being 1×1);
* ``<module>.lora_embedding_A`` / ``<module>.lora_embedding_B``: ``nn.Embedding`` (ΔW = (B A)ᵀ·scale);
* ``<module>.lora_B.bias`` (``lora_bias=True``): adds ``scale · bias`` to ``<module>.bias``;
* any other tensor mapping to a base tensor (biases trained with ``bias="all" | "lora_only"``, stored as
  ``<module>.base_layer.bias``; ``modules_to_save`` weights): replaces the base value.

DoRA (``use_dora``, ``lora_magnitude_vector``) and non-LoRA PEFT types are refused: their update is not
``scale · B A``. Module paths are mapped to the base checkpoint's tensor names directly or, when the
base was saved with a different wrapper (``bert.`` / ``model.`` prefixes, a bare encoder against a task
model or the other way round), by the one prefix substitution that maps every adapted module.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from taskmerge.errors import CheckpointError
from taskmerge.io.readers import TensorSource, _check_readable, _load_torch_state_dict, confined_path
from taskmerge.linalg import LowRank

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PeftAdapterSource",
    "is_adapter",
    "open_adapter",
    "lora_scale",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>A|B)$")
_REFUSED = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters are not supported: their update is not scale·B·A",
    "trainable_tokens": "trainable-token deltas are not supported",
}


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``) or that config file."""
    p = Path(path)
    return (p.is_dir() and (p / ADAPTER_CONFIG).is_file()) or (p.is_file() and p.name == ADAPTER_CONFIG)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling of ``B A``: ``alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Entry:
    """What an adapter does to one base tensor."""

    kind: str  # "lowrank" (ΔW = factors, reshaped to shape), "add" (ΔW = value), "replace" (θ_t = value)
    keys: tuple[str, ...]
    factors: LowRank | None = None
    value: torch.Tensor | None = None


@dataclass
class _Module:
    """The LoRA tensors of one adapted module, gathered from the state dict."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    b_bias: torch.Tensor | None = None
    embedding: bool = False
    keys: tuple[str, ...] = ()


class PeftAdapterSource:
    """A PEFT LoRA adapter read against its base model (see the module docstring).

    Args:
        path: the adapter folder (or its ``adapter_config.json``).
        base: the base model it was trained on, as a :class:`TensorSource`.
        label: name used in messages (default: the folder).
    """

    def __init__(self, path: str | Path, base: TensorSource, label: str | None = None) -> None:
        p = Path(path)
        self.folder = p.parent if p.is_file() else p
        self.base = base
        self.label = label or str(self.folder)
        self.config = self._read_config()
        self.weights_file = self._weights_file()
        state = self._read_weights()
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.rslora = bool(self.config.get("use_rslora", False))
        self._entries: dict[str, _Entry] = {}
        self._build(state)
        if not self._entries:
            raise CheckpointError(f"{self.weights_file}: the adapter changes no tensor of the base model")

    # -- reading ------------------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        path = confined_path(self.folder, ADAPTER_CONFIG, str(self.folder))
        try:
            config = json.loads(path.read_text())
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read adapter config ({exc.strerror})") from None
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: an adapter config must be a JSON object")
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA adapters)")
        if config.get("use_dora"):
            raise CheckpointError(f"{path}: {_REFUSED['lora_magnitude_vector']}")
        return config

    def _weights_file(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.folder / name).is_file():
                return confined_path(self.folder, name, str(self.folder))
        raise CheckpointError(f"{self.folder}: adapter folder holds no {' or '.join(ADAPTER_WEIGHTS)}")

    def _read_weights(self) -> dict[str, torch.Tensor]:
        path = self.weights_file
        if path.suffix == ".safetensors":
            _check_readable(path)
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
        return dict(_load_torch_state_dict(path))

    # -- interpretation -----------------------------------------------------------------------------

    def _build(self, state: dict[str, torch.Tensor]) -> None:
        modules: dict[str, _Module] = {}
        others: dict[str, tuple[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            for marker, why in _REFUSED.items():
                if marker in key:
                    raise CheckpointError(f"{self.weights_file}: tensor {key!r}: {why}")
            rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if (m := _LORA_KEY.match(rel)) is not None:
                mod = modules.setdefault(m["module"], _Module())
                mod.keys += (key,)
                if m["param"] == "bias":
                    if m["part"] != "lora_B":
                        raise CheckpointError(f"{self.weights_file}: unexpected LoRA tensor {key!r}")
                    mod.b_bias = tensor
                elif m["part"] == "lora_A":
                    mod.a = tensor
                else:
                    mod.b = tensor
            elif (m := _EMBED_KEY.match(rel)) is not None:
                mod = modules.setdefault(m["module"], _Module())
                mod.keys += (key,)
                mod.embedding = True
                if m["part"] == "A":
                    mod.a = tensor
                else:
                    mod.b = tensor
            elif "lora_" in rel:
                raise CheckpointError(f"{self.weights_file}: unsupported adapter tensor {key!r}")
            else:
                # modules_to_save copies and trained biases replace the base value
                name = rel.replace(".base_layer.", ".").replace(".original_module.", ".")
                name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
                others[name] = (key, tensor)
        for module, mod in modules.items():
            if mod.a is None or mod.b is None:
                raise CheckpointError(f"{self.weights_file}: module {module!r} has lora_A without lora_B or the other way round")
        mapping = self._resolve_names(list(modules), list(others))
        for module, mod in modules.items():
            self._add_lora(mapping.prefix(module), module, mod)
        base_names = set(self.base.keys())
        for name, (key, tensor) in others.items():
            target = mapping.apply(name)
            if target is None or target not in base_names:
                logger.warning("%s: tensor %r matches no tensor of the base model; ignored", self.weights_file, key)
                continue
            self._add_entry(target, _Entry("replace", (key,), value=tensor), key)

    def _resolve_names(self, modules: list[str], others: list[str]) -> _NameMap:
        base_names = set(self.base.keys())
        targets = [f"{m}.weight" for m in modules] or others
        if not targets:
            raise CheckpointError(f"{self.weights_file}: the adapter holds no LoRA tensors")
        rules = [_NameMap("", "")]
        first = targets[0].split(".")
        for i in range(len(first) - 1):
            tail = ".".join(first[i:])
            strip = ".".join(first[:i])
            for name in sorted(base_names):
                if name == tail or name.endswith("." + tail):
                    rule = _NameMap(strip + "." if strip else "", name[: len(name) - len(tail)])
                    if rule not in rules:
                        rules.append(rule)
        for rule in rules:
            if all(rule.apply(t) in base_names for t in targets):
                if rule.strip or rule.add:
                    logger.info("%s: adapter module names mapped to the base by replacing prefix %r with %r",
                                self.label, rule.strip, rule.add)
                return rule
        missing = next(t for t in targets if t not in base_names)
        raise CheckpointError(
            f"{self.weights_file}: adapted module {missing.removesuffix('.weight')!r} has no tensor "
            f"{missing!r} in the base model {self.base.label} (is this the base the adapter was trained on?)"
        )

    def _add_lora(self, target_module: str, module: str, mod: _Module) -> None:
        assert mod.a is not None and mod.b is not None
        a, b = mod.a, mod.b
        key = mod.keys[0]
        rank = int(a.shape[0])
        if b.ndim < 2 or int(b.shape[1]) != rank:
            raise CheckpointError(f"{self.weights_file}: module {module!r}: lora_B of shape {list(b.shape)} does not "
                                  f"match lora_A of shape {list(a.shape)}")
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
        scale = lora_scale(alpha, rank, self.rslora)
        name = f"{target_module}.weight"
        shape, _ = self.base.meta(name)
        if mod.embedding:
            factors = LowRank(a.T, b.T, scale)  # ΔW = (B A)ᵀ·scale = Aᵀ Bᵀ·scale
        elif a.ndim == 2 and b.ndim == 2:
            factors = LowRank(a.T, b.T, scale) if self.fan_in_fan_out else LowRank(b, a, scale)
        else:  # convolutions: B is a 1×1 kernel, ΔW = B A over the flattened kernel
            if any(int(d) != 1 for d in b.shape[2:]):
                raise CheckpointError(f"{self.weights_file}: module {module!r}: lora_B kernel {list(b.shape[2:])} is not 1×1")
            factors = LowRank(b.reshape(b.shape[0], rank), a.reshape(rank, -1), scale)
        m, n = factors.shape
        ok = (m, n) == tuple(shape) if len(shape) == 2 else (len(shape) > 2 and m * n == math.prod(shape) and m == shape[0])
        if not ok:
            raise CheckpointError(
                f"{self.weights_file}: module {module!r}: LoRA update of shape {[m, n]} does not fit base tensor "
                f"{name!r} of shape {list(shape)}"
            )
        self._add_entry(name, _Entry("lowrank", mod.keys, factors=factors), key)
        if mod.b_bias is not None:
            bias_name = f"{target_module}.bias"
            if bias_name not in set(self.base.keys()):
                raise CheckpointError(f"{self.weights_file}: module {module!r} has lora_B.bias but the base has no {bias_name!r}")
            self._add_entry(bias_name, _Entry("add", mod.keys, value=mod.b_bias * scale), key)

    def _add_entry(self, name: str, entry: _Entry, key: str) -> None:
        if name in self._entries:
            raise CheckpointError(f"{self.weights_file}: tensor {key!r} changes base tensor {name!r} a second time")
        shape, _ = self.base.meta(name)
        if entry.value is not None and tuple(entry.value.shape) != tuple(shape):
            raise CheckpointError(f"{self.weights_file}: tensor {key!r} has shape {list(entry.value.shape)}, "
                                  f"base tensor {name!r} has {list(shape)}")
        self._entries[name] = entry

    # -- the TensorSource protocol -------------------------------------------------------------------

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.base.meta(name)

    def location(self, name: str) -> str:
        return str(self.weights_file) if name in self._entries else self.base.location(name)

    def get(self, name: str) -> torch.Tensor:
        """``θ₀ + ΔW`` (computed in float32, or float64 for a float64 base) in the base tensor's dtype."""
        theta0 = self.base.get(name)
        entry = self._entries.get(name)
        if entry is None:
            return theta0
        if entry.kind == "replace":
            assert entry.value is not None
            return entry.value.to(theta0.dtype)
        work = torch.float64 if theta0.dtype == torch.float64 else torch.float32
        return (theta0.to(work) + self.task_update(name, work)).to(theta0.dtype)

    # -- exact updates and factors ---------------------------------------------------------------------

    def adapted(self) -> list[str]:
        """Names of the base tensors this adapter changes."""
        return list(self._entries)

    def task_update(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW = θ_t − θ₀`` of one tensor in ``dtype``, exact from the factors; zeros where untouched."""
        entry = self._entries.get(name)
        shape, _ = self.base.meta(name)
        if entry is None:
            return torch.zeros(shape, dtype=dtype)
        if entry.kind == "lowrank":
            assert entry.factors is not None
            return entry.factors.dense(dtype).reshape(shape)
        assert entry.value is not None
        if entry.kind == "add":
            return entry.value.to(dtype)
        return entry.value.to(dtype) - self.base.get(name).to(dtype)

    def lowrank(self, name: str) -> LowRank | None:
        """ΔW of a 2-D tensor as ``LowRank(B, A, scale)`` (rank 0 where untouched); ``None`` if not low-rank."""
        shape, _ = self.base.meta(name)
        if len(shape) != 2:
            return None
        entry = self._entries.get(name)
        if entry is None:
            return LowRank(torch.zeros(shape[0], 0), torch.zeros(0, shape[1]), 1.0)
        return entry.factors if entry.kind == "lowrank" else None

    def rank(self, name: str) -> int | None:
        """The LoRA rank of tensor ``name`` (0 if untouched), ``None`` if it is replaced or added densely."""
        entry = self._entries.get(name)
        if entry is None:
            return 0
        return entry.factors.rank if entry.factors is not None else None

    def close(self) -> None:
        """Nothing to release (the adapter is held in memory; the base is closed by its owner)."""


@dataclass(frozen=True)
class _NameMap:
    """Maps an adapter's tensor name to the base's: replace the prefix ``strip`` by ``add``."""

    strip: str
    add: str

    def apply(self, name: str) -> str | None:
        if not name.startswith(self.strip):
            return None
        return self.add + name[len(self.strip):]

    def prefix(self, module: str) -> str:
        mapped = self.apply(module)
        assert mapped is not None
        return mapped


def open_adapter(path: str | Path, base: TensorSource | str | Path | None) -> PeftAdapterSource:
    """Open a PEFT adapter folder against ``base`` (a :class:`TensorSource` or a checkpoint path)."""
    p = Path(path)
    if base is None:
        raise CheckpointError(
            f"{p}: is a PEFT adapter (adapter_config.json); reading it needs the base model it was trained on"
        )
    if isinstance(base, (str, Path)):
        from taskmerge.io.readers import open_checkpoint

        base = open_checkpoint(base)
    return PeftAdapterSource(p, base)
