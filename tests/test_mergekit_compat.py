"""MergeKit configuration files (:mod:`taskmerge.mergekit_compat`) and MergeKit's conventions.

* the translation of each supported ``merge_method`` into taskmerge keys, and its refusals;
* on a tiny LLaMA-shaped checkpoint, ``taskmerge merge mergekit.yaml`` equals MergeKit 0.1.5's own merge of
  the same file (``run_merge``, same seed) to 1e-6 for linear, task_arithmetic, ties, dare_linear and
  dare_ties (skipped when MergeKit is not installed: ``pip install 'taskmerge[test]'``);
* without MergeKit, DARE's ``rng="mergekit"`` against a re-implementation of MergeKit's documented draw
  (``transformers.set_seed`` then ``torch.bernoulli`` per tensor in name order, task by task) and L1 rescale;
* TIES with ``scope="global"``, ``boundary="floor_plus_one"`` against FusionBench's / the official code's
  global trim (``topk_values_mask`` on the flattened task vectors), re-implemented here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from taskmerge.cli import main
from taskmerge.errors import OptionError
from taskmerge.merge import apply_task_vector, merged_task_vector
from taskmerge.mergekit_compat import from_mergekit, is_mergekit_config

WEIGHTS = (1.0, 0.5, 0.7)
DENSITY = 0.3
SEED = 5

# ----------------------------------------------------------------------------------------- translation


def _mk(method: str, **extra: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": "b",
            "models": [{"model": f"m{i}", "parameters": {"weight": w, "density": DENSITY}} for i, w in enumerate((1.0, 0.5))],
            **extra}


def test_translation_of_each_method() -> None:
    assert is_mergekit_config(_mk("ties")) and not is_mergekit_config({"method": "ties"})
    ta = from_mergekit(_mk("task_arithmetic", parameters={"lambda": 0.8}))
    assert (ta["method"], ta["lambda"], ta["weights"], ta["base"], ta["models"]) == ("task_arithmetic", 0.8, [1.0, 0.5], "b", ["m0", "m1"])
    assert from_mergekit(_mk("task_arithmetic", parameters={"normalize": True}))["weights"] == [1 / 1.5, 0.5 / 1.5]
    ties = from_mergekit(_mk("ties", dtype="bfloat16"))
    assert ties["options"] == {"keep": DENSITY, "boundary": "floor", "disjoint": "mean"} and ties["dtype"] == "bfloat16"
    assert from_mergekit(_mk("ties", parameters={"normalize": False}))["options"]["disjoint"] == "sum"
    dl = from_mergekit(_mk("dare_linear"))
    assert dl["method"] == "dare" and dl["options"]["combine"] == "task_arithmetic"
    assert dl["options"]["p"] == pytest.approx(1 - DENSITY) and dl["options"]["rng"] == "mergekit"
    assert dl["options"]["rescale_to"] == "l1" and dl["options"]["rescale"] is True
    dt = from_mergekit(_mk("dare_ties"))
    assert (dt["options"]["combine"], dt["options"]["ties_keep"], dt["options"]["ties_disjoint"]) == ("ties", 1.0, "sum")
    # linear: base_model is an input with its own weight (here from the top-level parameters)
    lin = from_mergekit(_mk("linear", parameters={"weight": 0.5}))
    assert lin["method"] == "task_arithmetic" and lin["lambda"] == 1.0
    assert lin["weights"] == pytest.approx([1.0 / 2.0, 0.5 / 2.0])  # Σ w = 0.5 (base) + 1.0 + 0.5
    # the base listed among the models is the base, not a task; our own keys pass through
    listed = _mk("ties", output="out")
    listed["models"].insert(0, {"model": "b"})
    got = from_mergekit(listed)
    assert got["models"] == ["m0", "m1"] and got["output"] == "out"


@pytest.mark.parametrize("change, words", [
    ({"merge_method": "slerp"}, "merge_method 'slerp'"),
    ({"slices": [{"sources": []}]}, "slices"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
    ({"parameters": {"density": [0.1, 0.5]}}, "per-layer gradients"),
    ({"parameters": {"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}]}}, "conditional"),
    ({"base_model": None}, "needs base_model"),
])
def test_refusals_name_the_key(change: dict[str, Any], words: str) -> None:
    data = _mk("ties")
    data.update(change)
    if "parameters" in change:  # the models' own parameters would override the top-level ones
        for m in data["models"]:
            m["parameters"].pop("density")
    with pytest.raises(OptionError, match=words):
        from_mergekit(data, "cfg.yaml")


def test_refusals_per_model() -> None:
    data = _mk("ties")
    data["models"][1]["parameters"]["density"] = 0.5
    with pytest.raises(OptionError, match="density differs"):
        from_mergekit(data)
    data = _mk("ties")
    del data["models"][0]["parameters"]["weight"]
    with pytest.raises(OptionError, match=r"models\.0 \(m0\): parameter weight is required"):
        from_mergekit(data)
    with pytest.raises(OptionError, match="sum to 1"):
        from_mergekit(_mk("linear", parameters={"weight": 1.0, "normalize": False}))
    assert from_mergekit(_mk("ties", tokenizer_source="base"))["method"] == "ties"


# --------------------------------------------------------------------------------- a tiny LLaMA on disk

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 48,
          "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    h, f, v = _LLAMA["hidden_size"], _LLAMA["intermediate_size"], _LLAMA["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(_LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and three fine-tunes of a float32 LLaMA-shaped checkpoint (folders with config.json)."""
    root = tmp_path_factory.mktemp("llama")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) * 0.1 for n, s in _llama_shapes().items()}
    for name, sd in [("base", base)] + [(f"ft{i}", {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()})
                                        for i in range(3)]:
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps(_LLAMA))
    return root


