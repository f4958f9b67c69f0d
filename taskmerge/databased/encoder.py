"""The merged encoder of the data-based methods, evaluated functionally, and the batches one step feeds it.

:class:`FunctionalEncoder` holds one copy of the encoder architecture with the base weights θ₀; features are
computed for any parameter dict with :func:`torch.func.functional_call`, so a merged encoder ``θ₀ + Σ λ τ``
(differentiable in what the method learns) is evaluated without copying the model. Tensors a parameter dict
leaves out take the base values.

One optimisation step runs one mini-batch of every task. :meth:`FunctionalEncoder.prepare` turns those
batches into a :class:`StepBatch`, which removes two costs that are not the model's own:

* **Padding.** Joining the tasks' batches pads every sequence to the longest of the step (on the 8-task text
  benchmark, 2.6 times the real tokens). The sequences are instead sorted by length and cut into a few chunks,
  each padded to its own longest sequence (:func:`length_chunks`: the cut minimising padded tokens plus a
  per-forward overhead); one forward per chunk, features put back in task order.
* **The full embedding table.** A merged word-embedding table (vocabulary × width, e.g. 30 522 × 384 for
  MiniLM, T task vectors of it) would be rebuilt, and differentiated, at every step although a step reads a
  few hundred rows. With ``compact_vocabulary`` the step's token ids are mapped onto the sorted set of ids it
  uses (``StepBatch.rows``), and the method builds only those rows of the merged table. The embedding's output
  is unchanged (row ``i`` of the compact table is row ``rows[i]`` of the full one; the padding row keeps its
  index, so its zero gradient stays where it was).

Both change no feature value (up to float summation order); a test compares them with the plain forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "FunctionalEncoder",
    "StepBatch",
    "FeatureFn",
    "ParamsFor",
    "length_chunks",
    "mean_pool_features",
    "cache_features",
]

FeatureFn = Callable[[nn.Module, Mapping[str, torch.Tensor], Any], torch.Tensor]
ParamsFor = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def _default_feature_fn(module: nn.Module, params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return functional_call(module, dict(params), args=(), kwargs=dict(batch))
    return functional_call(module, dict(params), args=(batch,))


def mean_pool_features(normalize: bool = True) -> FeatureFn:
    """Feature function of a Hugging Face text encoder: attention-mask-weighted mean of the last hidden
    states, L2-normalised if ``normalize`` (the benchmark's features: the input of its linear heads)."""

    def fn(module: nn.Module, params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        out = functional_call(module, dict(params), args=(), kwargs=dict(batch))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    return fn


def length_chunks(lengths: Sequence[int], overhead: float) -> list[int]:
    """Cut points of ``lengths`` (sorted ascending) into consecutive chunks, minimising
    ``Σ_chunks (rows · longest) + overhead · chunks`` — padded tokens plus a per-forward cost in tokens.

    Exact dynamic programme, O(n²) for n sequences. Returns the end index (exclusive) of every chunk.
    """
    n = len(lengths)
    if any(lengths[i] > lengths[i + 1] for i in range(n - 1)):
        raise ValueError("length_chunks expects lengths sorted ascending")
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[j - 1]
        for i in range(j):
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


@dataclass(frozen=True)
class StepBatch:
    """The inputs of one step, ready for :meth:`FunctionalEncoder.run`.

    Attributes:
        chunks: model batches (each padded to its own width; token ids compacted when ``rows`` is set).
        order: row ``i`` of the concatenated task batches is row ``order[i]`` of the concatenated chunk
            features (``None``: same order).
        sizes: rows per task.
        rows: ``{embedding parameter name: sorted token ids}`` when the vocabulary is compacted: the parameter
            dict must then hold exactly these rows of that table.
    """

    chunks: list[Any]
    order: torch.Tensor | None
    sizes: list[int]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return int(next(iter(batch.values())).shape[0])


def _is_token_batch(batch: Any) -> bool:
    return (isinstance(batch, Mapping) and "attention_mask" in batch and "input_ids" in batch
            and all(isinstance(v, torch.Tensor) and v.ndim == 2 for v in batch.values()))


def _right_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, :-1] >= mask[:, 1:]).all()) if mask.shape[1] > 1 else True


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _input_embedding(module: nn.Module) -> tuple[str, int | None] | None:
    """Name and padding index of the module's input word embedding, if its table can be compacted (an
    ``nn.Embedding`` without ``max_norm`` whose weight no other module shares)."""
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding) or emb.max_norm is not None:
        return None
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p is emb.weight]
    if len(names) != 1:
        return None
    return names[0], emb.padding_idx


