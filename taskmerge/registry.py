"""The method registry: merging-method names mapped to their functions and typed options.

A *per-layer* method is a pure function ``fn(deltas, options, ctx) -> merged`` over the ``T`` task
updates of one tensor, stacked as ``deltas`` of shape ``(T, *shape)``; it returns the merged update of
shape ``shape`` *before* the scaling coefficient λ, which the engine applies (``θ = θ₀ + λ·merged``).

A *model-level* method additionally declares a :class:`GlobalStatistic`: a first streaming pass calls
``collect`` on every tensor, ``finalize`` reduces what was collected, and the result reaches the
per-layer function as ``ctx.state`` in the merging pass (e.g. TIES with a model-wide top-k threshold).
A ``finalize`` result that is an :class:`AnotherPass` asks for one more statistics pass first: it
reaches ``collect`` as ``ctx.state`` (so that a statistic can refine a histogram instead of holding
every entry of the model).

Options are pydantic models (``extra="forbid"``), so an unknown or ill-typed option is reported by
name. Methods register themselves with :func:`register_method`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from taskmerge.errors import OptionError, unknown_name

if TYPE_CHECKING:
    from taskmerge.linalg import LowRank

__all__ = [
    "AnotherPass",
    "MethodOptions",
    "LayerContext",
    "GlobalStatistic",
    "MethodSpec",
    "register_method",
    "get_method",
    "list_methods",
    "parse_options",
]


class MethodOptions(BaseModel):
    """Base class of every method's options: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class LayerContext:
    """What a per-layer method may know besides the task updates.

    Attributes:
        name: the tensor's name in the checkpoint.
        seed: a seed derived from the run's seed and the tensor name (stable across runs and orders).
        state: the finalized :class:`GlobalStatistic` of a model-level method, else ``None``.
        matrix: whether this tensor gets the matrix (SVD) treatment; methods flagged
            ``matrix_only`` are never called with ``matrix=False``.
        factors: for a matrix whose every task update is known in factored form (PEFT LoRA adapters,
            :class:`taskmerge.io.peft.PeftAdapterSource`), one :class:`taskmerge.linalg.LowRank` per task
            with ``factors[t].dense() == deltas[t]`` (rank 0 for a task that leaves the matrix alone);
            ``None`` otherwise. Low-rank-aware methods may use it instead of ``deltas`` to avoid SVDs of
            m × n matrices; the result must not depend on which route is taken.
        weights: the per-model weights the engine has already multiplied ``deltas`` by (``None``: all 1); a
            method that averages (TIES's disjoint mean) divides by their sum rather than by a count.
        run_seed: the run's seed itself (``seed`` is derived from it per tensor), for a method that reproduces
            another tool's model-wide random stream (DARE's ``rng="mergekit"``).
    """

    name: str
    seed: int = 0
    state: Any = None
    matrix: bool = True
    factors: tuple[LowRank, ...] | None = None
    weights: tuple[float, ...] | None = None
    run_seed: int = 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator seeded with :attr:`seed`, for stochastic methods such as DARE."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen

    @staticmethod
    def tensor_seed(run_seed: int, name: str) -> int:
        """The per-tensor seed: a CRC32 of the name mixed with the run seed."""
        return (zlib.crc32(name.encode()) ^ (run_seed * 0x9E3779B1)) & 0x7FFFFFFF


class AnotherPass:
    """Base class of an intermediate :meth:`GlobalStatistic.finalize` result that asks the engine for one
    more statistics pass; ``collect`` sees it as ``ctx.state`` (the statistic must want the context)."""


class GlobalStatistic(Protocol):
    """A two-pass, model-wide statistic (see the module docstring).

    A statistic whose class sets ``wants_context = True`` is called as
    ``collect(name, deltas, options, ctx)`` with the tensor's :class:`LayerContext` (seed, factors).
    """

    def collect(self, name: str, deltas: torch.Tensor, options: MethodOptions) -> Any:
        """Summarise one tensor's task updates (stored until :meth:`finalize`)."""

    def finalize(self, collected: Mapping[str, Any], options: MethodOptions) -> Any:
        """Reduce the per-tensor summaries to the state handed to every layer."""


