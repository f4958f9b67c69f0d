"""Data-based merging: methods that learn from unlabeled inputs after the task vectors are fixed.

* :func:`~taskmerge.databased.adamerging.adamerging` — AdaMerging (Yang et al., ICLR 2024): task- or
  layer-wise coefficients by entropy minimisation;
* :func:`~taskmerge.databased.mda_am.mda_am` — MDA-AM (Chen et al., Alg. 2): layer-wise λ on MDA-TA's ETF-aligned
  vectors plus one feature rotation per task;
* :func:`~taskmerge.databased.moma.moma` — MOMA (Kong et al., Eq. 10): a mask over the merged task vector and
  per-task alignment matrices, absorbed into weights and heads.

All share one training loop (:mod:`taskmerge.databased.loop`) that evaluates the merged encoder with
``torch.func.functional_call`` (:mod:`taskmerge.databased.encoder`: length-chunked steps, only the embedding
rows a step reads). Defaults are the papers' schedules: AdaMerging and MDA-AM 500 steps × batch 16, lr 1e-3;
MOMA 1000 steps × batch 24 (text), App. B.3's learning rates. :mod:`taskmerge.databased.ceiling` computes
what an exact feature alignment could reach (MOMA §3.3). Every method has the signature

    fn(base_sd, task_sds, heads, unlabeled_inputs, options, *, encoder, ...) -> DataMergeResult

and the result unpacks as ``encoder_sd, heads = result``. ``encoder`` is a
:class:`~taskmerge.databased.encoder.FunctionalEncoder` (architecture + feature function), ``heads`` are objects
with ``weight`` (C_t × d) and ``bias``, ``unlabeled_inputs`` one tensor or
:class:`~taskmerge.databased.loop.UnlabeledInputs` per task. :data:`DATA_METHODS` maps names to
``(name, function, options class, paper, summary)``; the benchmark hook is
:func:`taskmerge.databased.bench.evaluate_databased` and the command line's is
:func:`taskmerge.databased.cli.merge_with_data`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from taskmerge.databased.adamerging import AdaMergingOptions, adamerging
from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
from taskmerge.databased.loop import (
    DataMergeResult,
    LabeledInputs,
    LinearHead,
    LoopOptions,
    TensorInputs,
    TokenInputs,
)
from taskmerge.databased.mda_am import MDAAMOptions, mda_am
from taskmerge.databased.moma import MOMAOptions, moma
from taskmerge.errors import OptionError

__all__ = [
    "DATA_METHODS",
    "DataMethod",
    "get_data_method",
    "adamerging",
    "mda_am",
    "moma",
    "AdaMergingOptions",
    "MDAAMOptions",
    "MOMAOptions",
    "DataMergeResult",
    "FunctionalEncoder",
    "LabeledInputs",
    "LinearHead",
    "LoopOptions",
    "TensorInputs",
    "TokenInputs",
    "mean_pool_features",
]


class DataMethod(NamedTuple):
    """A data-based method: its function, options class, paper and the data-free method it starts from."""

    name: str
    fn: Any
    options: type
    paper: str
    summary: str


DATA_METHODS: dict[str, DataMethod] = {
    "adamerging": DataMethod(
        "adamerging", adamerging, AdaMergingOptions,
        "Yang et al., ICLR 2024 (AdaMerging): task-/layer-wise coefficients by entropy minimisation",
        "coefficients λ_t^(l) learned on unlabeled inputs, initialised at Task Arithmetic's λ"),
    "mda_am": DataMethod(
        "mda_am", mda_am, MDAAMOptions,
        "Chen et al., arXiv 2512.00391 (MDA), Alg. 2, Eqs. 4–9",
        "layer-wise λ on MDA-TA's ETF-aligned vectors + one SO(d) feature rotation per task, absorbed into the heads "
        "(no label; class means from pseudo-labels)"),
    "moma": DataMethod(
        "moma", moma, MOMAOptions,
        "Kong et al. (MOMA: Masked Orthogonal Matrix Alignment), Eq. 10",
        "a sigmoid mask over the base merge's task vector + per-task alignment matrices absorbed into the heads"),
}


def start_method(name: str, options: Any) -> str:
    """The data-free method a data-based run starts from (whose validation-chosen λ initialises it)."""
    if name == "adamerging":
        return "task_arithmetic"
    if name == "mda_am":
        return "mda_ta" if getattr(options, "parameter_alignment", True) else "task_arithmetic"
    if name == "moma":
        return getattr(options, "base", "task_arithmetic")
    raise OptionError(f"unknown data-based method {name!r}; known: {', '.join(DATA_METHODS)}")


def get_data_method(name: str) -> DataMethod:
    """Look a data-based method up by name."""
    try:
        return DATA_METHODS[name]
    except KeyError:
        raise OptionError(f"unknown data-based method {name!r}; known: {', '.join(DATA_METHODS)}") from None


def parse_data_options(name: str, options: Any) -> Any:
    """Validate a mapping of options for data-based method ``name`` (errors name the option)."""
    from taskmerge.databased.loop import parse_options_as

    return parse_options_as(get_data_method(name).options, options, name)
