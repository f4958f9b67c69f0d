"""A LLaMA-shaped family of checkpoints generated locally: a base and T fine-tunes, as Hugging Face folders.

Tensor names, shapes and ``config.json`` are those of ``LlamaForCausalLM`` (grouped-query attention,
gated MLP, RMSNorm, untied ``lm_head``), stored in bfloat16 as sharded safetensors. Values are seeded
per tensor name, so any model of the family is regenerated tensor by tensor without holding a model in
memory (the writer is taskmerge's own streaming :class:`~taskmerge.io.writers.CheckpointWriter`):

* base: ``N(0, 0.02²)`` entries (norm weights ``1 + N(0, 0.02²)``);
* fine-tune t: base + a rank-64 update with a decaying spectrum (σ_i ∝ i^-0.7, Frobenius norm ≈ 1e-3 per
  entry RMS) plus ``N(0, (2e-4)²)`` noise on 2-D tensors, ``N(0, (1e-3)²)`` on 1-D ones: small, mostly
  low-rank deltas, as fine-tuning updates are.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from taskmerge.io.writers import CheckpointWriter

__all__ = ["LlamaShape", "PRESETS", "llama_tensors", "write_family", "n_params"]


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        }


PRESETS = {
    # ~100M parameters: for developing on a busy 2-core machine
    "tiny": LlamaShape(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=1000),  # smoke tests
    "small": LlamaShape(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4),
    # TinyLlama-1.1B's shapes: 1.10B parameters, 2.2 GB in bfloat16
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
}


def llama_tensors(s: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor, in Hugging Face's order."""
    kv = s.hidden // s.heads * s.kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (s.hidden, s.hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, s.hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, s.hidden)
        shapes[p + "self_attn.o_proj.weight"] = (s.hidden, s.hidden)
        shapes[p + "mlp.gate_proj.weight"] = (s.intermediate, s.hidden)
        shapes[p + "mlp.up_proj.weight"] = (s.intermediate, s.hidden)
        shapes[p + "mlp.down_proj.weight"] = (s.hidden, s.intermediate)
        shapes[p + "input_layernorm.weight"] = (s.hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (s.hidden,)
    shapes["model.norm.weight"] = (s.hidden,)
    shapes["lm_head.weight"] = (s.vocab, s.hidden)
    return shapes


def n_params(s: LlamaShape) -> int:
    total = 0
    for shape in llama_tensors(s).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _tensor(name: str, shape: tuple[int, ...], task: int | None, seed: int) -> torch.Tensor:
    key = zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)
    g = torch.Generator().manual_seed(key & 0x7FFFFFFF)
    if len(shape) == 1:
        value = 1.0 + 0.02 * torch.randn(shape, generator=g)
    else:
        value = 0.02 * torch.randn(shape, generator=g)
    if task is not None:
        g.manual_seed((key + 7919 * (task + 1)) & 0x7FFFFFFF)
        if len(shape) == 1:
            value += 1e-3 * torch.randn(shape, generator=g)
        else:
            m, n = shape
            r = min(64, m, n)
            sigma = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.7)
            sigma *= 1e-3 * (m * n) ** 0.5 / sigma.norm()
            u = torch.randn(m, r, generator=g) / m**0.5
            v = torch.randn(r, n, generator=g) / n**0.5
            value += (u * sigma) @ v
            value += 2e-4 * torch.randn(shape, generator=g)
    return value.to(torch.bfloat16)


def write_model(folder: Path, s: LlamaShape, task: int | None, seed: int = 0, shard_bytes: int = 1 << 30) -> None:
    """Write the base (``task=None``) or fine-tune ``task`` as a sharded Hugging Face folder."""
    shapes = llama_tensors(s)
    with CheckpointWriter(folder, max_shard_bytes=shard_bytes, overwrite=True) as w:
        w.plan([(n, shape, torch.bfloat16) for n, shape in shapes.items()])
        for name, shape in shapes.items():
            w.add(name, _tensor(name, shape, task, seed))
        w.commit()
    (folder / "config.json").write_text(json.dumps(s.config(), indent=2))


def write_family(root: Path, s: LlamaShape, tasks: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """``root/base`` and ``root/ft0..ft{T-1}``; reused when ``root/family.json`` says they match."""
    marker = root / "family.json"
    want = {"shape": asdict(s), "tasks": tasks, "seed": seed, "version": 1}
    base, models = root / "base", [root / f"ft{t}" for t in range(tasks)]
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return base, models
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    write_model(base, s, None, seed)
    for t, folder in enumerate(models):
        write_model(folder, s, t, seed)
    marker.write_text(json.dumps(want))
    return base, models
