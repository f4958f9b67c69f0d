"""The merge configuration (YAML file or CLI flags), validated with pydantic.

Example::

    base: models/clip-vit-base-patch32
    models: [models/ft-cars, models/ft-dtd, models/ft-eurosat]
    method: tsv_m
    options: {}
    lambda: 1.0
    output: merged/
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

from taskmerge.errors import OptionError
from taskmerge.io.writers import DEFAULT_SHARD_BYTES
from taskmerge.selection import DEFAULT_EXCLUDE, DEFAULT_MATRIX_EXCLUDE, TensorPolicy

__all__ = ["MergeConfig", "DataConfig", "load_config", "parse_size"]

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


class DataConfig(BaseModel):
    """The ``data`` section of a data-based merge (see :mod:`taskmerge.databased.cli`).

    Attributes:
        inputs: one text file per task, one unlabeled input per line.
        tasks: alternatively, benchmark task names (:mod:`taskmerge.bench.datasets`): the texts of ``split``.
        split: the benchmark split whose texts (labels dropped) are the unlabeled inputs.
        heads: one head file per task (safetensors with ``weight`` and ``bias``); default: ``head.safetensors``
            in each model folder or in its parent (the benchmark's checkpoint layout).
        labeled: MDA-AM's class means: one ``label<TAB>text`` file per task; with ``tasks``, the benchmark's
            validation split is used when this is omitted.
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
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    lam: float | None = Field(default=None, alias="lambda")
    output: Path
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    compute_dtype: Literal["float32", "float64"] = "float32"
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
            raise ValueError("output_format lora needs lora_rank (e.g. --lora-rank 16)")
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
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in exc.errors()
            )
            raise OptionError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file into a mapping (validated later, after CLI overrides)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise OptionError(f"{p}: cannot read configuration ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{p}: a configuration must be a mapping of keys to values")
    return data
