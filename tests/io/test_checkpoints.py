"""Checkpoint readers and the atomic sharded writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmerge.errors import CheckpointError
from taskmerge.io import CheckpointWriter, open_checkpoint


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5),
    }


def _assert_same(reader, sd) -> None:
    assert sorted(reader.keys()) == sorted(sd)
    for name, t in sd.items():
        shape, dtype = reader.meta(name)
        assert shape == tuple(t.shape) and dtype == t.dtype
        assert torch.equal(reader.get(name), t)


def test_single_safetensors(tmp_path: Path) -> None:
    sd = _sd()
    save_file(sd, str(tmp_path / "m.safetensors"))
    _assert_same(open_checkpoint(tmp_path / "m.safetensors"), sd)


def test_torch_state_dict_bin(tmp_path: Path) -> None:
    sd = _sd(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _assert_same(open_checkpoint(tmp_path / "pytorch_model.bin"), sd)
    _assert_same(open_checkpoint(tmp_path), sd)  # as a folder


def test_sharded_folder_round_trip_through_writer(tmp_path: Path) -> None:
    sd = _sd(2)
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=100) as w:
        for k, v in sd.items():
            w.add(k, v)
        w.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    _assert_same(open_checkpoint(out), sd)
    _assert_same(open_checkpoint(out / "model.safetensors.index.json"), sd)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_single_file_output_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    with CheckpointWriter(out) as w:
        w.add("x", torch.ones(2))
        w.commit()
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as w:
        w.add("x", torch.zeros(2))
        w.commit()
    assert torch.equal(load_file(str(out))["x"], torch.zeros(2))


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, max_shard_bytes=8) as w:
            w.add("x", torch.ones(4))
            w.add("y", torch.ones(4))  # flushes the first shard to disk
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_copies_config_files(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    save_file({"x": torch.ones(1)}, str(base / "model.safetensors"))
    with CheckpointWriter(tmp_path / "out", copy_from=base) as w:
        w.add("x", torch.ones(1))
        w.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".taskmerge-manifest.json", "config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.safetensors", "no such file"),
        (lambda p: (p / "bad.safetensors").write_bytes(b"not a safetensors file") and p / "bad.safetensors", "cannot read"),
        (lambda p: (p / "bad.bin").write_bytes(b"garbage") and p / "bad.bin", "cannot load"),
        (lambda p: (p / "w.txt").write_text("x") and p / "w.txt", "unsupported checkpoint"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no model weights"),
    ],
)
def test_unreadable_inputs_name_the_file(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(path).keys()
    assert str(path) in str(info.value)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(tmp_path)