LayerFn = Callable[[torch.Tensor, Any, LayerContext], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method.

    Attributes:
        name: registry key (``snake_case``).
        fn: the per-layer function.
        options: the pydantic options class.
        paper: citation (authors, venue, equation) shown by ``taskmerge methods``.
        summary: one line on what the method does.
        matrix_only: if true, tensors that are not 2-D weight matrices (biases, norms, convs,
            excluded matrices) are averaged instead of calling ``fn`` (the TSV-M / Iso-C convention).
        data_free: false for methods that learn from data.
        default_lambda: the scaling coefficient used when none is given.
        lambda_grid: the grid the benchmark sweeps on validation data.
        global_statistic: factory of the model-level statistic, or ``None``.
        option_grid: ``(option name, values)`` of a hyper-parameter of the method's own that the benchmark
            chooses on validation instead of λ when the λ grid is the single value 1.0 (e.g. AlignMerge-B's
            ``("alpha", (1.0, 1.4, 1.8, 2.2, 3.0))``); ``None`` for a plain λ sweep.
        linear: for a method that is the linear map ``fn(deltas) = Σ_t Δ_t / d``, ``linear(options, T)``
            returns ``d`` (task arithmetic: 1, weight averaging: T), or ``None`` where these options make
            it non-linear; the engine then merges in one streaming pass without stacking the updates
            (:mod:`taskmerge.linear_stream`, the same result as ``fn``). ``None``: always the stacked route.
    """

    name: str
    fn: LayerFn
    options: type[MethodOptions]
    paper: str
    summary: str
    matrix_only: bool = False
    data_free: bool = True
    default_lambda: float = 1.0
    lambda_grid: tuple[float, ...] = field(default_factory=tuple)
    global_statistic: Callable[[MethodOptions], GlobalStatistic | None] | None = None
    option_grid: tuple[str, tuple[float, ...]] | None = None
    linear: Callable[[MethodOptions, int], float | None] | None = None

    def parse(self, options: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
        """Validate raw options for this method (see :func:`parse_options`)."""
        return parse_options(self, options)

    def statistic_for(self, options: MethodOptions) -> GlobalStatistic | None:
        """The model-level statistic these options need, if any."""
        return None if self.global_statistic is None else self.global_statistic(options)


_REGISTRY: dict[str, MethodSpec] = {}


def _grid(lo: float, hi: float, steps: int) -> tuple[float, ...]:
    return tuple(round(lo + (hi - lo) * i / (steps - 1), 4) for i in range(steps))


def register_method(
    name: str,
    *,
    options: type[MethodOptions],
    paper: str,
    summary: str,
    matrix_only: bool = False,
    data_free: bool = True,
    default_lambda: float = 1.0,
    lambda_grid: Iterable[float] | None = None,
    global_statistic: Callable[[MethodOptions], GlobalStatistic | None] | None = None,
    option_grid: tuple[str, Iterable[float]] | None = None,
    linear: Callable[[MethodOptions, int], float | None] | None = None,
) -> Callable[[LayerFn], LayerFn]:
    """Decorator registering a per-layer function under ``name``.

    The default λ grid is 0.1, 0.2, …, 3.0 (the TSV/Iso protocol's ``linspace(0, 3, 31)[1:]``).
    ``option_grid`` names one of ``options``' fields and the values the benchmark sweeps; ``linear`` marks a
    linear method (both: see :class:`MethodSpec`).
    """

    def decorator(fn: LayerFn) -> LayerFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        swept = None
        if option_grid is not None:
            key, values = option_grid[0], tuple(float(v) for v in option_grid[1])
            if key not in options.model_fields or not values:
                raise ValueError(f"method {name!r}: option_grid needs an option of {options.__name__} and values")
            swept = (key, values)
        grid = tuple(lambda_grid) if lambda_grid is not None else _grid(0.1, 3.0, 30)
        _REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            options=options,
            paper=paper,
            summary=summary,
            matrix_only=matrix_only,
            data_free=data_free,
            default_lambda=default_lambda,
            lambda_grid=grid,
            global_statistic=global_statistic,
            option_grid=swept,
            linear=linear,
        )
        return fn

    return decorator


def _ensure_loaded() -> None:
    import taskmerge.methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name raises :class:`OptionError` listing the known ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise OptionError(f"unknown method {name!r}; known methods: {known}") from None


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def parse_options(spec: MethodSpec, options: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
    """Validate ``options`` against ``spec.options``; errors name the method and the option."""
    if isinstance(options, spec.options):
        return options
    if isinstance(options, MethodOptions):
        options = options.model_dump()
    try:
        return spec.options(**dict(options or {}))
    except ValidationError as exc:
        problems = "; ".join(
            unknown_name("option", str(err["loc"][-1]), spec.options.model_fields) if err["type"] == "extra_forbidden"
            else f"option {'.'.join(str(p) for p in err['loc']) or '?'}: {str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise OptionError(f"method {spec.name!r}: {problems}") from None