def _config(root: Path, method: str) -> dict[str, Any]:
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": w, "density": DENSITY}} for i, w in enumerate(WEIGHTS)]
    conf: dict[str, Any] = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32", "models": models}
    if method == "linear":
        conf["parameters"] = {"weight": 0.4}  # the base's weight: MergeKit's linear averages base_model too
    return conf


def _ours(root: Path, conf: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(conf))
    assert main(["merge", str(path), "--output", str(out), "--seed", str(SEED), "--no-progress"]) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_equals_mergekit(llama: Path, tmp_path: Path, method: str) -> None:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    conf = _config(llama, method)
    run_merge(MergeConfiguration.model_validate(conf), str(tmp_path / "mk"),
              MergeOptions(random_seed=SEED, copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = _ours(llama, conf, tmp_path / "ours")
    assert set(ours) == set(theirs)
    base = load_file(str(llama / "base" / "model.safetensors"))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(ours["lm_head.weight"], base["lm_head.weight"])  # merged, as MergeKit does


# ------------------------------------------------- MergeKit's documented DARE draw, re-implemented here


def _mergekit_dare_linear(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], weights: tuple[float, ...],
                          density: float, seed: int) -> dict[str, torch.Tensor]:
    """MergeKit's dare_linear (normalize false, rescale true, λ 1): set_seed(seed); per tensor in name order
    (its schedule's group labels), per task: Bernoulli(density) mask, L1 rescale, times the weight, summed."""
    torch.manual_seed(seed)
    out = {}
    for name in sorted(base):
        total = torch.zeros_like(base[name])
        for sd, w in zip(tasks, weights):
            delta = sd[name] - base[name]
            mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32))
            masked = delta * mask
            before, after = delta.abs().sum(), masked.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
            total += w * masked
        out[name] = base[name] + total
    return out


def test_dare_mergekit_stream_matches_documented_draw(llama: Path) -> None:
    base = load_file(str(llama / "base" / "model.safetensors"))
    tasks = [load_file(str(llama / f"ft{i}" / "model.safetensors")) for i in range(3)]
    opts = {"p": 1 - DENSITY, "rescale_to": "l1", "rng": "mergekit"}
    tau = merged_task_vector(base, tasks, "dare", opts, seed=SEED, weights=WEIGHTS, policy=_merge_all())
    ours = apply_task_vector(base, tau, 1.0)
    expected = _mergekit_dare_linear(base, tasks, WEIGHTS, DENSITY, SEED)
    for name in base:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=1e-6)
    # another seed draws other masks
    other = apply_task_vector(base, merged_task_vector(base, tasks, "dare", opts, seed=SEED + 1, weights=WEIGHTS,
                                                       policy=_merge_all()), 1.0)
    assert not torch.equal(other["model.norm.weight"], ours["model.norm.weight"])


def _merge_all() -> Any:
    from taskmerge.selection import TensorPolicy

    return TensorPolicy(exclude=())


# ------------------------------------------------------------------ FusionBench's global trim (TIES)


def _fusionbench_ties(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], k: float,
                      merge_func: str) -> dict[str, torch.Tensor]:
    """FusionBench's ``ties_merging`` (= the official TIES code) on flattened task vectors: ``topk_values_mask``
    keeps ``|τ| ≥ kthvalue(d − int(d·K))`` per task, ``resolve_sign`` with the majority rule, ``disjoint_merge``."""
    names = list(base)
    flat = torch.stack([torch.cat([(sd[n] - base[n]).reshape(-1) for n in names]) for sd in tasks])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * rows
    merged = selected.sum(dim=0)
    if merge_func == "mean":
        merged = merged / (selected != 0).sum(dim=0).clamp(min=1)
    out, start = {}, 0
    for n in names:
        out[n] = merged[start:start + base[n].numel()].reshape(base[n].shape)
        start += base[n].numel()
    return out


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_global_equals_fusionbench(merge_func: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(12, 9, generator=g), "b.weight": torch.randn(7, 5, generator=g),
            "c.bias": torch.randn(13, generator=g)}
    tasks = [{n: t + torch.randn(t.shape, generator=g) * (0.5 + i) for n, t in base.items()} for i in range(3)]
    keep = 0.2
    opts = {"keep": keep, "scope": "global", "boundary": "floor_plus_one", "disjoint": merge_func}
    tau = merged_task_vector(base, tasks, "ties", opts, policy=_merge_all())
    expected = _fusionbench_ties(base, tasks, keep, merge_func)
    for n in base:
        torch.testing.assert_close(tau[n], expected[n], rtol=1e-6, atol=1e-6)
    # the paper's round(k·P) keeps one entry fewer per task here: the outputs differ
    total = sum(t.numel() for t in base.values())
    assert round(keep * total) == int(keep * total)
    rounded = merged_task_vector(base, tasks, "ties", {**opts, "boundary": "round"}, policy=_merge_all())
    assert any(not torch.equal(rounded[n], tau[n]) for n in base)
