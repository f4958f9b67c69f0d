"""The merge configuration (YAML file or CLI flags), validated with pydantic.

Example::

    base: models/clip-vit-base-patch32
    models: [models/ft-cars, models/ft-dtd, models/ft-eurosat]
    method: tsv_m
    options: {}
    lambda: 1.0
    output: merged/
    # weights: [1.0, 0.5, 0.5]   # per-model: each task update is multiplied by its weight
    # a MergeKit file (merge_method: ..., see taskmerge.mergekit_compat) is read as well
    # models may also be PEFT LoRA adapter folders; output_format: lora writes a LoRA adapter
    # output_format: lora
    # lora_rank: 16

Data-based methods (``adamerging``, ``mda_am``, ``moma``; :mod:`taskmerge.databased`) also need a ``data``
section: the frozen task heads and unlabeled inputs of every task (``options`` are then the data-based
method's options and ``lambda`` the λ of the data-free start)::

    method: moma
    options: {base: task_arithmetic, steps: 200}
    lambda: 0.3
    data:
      inputs: [texts/cars.txt, texts/dtd.txt, texts/eurosat.txt]   # one unlabeled text per line, per task
      heads: [heads/cars.safetensors, ...]     # default: head.safetensors in or next to each model folder
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskmerge.errors import OptionError, unknown_name
from taskmerge.io.writers import DEFAULT_SHARD_BYTES
from taskmerge.selection import DEFAULT_EXCLUDE, DEFAULT_MATRIX_EXCLUDE, TensorPolicy

__all__ = ["MergeConfig", "DataConfig", "load_config", "parse_option", "parse_size"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1048576``."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise OptionError(f"option max_shard_size: cannot parse size {value!r} (e.g. 5GB, 500MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_option(text: str) -> tuple[str, Any]:
    """One ``-o KEY=VALUE``: the key and VALUE parsed as YAML with ``yaml.safe_load`` (plain data only, so a
    tag such as ``!!python/object`` is refused); a malformed value is an :class:`OptionError` naming the key."""
    if "=" not in text:
        raise OptionError(f"option {text!r}: expected KEY=VALUE")
    key, value = (part.strip() for part in text.split("=", 1))
    if not key:
        raise OptionError(f"option {text!r}: no name before '='")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise OptionError(f"option {key}: cannot parse {value!r} as a YAML value ({reason})") from None


class DataConfig(BaseModel):
    """The ``data`` section of a data-based merge (see :mod:`taskmerge.databased.cli`).

    Attributes:
        inputs: one text file per task, one unlabeled input per line.
        tasks: alternatively, benchmark task names (:mod:`taskmerge.bench.datasets`): the texts of ``split``.
        split: the benchmark split whose texts (labels dropped) are the unlabeled inputs.
        heads: one head file per task (safetensors with ``weight`` and ``bias``); default: ``head.safetensors``
            in each model folder or in its parent (the benchmark's checkpoint layout).
        labeled: only for MDA-AM's ``class_means: labels`` variant (by default no data-based method reads a
            label): one ``label<TAB>text`` file per task; with ``tasks``, the benchmark's validation split is
            used when this is omitted.
        max_length: tokenisation length.
        normalize: L2-normalise the pooled features (default: as the heads say, else true).
    """

    model_config = ConfigDict(extra="forbid")

    inputs: list[Path] | None = None
    tasks: list[str] | None = None
    split: Literal["train", "val", "test"] = "test"
    heads: list[Path] | None = None
    labeled: list[Path] | None = None
    max_length: int = Field(48, ge=2)
    normalize: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.inputs is None) == (self.tasks is None):
            raise ValueError("give exactly one of inputs (text files) or tasks (benchmark task names)")
        return self


class MergeConfig(BaseModel):
    """Everything a merge needs; field names match the YAML keys and the CLI flags."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    base: Path
    models: list[Path] = Field(min_length=1)
    weights: list[float] | None = None
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    lam: float | None = Field(default=None, alias="lambda")
    output: Path
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    compute_dtype: Literal["float32", "float64"] = "float32"
    cast_inputs: bool = False
    device: str = "cpu"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    matrix_exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_MATRIX_EXCLUDE))
    overwrite: bool = False
    max_shard_size: int = DEFAULT_SHARD_BYTES
    output_format: Literal["dense", "lora"] = "dense"
    lora_rank: int | None = Field(default=None, ge=1)
    lora_drop_other: bool = False
    resume: bool = False
    workers: int | None = Field(default=None, ge=1)
    executor: Literal["thread", "ray"] = "thread"
    data: DataConfig | None = None

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @model_validator(mode="after")
    def _lora_rank_given(self) -> MergeConfig:
        if self.output_format == "lora" and self.lora_rank is None:
            raise ValueError("option lora_rank: required with output_format lora (e.g. --lora-rank 16 or lora_rank: 16)")
        return self

    @model_validator(mode="after")
    def _one_weight_per_model(self) -> MergeConfig:
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"option weights: {len(self.weights)} weight(s) for {len(self.models)} model(s)")
        return self

    def policy(self) -> TensorPolicy:
        """The tensor selection policy of this configuration."""
        return TensorPolicy(
            include=None if self.include is None else tuple(self.include),
            exclude=tuple(self.exclude),
            matrix_exclude=tuple(self.matrix_exclude),
        )

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "configuration") -> MergeConfig:
        """Validate a mapping; errors name the source and the offending key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise OptionError(f"{source}: {'; '.join(_problem(cls, err) for err in exc.errors())}") from None


def _problem(model: type[BaseModel], err: Any) -> str:
    """One pydantic error in words: an unknown key with the closest known one, a whole-model check's
    message without pydantic's ``Value error,`` prefix, else ``key: message``."""
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) in (1, 2):
        fields = model.model_fields if len(loc) == 1 else DataConfig.model_fields
        known = unknown_name("key", loc[-1], [f.alias or k for k, f in fields.items()])
        return known if len(loc) == 1 else f"{loc[0]}: {known}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {msg}" if loc else msg


_PATH_KEYS = ("base", "base_model", "output")  # base_model: a MergeKit file's


def _resolve_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of a configuration file relative to its folder (in place): ``base``,
    ``models`` (strings, or MergeKit's ``{model: ...}`` entries), ``output``, and ``data``'s file lists."""

    def resolved(value: Any) -> Any:
        return str(folder / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value

    for key in _PATH_KEYS:
        if key in data:
            data[key] = resolved(data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**m, "model": resolved(m["model"])} if isinstance(m, dict) and "model" in m else resolved(m)
            for m in data["models"]
        ]
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("inputs", "heads", "labeled"):
            if isinstance(section.get(key), list):
                section[key] = [resolved(v) for v in section[key]]


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file into a mapping (validated later, after CLI overrides).

    Relative paths in the file are relative to the file's folder, not to the working directory (paths
    given as flags stay relative to the working directory).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise OptionError(f"{p}: cannot read configuration ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{p}: a configuration must be a mapping of keys to values")
    _resolve_paths(data, p.parent)
    return data
