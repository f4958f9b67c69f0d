"""The merge engine end to end on files: task vectors, tensor classes, dtypes and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmerge.errors import CheckpointError, OptionError
from taskmerge.merge import apply_task_vector, merge_checkpoints, merged_task_vector
from taskmerge.selection import TensorClass, TensorPolicy


def _model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.dense.weight": torch.randn(6, 4, generator=g).to(dtype),
        "encoder.layer.0.dense.bias": torch.randn(6, generator=g).to(dtype),
        "embeddings.word_embeddings.weight": torch.randn(10, 4, generator=g).to(dtype),
        "classifier.weight": torch.randn(3, 6, generator=g).to(dtype),
        "position_ids": torch.arange(7),
    }


def _save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def test_task_arithmetic_one_model_lambda_one_returns_it(tmp_path: Path) -> None:
    base, ft = _model(0), _model(1)
    out = merge_checkpoints(_save(tmp_path, "base", base), [_save(tmp_path, "ft", ft)], tmp_path / "out.safetensors",
                            "task_arithmetic", lam=1.0, policy=TensorPolicy(exclude=()), progress=False)
    merged = load_file(str(out))
    for name in ft:
        torch.testing.assert_close(merged[name], ft[name], rtol=0, atol=1e-6)


def test_default_policy_keeps_heads_and_integer_buffers(tmp_path: Path) -> None:
    base, a, b = _model(0), _model(1), _model(2)
    tau = merged_task_vector(base, [a, b], "weight_averaging")
    assert "classifier.weight" not in tau and "position_ids" not in tau
    expected = ((a["encoder.layer.0.dense.weight"] - base["encoder.layer.0.dense.weight"])
                + (b["encoder.layer.0.dense.weight"] - base["encoder.layer.0.dense.weight"])) / 2
    torch.testing.assert_close(tau["encoder.layer.0.dense.weight"], expected)
    merged = apply_task_vector(base, tau, 1.0)
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])
    assert torch.equal(merged["position_ids"], base["position_ids"])


def test_matrix_only_methods_average_non_matrix_tensors() -> None:
    base, a, b = _model(0), _model(1), _model(2)
    tau = merged_task_vector(base, [a, b], "tsv_m")
    for name in ("encoder.layer.0.dense.bias", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(tau[name], ((a[name] - base[name]) + (b[name] - base[name])) / 2)


def test_policy_classes() -> None:
    p = TensorPolicy()
    f32 = torch.float32
    assert p.classify("bert.encoder.layer.0.attention.self.query.weight", (4, 4), f32) is TensorClass.MATRIX
    assert p.classify("bert.encoder.layer.0.attention.self.query.bias", (4,), f32) is TensorClass.OTHER
    assert p.classify("embeddings.word_embeddings.weight", (10, 4), f32) is TensorClass.OTHER
    assert p.classify("text_projection.weight", (4, 4), f32) is TensorClass.OTHER
    assert p.classify("classifier.weight", (3, 4), f32) is TensorClass.KEEP
    assert p.classify("embeddings.position_ids", (1, 5), torch.int64) is TensorClass.KEEP
    only = TensorPolicy(include=(r"attention",))
    assert only.classify("encoder.layer.0.output.dense.weight", (4, 4), f32) is TensorClass.KEEP
    with pytest.raises(OptionError, match="exclude"):
        TensorPolicy(exclude=("(",))


def test_bfloat16_models_are_merged_in_float32(tmp_path: Path) -> None:
    base, ft = _model(0, torch.bfloat16), _model(1, torch.bfloat16)
    out = merge_checkpoints(_save(tmp_path, "base", base), [_save(tmp_path, "ft", ft)], tmp_path / "o.safetensors",
                            "task_arithmetic", lam=0.5, progress=False)
    merged = load_file(str(out))
    name = "encoder.layer.0.dense.weight"
    expected = (base[name].float() + 0.5 * (ft[name].float() - base[name].float())).to(torch.bfloat16)
    assert merged[name].dtype == torch.bfloat16
    assert torch.equal(merged[name], expected)


def test_output_dtype_option(tmp_path: Path) -> None:
    base, ft = _model(0), _model(1)
    out = merge_checkpoints(_save(tmp_path, "base", base), [_save(tmp_path, "ft", ft)], tmp_path / "o.safetensors",
                            "task_arithmetic", output_dtype="float16", progress=False)
    merged = load_file(str(out))
    assert merged["encoder.layer.0.dense.weight"].dtype == torch.float16
    assert merged["position_ids"].dtype == torch.int64


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop("encoder.layer.0.dense.bias"), "tensor 'encoder.layer.0.dense.bias' of the base model is missing"),
        (lambda sd: sd.update({"encoder.layer.0.dense.weight": torch.zeros(4, 6)}), r"shape \[4, 6\], base has \[6, 4\]"),
        (lambda sd: sd.update({"encoder.layer.0.dense.bias": torch.zeros(6, dtype=torch.float16)}), "dtype torch.float16"),
        (lambda sd: sd["encoder.layer.0.dense.weight"].__setitem__((0, 0), float("nan")), "contains NaN or Inf"),
    ],
)
def test_bad_fine_tuned_model_is_named_and_nothing_is_written(tmp_path: Path, mutate, message: str) -> None:
    base, good, bad = _model(0), _model(1), _model(2)
    mutate(bad)
    bad_path = _save(tmp_path, "bad", bad)
    with pytest.raises(CheckpointError, match=message) as info:
        merge_checkpoints(_save(tmp_path, "base", base), [_save(tmp_path, "good", good), bad_path],
                          tmp_path / "out", "task_arithmetic", progress=False)
    assert str(bad_path) in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_options_are_named() -> None:
    base, a = _model(0), _model(1)
    with pytest.raises(OptionError, match="unknown method 'nope'"):
        merged_task_vector(base, [a], "nope")
    with pytest.raises(OptionError, match="method 'ties': unknown option 'no_such_option'; known options: .*keep"):
        merged_task_vector(base, [a], "ties", {"no_such_option": 1})
    with pytest.raises(OptionError, match="compute_dtype"):
        merged_task_vector(base, [a], "ties", compute_dtype="int8")
    with pytest.raises(OptionError, match="no tensor is selected"):
        merged_task_vector(base, [a], "ties", policy=TensorPolicy(include=("nothing-matches",)))


def test_compute_dtype_float64() -> None:
    base, a = _model(0), _model(1)
    tau = merged_task_vector(base, [a], "task_arithmetic", compute_dtype="float64")
    name = "encoder.layer.0.dense.weight"
    assert tau[name].dtype == torch.float64
    torch.testing.assert_close(tau[name], a[name].double() - base[name].double())
