"""Synthetic task vectors with the tensor shapes of CLIP ViT-B/32's visual encoder (Hugging Face names).

Values are random but not white noise (``spectrum``):

* ``power`` (default): each 2-D task vector is ``G₁ diag(d) G₂`` with Gaussian factors and a power-law
  ``d_i = i^-0.7``, so its spectrum decays like a real fine-tuning update's (MiniLM's measured task vectors:
  σ_i ∝ i^-0.7…-0.8, σ_{r/8}/σ₁ ≈ 0.13) and the top singular subspaces are well separated (white-noise
  matrices have near-degenerate spectra, where any two exact SVD implementations legitimately disagree);
* ``lowrank``: low rank plus noise, a rank-``r/16`` update (48 of 768) with ``d_i = i^-0.7`` plus a Gaussian
  matrix holding 5 % of the update's Frobenius norm: a spectrum that falls to a flat noise floor at
  ≈ 1e-2 σ₁, as the TSV paper's "a few percent of the components" describes (LLaMA-shaped family:
  ``llama_shapes.py``, rank 64 plus noise);
* ``gaussian``: white noise (flat Marchenko–Pastur spectra), where no top-k is well separated.
"""

from __future__ import annotations

import torch

HIDDEN, MLP, PATCH, TOKENS, LAYERS, PROJ = 768, 3072, 32, 50, 12, 512


def vit_b32_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of the CLIP ViT-B/32 vision tower (with its projection)."""
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (HIDDEN,),
        "vision_model.embeddings.patch_embedding.weight": (HIDDEN, 3, PATCH, PATCH),
        "vision_model.embeddings.position_embedding.weight": (TOKENS, HIDDEN),
        "vision_model.pre_layrnorm.weight": (HIDDEN,),
        "vision_model.pre_layrnorm.bias": (HIDDEN,),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            shapes[p + f"self_attn.{proj}.bias"] = (HIDDEN,)
        shapes[p + "layer_norm1.weight"] = (HIDDEN,)
        shapes[p + "layer_norm1.bias"] = (HIDDEN,)
        shapes[p + "mlp.fc1.weight"] = (MLP, HIDDEN)
        shapes[p + "mlp.fc1.bias"] = (MLP,)
        shapes[p + "mlp.fc2.weight"] = (HIDDEN, MLP)
        shapes[p + "mlp.fc2.bias"] = (HIDDEN,)
        shapes[p + "layer_norm2.weight"] = (HIDDEN,)
        shapes[p + "layer_norm2.bias"] = (HIDDEN,)
    shapes["vision_model.post_layernorm.weight"] = (HIDDEN,)
    shapes["vision_model.post_layernorm.bias"] = (HIDDEN,)
    shapes["visual_projection.weight"] = (PROJ, HIDDEN)
    return shapes


def task_vectors(n_tasks: int, layers: int = LAYERS, seed: int = 0, scale: float = 1e-3,
                 spectrum: str = "power") -> list[dict[str, torch.Tensor]]:
    """``n_tasks`` task vectors (float32) with ViT-B/32 shapes; ``spectrum``: ``power``, ``lowrank`` or ``gaussian``
    (module docstring)."""
    if spectrum not in ("power", "lowrank", "gaussian"):
        raise ValueError(f"spectrum must be power, lowrank or gaussian, got {spectrum!r}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        tv = {}
        for name, shape in vit_b32_shapes(layers).items():
            if len(shape) == 2 and spectrum in ("power", "lowrank"):
                m, n = shape
                r = min(m, n) if spectrum == "power" else max(1, min(m, n) // 16)
                d = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.7)
                tv[name] = scale * (torch.randn(m, r, generator=gen) * d) @ torch.randn(r, n, generator=gen) / r**0.5
                if spectrum == "lowrank":
                    noise = torch.randn(m, n, generator=gen)
                    tv[name] += noise * (0.05 * tv[name].norm() / noise.norm())
            else:
                tv[name] = scale * torch.randn(shape, generator=gen)
        out.append(tv)
    return out