class FunctionalEncoder:
    """An encoder evaluated functionally under any parameter dict.

    Args:
        module: a module of the encoder's architecture (deep-copied; the argument is not modified).
        base_state_dict: the pretrained weights θ₀, loaded into the copy; tensors a parameter dict leaves out
            take these values.
        feature_fn: ``fn(module, params, batch) -> features (B × d)``; default: ``functional_call(module,
            params, batch)`` (keyword arguments when ``batch`` is a mapping) — the module's output is the feature.
        device: where the copy lives.
        compact_vocabulary: build only the rows of the input embedding a step reads (module docstring); used when
            the module exposes an ``nn.Embedding`` through ``get_input_embeddings()``.
        chunk_overhead: the cost of one extra forward pass, in padded tokens, when sequences are cut into
            length chunks (module docstring).
    """

    def __init__(self, module: nn.Module, base_state_dict: Mapping[str, torch.Tensor] | None = None,
                 feature_fn: FeatureFn | None = None, device: torch.device | str = "cpu", *,
                 compact_vocabulary: bool = True, chunk_overhead: float = 64.0) -> None:
        self.module = copy.deepcopy(module).to(device).eval()
        if base_state_dict is not None:
            _, unexpected = self.module.load_state_dict(dict(base_state_dict), strict=False)
            if unexpected:
                raise KeyError(f"base state dict does not fit the encoder: unexpected tensors {unexpected[:5]}")
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.feature_fn = feature_fn or _default_feature_fn
        self.device = torch.device(device)
        self.embedding = _input_embedding(self.module) if compact_vocabulary else None
        self.chunk_overhead = float(chunk_overhead)

    def __call__(self, params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Features of ``batch`` with the tensors of ``params`` substituted (differentiable in them)."""
        return self.feature_fn(self.module, params, _to(batch, self.device))

    # ---------------------------------------------------------------------------------------- one step

    def prepare(self, batches: Sequence[Any], compact: bool = True) -> StepBatch:
        """Length-chunked (and, with ``compact``, vocabulary-compacted) inputs of one step's task batches.

        Token batches (mappings with 2-D ``input_ids`` and right-padded ``attention_mask``) are re-cut into
        length chunks; tensors with one trailing shape are joined into one chunk; anything else runs one
        batch per forward.
        """
        sizes = [_batch_len(b) for b in batches]
        if batches and all(_is_token_batch(b) for b in batches) and len({frozenset(b) for b in batches}) == 1 \
                and all(_right_padded(b["attention_mask"]) for b in batches):
            return self._token_step(batches, sizes, compact)
        tensors = bool(batches) and all(isinstance(b, torch.Tensor) for b in batches)
        if tensors and len({tuple(b.shape[1:]) for b in batches}) == 1:
            return StepBatch([torch.cat(list(batches))], None, sizes)
        return StepBatch(list(batches), None, sizes)

    def _token_step(self, batches: Sequence[Mapping[str, torch.Tensor]], sizes: list[int], compact: bool) -> StepBatch:
        keys = list(batches[0])
        rows = [(b, r, int(batch["attention_mask"][r].sum())) for b, batch in enumerate(batches)
                for r in range(sizes[b])]
        offsets = [sum(sizes[:b]) for b in range(len(batches))]
        ranked = sorted(range(len(rows)), key=lambda i: rows[i][2])
        lengths = [max(1, rows[i][2]) for i in ranked]
        chunks, start = [], 0
        for end in length_chunks(lengths, self.chunk_overhead):
            width = lengths[end - 1]
            members = [rows[i] for i in ranked[start:end]]
            chunk = {}
            for k in keys:
                ref = batches[0][k]
                out = torch.zeros((len(members), width), dtype=ref.dtype)
                for j, (b, r, n) in enumerate(members):
                    n = min(max(n, 1), batches[b][k].shape[1])
                    out[j, :n] = batches[b][k][r, :n]
                chunk[k] = out
            chunks.append(chunk)
            start = end
        position = torch.tensor([offsets[rows[i][0]] + rows[i][1] for i in ranked], dtype=torch.long)
        order = torch.empty_like(position)
        order[position] = torch.arange(len(position))
        vocab: dict[str, torch.Tensor] = {}
        if compact and self.embedding is not None:
            name, pad = self.embedding
            ids = [c["input_ids"].flatten() for c in chunks]
            if pad is not None:  # keep ids 0..pad so the padding row keeps its index in the compact table
                ids.append(torch.arange(pad + 1))
            table = torch.unique(torch.cat(ids))
            for c in chunks:
                c["input_ids"] = torch.searchsorted(table, c["input_ids"])
            vocab[name] = table
        return StepBatch(chunks, order, sizes, vocab)

    def run(self, params: Mapping[str, torch.Tensor], step: StepBatch) -> list[torch.Tensor]:
        """Features of a prepared step under ``params``, one tensor per task (in the tasks' batch order)."""
        for name, ids in step.rows.items():
            held = params.get(name)
            if held is None or held.shape[0] != ids.numel():
                raise ValueError(f"a compacted step needs {ids.numel()} rows of {name!r} in the parameters, got "
                                 f"{None if held is None else tuple(held.shape)}")
        feats = torch.cat([self(params, c) for c in step.chunks])
        if step.order is not None:
            feats = feats[step.order.to(feats.device)]
        return list(torch.split(feats, step.sizes))

    def step_features(self, batches: Sequence[Any], params_for: ParamsFor) -> list[torch.Tensor]:
        """Features of one step's task batches under the parameters ``params_for(rows)`` builds.

        ``params_for`` receives ``{embedding name: token ids}`` (empty without compaction) and returns the
        parameter dict, holding only those rows of a compacted table (a merged table it does not build is
        taken from the base weights here).
        """
        step = self.prepare(batches)
        params = dict(params_for(step.rows))
        for name, ids in step.rows.items():
            if name not in params:
                params[name] = self.module.get_parameter(name)[ids.to(self.device)]
        return self.run(params, step)

    def many(self, params: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> list[torch.Tensor]:
        """Features of several batches under the same full parameter dict (length-chunked, not compacted)."""
        return self.run(params, self.prepare(batches, compact=False))

    # ---------------------------------------------------------------------------------- no-grad passes

    @torch.no_grad()
    def features(self, params: Mapping[str, torch.Tensor], inputs: Any, batch_size: int = 64) -> torch.Tensor:
        """Features of every input (N × d, float32, CPU) under full parameters, no gradient; inputs that
        report their ``lengths()`` are batched in length order (less padding)."""
        n = len(inputs)
        lengths = inputs.lengths() if hasattr(inputs, "lengths") else None
        order = sorted(range(n), key=lambda i: lengths[i]) if lengths is not None else list(range(n))
        out: torch.Tensor | None = None
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            feats = self(params, inputs.batch(idx)).float().cpu()
            if out is None:
                out = torch.empty(n, feats.shape[1])
            out[torch.as_tensor(idx)] = feats
        return out if out is not None else torch.empty(0)


def cache_features(encoder: FunctionalEncoder, params: Mapping[str, torch.Tensor], inputs: Any,
                   batch_size: int = 64) -> torch.Tensor:
    """Teacher features ``g(x; θ)`` of every input, computed once (N × d, CPU); index them with the sampler's
    indices instead of recomputing the fine-tuned encoders at every step."""
    return encoder.features(params, inputs, batch_size)
