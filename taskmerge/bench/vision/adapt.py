"""Data-based rows of the vision suite: AdaMerging, MDA-AM and MOMA on the unlabeled test images.

The papers' protocol (``resolved.md``, MOMA 1; AdaMerging and MDA as published): each method adapts on the
**unlabeled test images** of every task and is scored on the same test sets; it starts from its data-free
counterpart (:func:`taskmerge.databased.start_method`) at the λ that counterpart chose on validation, which the
runner computes as an ordinary data-free row. MDA-AM uses no labels unless its option ``class_means="labels"``
(the label-using variant): its class means then come from the **validation** split's labels, and the row says so.

The methods run through :mod:`taskmerge.databased`'s public API with the CLIP image encoder as a
:class:`~taskmerge.databased.FunctionalEncoder` whose output is the normalised image feature, and the zero-shot
heads (logit scale included) as their heads. The data-based loop computes on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from taskmerge.bench.vision.images import ImageInputs
from taskmerge.bench.vision.suite import Suite
from taskmerge.databased import FunctionalEncoder, LabeledInputs, get_data_method, parse_data_options

__all__ = ["INIT_KEYS", "adapt"]

INIT_KEYS = {"adamerging": "init_lambda", "mda_am": "init_lambda", "moma": "lam"}
"""The option of each data-based method that takes its start's validation-chosen λ."""


def adapt(suite: Suite, method: str, options: Mapping[str, Any], start_lambda: float,
          start_vector: Mapping[str, torch.Tensor], *,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run data-based ``method`` on the suite; return the per-task test correctness of the merged encoder with
    the method's heads, and a record (options, loss curve, seconds, the method's info).

    Args:
        suite: the loaded suite.
        method: ``adamerging``, ``mda_am`` or ``moma``.
        options: the method's options (its start λ is filled in unless given).
        start_lambda: the λ the start method chose on validation.
        start_vector: the start method's merged task vector (MOMA's τ_agg; MDA-AM's layer-wise vectors).
        progress: the loop's progress bar (unless ``options`` sets it).
    """
    spec = get_data_method(method)
    opts = {INIT_KEYS[method]: float(start_lambda), "progress": progress, **dict(options)}
    parsed = parse_data_options(method, opts)
    names = suite.names
    inputs = [ImageInputs(suite.test[n], suite.preprocess) for n in names]
    kwargs: dict[str, Any] = {"encoder": FunctionalEncoder(suite.encoder, suite.base_sd)}
    vector = {k: v.cpu() for k, v in start_vector.items()}
    uses_labels = method == "mda_am" and parsed.class_means == "labels"
    if method == "mda_am":
        if uses_labels:
            kwargs["labeled"] = [LabeledInputs(ImageInputs(suite.val[n], suite.preprocess), suite.val[n].labels)
                                 for n in names]
        if getattr(parsed, "granularity", "layer") == "layer":
            kwargs["start_vector"] = vector
    if method == "moma":
        kwargs["start_vector"] = vector
    t0 = time.perf_counter()
    result = spec.fn(suite.base_sd, suite.task_sds, [suite.heads[n] for n in names], inputs, parsed, **kwargs)
    seconds = time.perf_counter() - t0
    correct = suite.correct(result.state_dict, "test", dict(zip(names, result.heads)))
    info = {k: v for k, v in result.info.items() if not isinstance(v, torch.Tensor)}
    record = {"options": parsed.model_dump(), "loss": result.history.loss, "train_seconds": seconds,
              "steps": len(result.history.loss), "info": info, "uses_labels": uses_labels}
    return correct, record
