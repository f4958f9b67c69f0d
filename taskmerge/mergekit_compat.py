"""MergeKit configuration files, read as taskmerge merges.

``taskmerge merge mergekit.yaml --output out/`` accepts a MergeKit YAML file (recognised by its
``merge_method`` key) for the methods both tools have, and translates it into taskmerge's configuration
(:class:`taskmerge.config.MergeConfig` keys) with MergeKit's conventions spelled out as options, so that
the merge equals MergeKit's (to float32 rounding; the tests compare with MergeKit 0.1.5):

=================  =====================================================================================
``merge_method``   taskmerge
=================  =====================================================================================
``linear``         ``task_arithmetic``, λ = 1, weights ``w_i / Σ w`` (``normalize: true``, the default):
                   ``Σ w_i θ_i / Σ w`` = ``θ₀ + Σ (w_i / Σ w)(θ_i − θ₀)`` for any base θ₀ (``base_model``,
                   an input with its own weight as in MergeKit, else the first model); ``normalize: false``
                   only when the weights sum to 1
``task_arithmetic`` ``task_arithmetic``, λ = ``parameters.lambda`` (1), weights ``w_i`` (``/ Σ w`` with
                   ``normalize: true``)
``ties``           ``ties`` with ``keep`` = density, ``boundary: floor`` (MergeKit keeps ``max(1,
                   int(density·numel))`` entries per tensor), ``disjoint: mean`` (``normalize: true``, the
                   default: divided by the agreeing weights' sum) or ``sum``
``dare_linear``    ``dare`` with ``p`` = 1 − density, ``rescale_to: l1``, ``rng: mergekit``,
                   ``combine: task_arithmetic``
``dare_ties``      the same with ``combine: ties``, ``ties_keep: 1``, ``ties_disjoint: sum`` (``normalize:
                   false``, the default) or ``mean``
=================  =====================================================================================

Per-model ``parameters.weight`` (required, as in MergeKit) and ``density`` (default 1) fall back on the
top-level ``parameters``; a model listed that is the ``base_model`` is the base, not a task (``linear``
averages it with the others, with its weight). ``dtype`` /
``out_dtype`` give the output dtype (taskmerge computes in float32 whatever it is: MergeKit computes in
``dtype``, so a bfloat16 MergeKit merge differs by bfloat16 rounding). ``tokenizer_source: base`` (or
``tokenizer: {source: base}``) is what taskmerge does anyway (the base's tokenizer files are copied);
``union`` or another model's tokenizer would resize the vocabulary and is refused, as are per-layer
gradients (a list as a parameter value), conditional parameters, ``slices`` and ``modules``.

DARE draws like MergeKit only with the same seed: ``taskmerge merge --seed S`` ↔ ``mergekit-yaml
--random-seed S``; and ties in MergeKit's sign election (an exactly zero sum elects ``+``) are not
reproduced (they need non-zero trimmed values that cancel exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from taskmerge.errors import OptionError

__all__ = ["MERGEKIT_METHODS", "is_mergekit_config", "from_mergekit"]

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
_UNSUPPORTED_KEYS = {
    "slices": "slices (layer ranges of different models)",
    "modules": "modules",
    "chat_template": "chat_template",
}
_HANDLED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer"}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_GLOBAL_DEFAULTS: dict[str, dict[str, Any]] = {  # MergeKit 0.1.5's defaults per method
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "rescale": False, "lambda": 1.0},
    "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0},
}


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """Whether a configuration mapping is a MergeKit file (it has ``merge_method``)."""
    return "merge_method" in data


def _scalar(value: Any, where: str, name: str) -> float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        raise OptionError(f"{where}: parameter {name}: conditional (filtered) parameters are not supported by "
                          "taskmerge; give one number")
    if isinstance(value, list):
        raise OptionError(f"{where}: parameter {name}: per-layer gradients (a list of values) are not supported by "
                          "taskmerge; give one number")
    raise OptionError(f"{where}: parameter {name}: expected a number, got {value!r}")


def _params(entry: Any, where: str) -> dict[str, Any]:
    params = entry.get("parameters") if isinstance(entry, Mapping) else None
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise OptionError(f"{where}: parameters must be a mapping of names to values")
    return {str(k): _scalar(v, where, str(k)) for k, v in params.items()}


def _model_path(entry: Any, where: str) -> str:
    if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
        return entry["model"]
    raise OptionError(f"{where}: expected a mapping with a model path (`- model: path/to/model`), got {entry!r}")


def _tokenizer_source(data: Mapping[str, Any], source: str) -> None:
    value = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if value is None and isinstance(tokenizer, Mapping):
        value = tokenizer.get("source")
    if value not in (None, "base"):
        raise OptionError(f"{source}: tokenizer_source {value!r}: taskmerge keeps the base model's tokenizer "
                          "(tokenizer_source: base); a merged or another model's vocabulary is not supported")


def _dtype(data: Mapping[str, Any], source: str) -> str | None:
    value = data.get("out_dtype") or data.get("dtype")
    if value is None:
        return None
    if str(value) not in _DTYPES:
        raise OptionError(f"{source}: dtype {value!r}: expected one of float32, float16, bfloat16")
    return _DTYPES[str(value)]


def from_mergekit(data: Mapping[str, Any], source: str = "MergeKit configuration") -> dict[str, Any]:
    """Translate a MergeKit configuration mapping into taskmerge configuration keys (see the module docstring).

    Keys that are not MergeKit's (``output``, ``seed``, ...) are passed through. Raises :class:`OptionError`
    naming the file and the key for what taskmerge cannot reproduce.
    """
    method = data.get("merge_method")
    if method not in MERGEKIT_METHODS:
        raise OptionError(f"{source}: merge_method {method!r} is not supported; taskmerge reads MergeKit files with "
                          f"{', '.join(MERGEKIT_METHODS)} (its own methods: `taskmerge methods`)")
    for key, what in _UNSUPPORTED_KEYS.items():
        if data.get(key):
            raise OptionError(f"{source}: {what} are not supported by taskmerge; list whole models under models:")
    _tokenizer_source(data, source)
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise OptionError(f"{source}: models: expected a list of `- model: path` entries")
    glob = {**_GLOBAL_DEFAULTS[method], **_params(data, f"{source}: parameters")}
    base = data.get("base_model")
    if base is None and method != "linear":
        raise OptionError(f"{source}: merge_method {method} needs base_model")
    paths = [_model_path(entry, f"{source}: models.{i}") for i, entry in enumerate(entries)]
    if method == "linear" and base is not None and base not in paths:  # MergeKit's linear averages base_model too
        entries, paths = [{"model": base}, *entries], [base, *paths]
    base = paths[0] if base is None else base  # linear without a base: θ₀ of θ₀ + Σ (w_i / Σ w)(θ_i − θ₀)
    models: list[str] = []
    weights: list[float] = []
    densities: list[float] = []
    total = 0.0
    for i, (entry, path) in enumerate(zip(entries, paths)):
        where = f"{source}: models.{i}"
        params = {**glob, **_params(entry, where)}
        if path == base and method != "linear":
            continue  # the base listed among the models: MergeKit's base entry, not a task
        if "weight" not in params:
            raise OptionError(f"{where} ({path}): parameter weight is required for merge_method {method}")
        total += float(params["weight"])
        if path == base:
            continue  # linear: the base's weight counts in Σ w, its update is zero
        models.append(path)
        weights.append(float(params["weight"]))
        densities.append(float(params.get("density", 1.0)))
    if not models:
        raise OptionError(f"{source}: no model to merge besides the base model")
    out = {k: v for k, v in data.items() if k not in _HANDLED_KEYS}
    out.update(base=base, models=models, **_translate(method, glob, weights, total, densities, source))
    dtype = _dtype(data, source)
    if dtype is not None:
        out["dtype"] = dtype
    return out


def _translate(method: str, glob: Mapping[str, Any], weights: Sequence[float], total: float,
               densities: Sequence[float], source: str) -> dict[str, Any]:
    """``method``, ``options``, ``lambda`` and ``weights`` of the taskmerge merge equal to MergeKit's."""
    normalize = bool(glob["normalize"])
    if method == "linear":
        if not normalize and abs(total - 1.0) > 1e-9:
            raise OptionError(f"{source}: linear with normalize: false and weights summing to {total:g} is not a "
                              "merge of task updates (Σ w_i θ_i keeps (Σ w − 1)·θ); use weights that sum to 1")
        return {"method": "task_arithmetic", "options": {}, "lambda": 1.0,
                "weights": [w / total for w in weights] if normalize else list(weights)}
    lam = float(glob["lambda"])
    if method == "task_arithmetic":
        divisor = total if normalize and abs(total) >= 1e-8 else 1.0
        return {"method": "task_arithmetic", "options": {}, "lambda": lam, "weights": [w / divisor for w in weights]}
    density = _one_density(densities, source)
    if method == "ties":
        if glob["rescale"]:
            raise OptionError(f"{source}: ties with rescale: true (L1 rescaling after the trim) is not supported")
        options = {"keep": density, "boundary": "floor", "disjoint": "mean" if normalize else "sum"}
        return {"method": "ties", "options": options, "lambda": lam, "weights": list(weights)}
    dare = {"p": 1.0 - density, "rescale": bool(glob["rescale"]), "rescale_to": "l1", "rng": "mergekit"}
    if method == "dare_linear":
        divisor = total if normalize and abs(total) >= 1e-8 else 1.0
        return {"method": "dare", "options": {**dare, "combine": "task_arithmetic"}, "lambda": lam,
                "weights": [w / divisor for w in weights]}
    dare.update(combine="ties", ties_keep=1.0, ties_disjoint="mean" if normalize else "sum")
    return {"method": "dare", "options": dare, "lambda": lam, "weights": list(weights)}


def _one_density(densities: Sequence[float], source: str) -> float:
    if len(set(densities)) > 1:
        raise OptionError(f"{source}: density differs between models ({', '.join(f'{d:g}' for d in densities)}); "
                          "taskmerge keeps one fraction for every model")
    density = densities[0]
    if not 0.0 < density <= 1.0:
        raise OptionError(f"{source}: density {density:g}: expected 0 < density ≤ 1")
    return density
