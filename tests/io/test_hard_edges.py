"""Issue 15's hard edges: each case a new user hit, reproduced, with the behaviour promised instead.

A clean failure is a one-line ``error:`` with exit code 2 (:class:`taskmerge.errors.TaskmergeError` from
the library) that names the file, tensor or option, and leaves no output behind, unless ``--resume`` can
continue it and the message says so.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from taskmerge.cli import main
from taskmerge.config import load_config, parse_option
from taskmerge.errors import CheckpointError, OptionError, OutputError
from taskmerge.io import open_checkpoint
from taskmerge.io.writers import MANIFEST_NAME, partial_path
from taskmerge.merge import merge_checkpoints
from taskmerge.registry import get_method
from taskmerge.selection import TensorPolicy

ROOT = os.geteuid() == 0


# ----------------------------------------------------------------------------------- fixtures


def _sd(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": scale * torch.randn(24, 16, generator=g) for i in range(4)} | {
        "layer0.bias": scale * torch.randn(24, generator=g)}


def _folder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.fixture()
def family(tmp_path: Path) -> dict[str, object]:
    """A base folder and two fine-tuned folders (the base plus small updates)."""
    base = _sd(0)
    models = []
    for t in (1, 2):
        delta = _sd(t, 0.01)
        models.append(_folder(tmp_path / "in" / f"ft{t}", {k: base[k] + delta[k] for k in base}))
    return {"base": _folder(tmp_path / "in" / "base", base), "models": models, "root": tmp_path}


def _cli(capsys: pytest.CaptureFixture[str], family: dict[str, object], out: Path, *extra: str) -> tuple[int, str]:
    argv = ["merge", "--base", str(family["base"]), "--models", *map(str, family["models"]),
            "--method", "task_arithmetic", "--output", str(out), "--no-progress", *extra]
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def _clean_error(rc: int, err: str) -> str:
    """Assert a one-line ``error:`` with exit code 2 (log lines aside); returns it."""
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING ", "DEBUG "))]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Output-side files under ``folder`` (inputs under ``in/`` aside)."""
    return sorted(str(p.relative_to(folder)) for p in folder.iterdir() if p.name != "in")


# ----------------------------------------------------------------------------------- output not writable, disk full


def test_unwritable_output_folder_is_a_clean_error(family, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "o"
    if ROOT:  # root ignores permission bits: the kernel's refusal is reproduced on the partial folder
        real_mkdir = os.mkdir

        def refuse(path, *args, **kwargs):
            if str(path).endswith(".partial"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refuse)
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "o"
    line = _clean_error(*_cli(capsys, family, out))
    assert "Permission denied" in line and ".partial" in line
    assert _leftovers(tmp_path) == ([] if ROOT else ["locked"])


def test_output_below_a_file_is_a_clean_error(family, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    line = _clean_error(*_cli(capsys, family, tmp_path / "afile" / "o"))
    assert "afile: is a file, not a folder" in line


def _full_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Make the writer's ``os.pwrite`` fail with ENOSPC once ``budget`` bytes are written."""
    import taskmerge.io.writers as writers

    real = os.pwrite
    left = [budget]

    def pwrite(fd: int, data, offset: int) -> int:
        if len(data) > left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(writers.os, "pwrite", pwrite)


def test_disk_full_before_any_shard_leaves_nothing(family, tmp_path: Path, monkeypatch, capsys) -> None:
    _full_after(monkeypatch, 1000)
    line = _clean_error(*_cli(capsys, family, tmp_path / "o"))
    assert "disk full" in line and "--resume" not in line
    assert _leftovers(tmp_path) == []  # no out.partial, journal or lock


def test_disk_full_after_some_shards_keeps_them_for_resume(family, tmp_path: Path, monkeypatch, capsys) -> None:
    ref = merge_checkpoints(family["base"], family["models"], tmp_path / "ref", "task_arithmetic",
                            max_shard_bytes=1600, progress=False)
    _full_after(monkeypatch, 4000)  # each 24 x 16 float32 shard holds 1536 bytes of data
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", "--max-shard-size", "1600"))
    assert "disk full" in line and "rerun with --resume" in line and "shard(s) are complete" in line
    assert not (tmp_path / "o").exists() and not list(partial_path(tmp_path / "o").glob("*.tmp"))
    monkeypatch.undo()  # space freed
    rc, err = _cli(capsys, family, tmp_path / "o", "--max-shard-size", "1600", "--resume")
    assert rc == 0, err
    for f in ("model-00001-of-00005.safetensors", "model-00005-of-00005.safetensors"):
        assert (tmp_path / "o" / f).read_bytes() == (ref / f).read_bytes()


@pytest.fixture()
def small_fs(tmp_path: Path):
    """A 64 KiB tmpfs (skipped where it cannot be mounted: not root, or no mount permission)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                  capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(family, tmp_path: Path, small_fs: Path, capsys) -> None:
    big = {"w": torch.randn(256, 128)}  # 128 KiB of output on a 64 KiB filesystem
    base = _folder(tmp_path / "in" / "bigbase", big)
    fam = {"base": base, "models": [_folder(tmp_path / "in" / "bigft", {"w": big["w"] + 1})]}
    line = _clean_error(*_cli(capsys, fam, small_fs / "o"))
    assert "No space left on device" in line
    assert list(small_fs.iterdir()) == []


# ----------------------------------------------------------------------------------- -o values


def test_malformed_option_values_are_named(family, tmp_path: Path, capsys) -> None:
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", "-o", "keep=[0.2"))
    assert "option keep" in line and "[0.2" in line
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", "-o", "keep=!!python/object/apply:os.system [echo]"))
    assert "option keep" in line and "python/object" in line
    assert _leftovers(tmp_path) == []
    assert parse_option("keep= [0.2, 0.3]") == ("keep", [0.2, 0.3])  # what yaml.safe_load reads


# ----------------------------------------------------------------------------------- finite output


@pytest.mark.parametrize("lam", ["nan", "inf", "-inf"])
def test_non_finite_lambda_is_refused_up_front(family, tmp_path: Path, capsys, lam: str) -> None:
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", f"--lambda={lam}"))
    assert "option lambda" in line and "finite" in line
    assert _leftovers(tmp_path) == []


def test_overflow_in_the_output_dtype_names_the_tensor(family, tmp_path: Path, capsys) -> None:
    b, f = load_file(str(family["base"] / "model.safetensors")), load_file(str(family["models"][0] / "model.safetensors"))
    first = next(iter(b))  # the premise, computed independently: θ₀ + 1e30·τ overflows float16
    assert not torch.isfinite((b[first] + 1e30 * (f[first] - b[first])).half()).all()
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", "--lambda", "1e30", "--dtype", "float16"))
    assert "tensor 'layer" in line and "not finite in torch.float16" in line
    assert _leftovers(tmp_path) == []


def test_nan_in_the_base_blames_the_base(family, tmp_path: Path) -> None:
    sd = load_file(str(family["base"] / "model.safetensors"))
    sd["layer2.weight"][3, 4] = float("nan")
    save_file(sd, str(family["base"] / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        merge_checkpoints(family["base"], family["models"], tmp_path / "o", "task_arithmetic", progress=False)
    msg = str(info.value)
    assert msg.startswith(str(family["base"] / "model.safetensors")) and "'layer2.weight' of the base model" in msg
    assert _leftovers(tmp_path) == []


def test_nan_in_a_kept_base_tensor_is_not_written(family, tmp_path: Path) -> None:
    sd = load_file(str(family["base"] / "model.safetensors"))
    sd["layer1.weight"][0, 0] = float("inf")
    save_file(sd, str(family["base"] / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'layer1.weight' of the base model \(kept at the base value\)"):
        merge_checkpoints(family["base"], family["models"], tmp_path / "o", "task_arithmetic", progress=False,
                          policy=TensorPolicy(exclude=(r"^layer1\.",)))
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- paths confined


def _sharded(folder: Path, shard_names: list[str]) -> Path:
    """A checkpoint folder whose index maps one tensor to each of ``shard_names``."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"t{i}": s for i, s in enumerate(shard_names)}}))
    return folder


def test_index_shards_outside_the_folder_are_refused(tmp_path: Path) -> None:
    save_file({"t1": torch.ones(2)}, str(tmp_path / "x.safetensors"))  # a weights file elsewhere on the machine
    save_file({"t0": torch.ones(2)}, str(tmp_path / "shard0.safetensors"))
    cases = {
        "climb": ["../shard0.safetensors", "../x.safetensors"],
        "absolute": [str(tmp_path / "x.safetensors")],
    }
    for name, shards in cases.items():
        folder = _sharded(tmp_path / name / "ckpt", shards)
        with pytest.raises(CheckpointError, match="outside the checkpoint's folder|absolute path"):
            open_checkpoint(folder)
    link = tmp_path / "link" / "ckpt"
    _sharded(link, ["model-1.safetensors"])
    (link / "model-1.safetensors").symlink_to(tmp_path / "x.safetensors")  # a link out of the folder
    with pytest.raises(CheckpointError, match="resolves to .*x.safetensors, outside"):
        open_checkpoint(link)
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint's folder"):
        open_checkpoint(single)


def test_links_inside_the_folder_and_the_hub_cache_are_read(tmp_path: Path) -> None:
    inside = _sharded(tmp_path / "ok", ["sub/../a.safetensors"])
    (inside / "sub").mkdir()
    save_file({"t0": torch.arange(3.0)}, str(inside / "a.safetensors"))
    assert torch.equal(open_checkpoint(inside).get("t0"), torch.arange(3.0))
    repo = tmp_path / "hub" / "models--org--tiny"  # huggingface_hub's cache: snapshot files link into blobs/
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.full((2,), 7.0)}, str(repo / "blobs" / "0123abcd"))
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    assert torch.equal(open_checkpoint(snap).get("w"), torch.full((2,), 7.0))


def test_adapter_files_outside_the_folder_are_refused(tmp_path: Path) -> None:
    base = _folder(tmp_path / "base", {"q.weight": torch.zeros(4, 4)})
    save_file({"base_model.model.q.lora_A.weight": torch.ones(1, 4), "base_model.model.q.lora_B.weight": torch.ones(4, 1)},
              str(tmp_path / "elsewhere.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors' resolves to .*elsewhere.safetensors, outside"):
        open_checkpoint(adapter, base=base)


# ----------------------------------------------------------------------------------- messages


def test_unreadable_file_says_permission_denied(family, tmp_path: Path, monkeypatch) -> None:
    target = family["models"][1] / "model.safetensors"
    if ROOT:  # root reads mode-000 files: reproduce the kernel's EACCES for that file
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if Path(path) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    else:
        target.chmod(0)
    with pytest.raises(CheckpointError, match="Permission denied") as info:
        merge_checkpoints(family["base"], family["models"], tmp_path / "o", "task_arithmetic", progress=False)
    assert str(target) in str(info.value) and "No such file" not in str(info.value)


def test_missing_lora_rank_is_named(family, tmp_path: Path, capsys) -> None:
    line = _clean_error(*_cli(capsys, family, tmp_path / "o", "--output-format", "lora"))
    assert "lora_rank" in line and "required" in line and "?:" not in line and "Value error" not in line
    with pytest.raises(OptionError, match=r"lora_rank=16"):  # a Python caller is told the keyword
        merge_checkpoints(family["base"], family["models"], tmp_path / "o", "task_arithmetic", output_format="lora")


def test_unknown_option_suggests_the_closest(family, tmp_path: Path, capsys) -> None:
    with pytest.raises(OptionError, match=r"unknown option 'kep' \(did you mean 'keep'\?\); known options: .*keep"):
        get_method("ties").parse({"kep": 0.2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "b", "models": ["m"], "method": "ties", "output": "o",
                                                     "lamda": 0.3}))
    line = _clean_error(main(["merge", str(tmp_path / "c.yaml")]), capsys.readouterr().err)
    assert "unknown key 'lamda' (did you mean 'lambda'?)" in line and "Extra inputs" not in line


def test_library_callers_are_told_the_keyword_cli_users_the_flag(family, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    merge_checkpoints(family["base"], family["models"], out, "task_arithmetic", progress=False)
    with pytest.raises(OutputError, match=r"overwrite=True replaces it") as info:
        merge_checkpoints(family["base"], family["models"], out, "task_arithmetic", progress=False)
    assert "--overwrite" not in str(info.value)
    line = _clean_error(*_cli(capsys, family, out))
    assert "--overwrite replaces it" in line


# ----------------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_folder_with_files_taskmerge_did_not_write(family, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = _clean_error(*_cli(capsys, family, out, "--overwrite"))
    assert "notes.txt" in line and "did not write" in line
    assert (out / "notes.txt").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not partial_path(out).exists()


def test_overwrite_replaces_a_previous_output(family, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    assert _cli(capsys, family, out, "--lambda", "0.5")[0] == 0
    listed = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != MANIFEST_NAME)
    assert _cli(capsys, family, out, "--lambda", "1.0", "--overwrite")[0] == 0
    b, fts = load_file(str(family["base"] / "model.safetensors")), [load_file(str(m / "model.safetensors")) for m in family["models"]]
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))["layer3.weight"],
                               b["layer3.weight"] + sum(f["layer3.weight"] - b["layer3.weight"] for f in fts))
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing of anyone's
    assert _cli(capsys, family, tmp_path / "empty", "--overwrite")[0] == 0


def test_output_that_is_an_input_is_refused(family, tmp_path: Path, capsys) -> None:
    line = _clean_error(*_cli(capsys, family, family["models"][0], "--overwrite"))
    assert "the output is also an input" in line
    assert (family["models"][0] / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------- resume, YAML paths, warnings


def test_resume_survives_a_touch(family, tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    _full_after(monkeypatch, 4000)
    _clean_error(*_cli(capsys, family, tmp_path / "o", "--max-shard-size", "1600"))
    monkeypatch.undo()
    os.utime(family["models"][0] / "model.safetensors", ns=(10**9, 10**9))  # `touch`: contents unchanged
    with caplog.at_level(logging.INFO, logger="taskmerge.io.writers"):
        rc, err = _cli(capsys, family, tmp_path / "o", "--max-shard-size", "1600", "--resume")
    assert rc == 0, err
    assert re.search(r"resuming: [1-4] of 5 shard\(s\)", caplog.text), caplog.text  # not refused, not restarted


def test_yaml_paths_are_relative_to_the_yaml_file(family, tmp_path: Path, monkeypatch, capsys) -> None:
    cfg_dir = tmp_path / "in"
    (cfg_dir / "merge.yaml").write_text(yaml.safe_dump({
        "base": "base", "models": ["ft1", "ft2"], "method": "task_arithmetic", "output": "../merged"}))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(cfg_dir / "merge.yaml")["models"] == [str(cfg_dir / "ft1"), str(cfg_dir / "ft2")]
    assert main(["merge", str(cfg_dir / "merge.yaml"), "--no-progress"]) == 0, capsys.readouterr().err
    assert (tmp_path / "merged" / "model.safetensors").is_file() and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("case", ["one", "twice", "copy", "base"])
def test_suspicious_model_lists_are_warned_about(family, tmp_path: Path, caplog, case: str) -> None:
    base, (a, b) = family["base"], family["models"]
    if case == "copy":
        shutil.copytree(a, tmp_path / "acopy")
    models = {"one": [a], "twice": [a, a], "copy": [a, tmp_path / "acopy"], "base": [a, base]}[case]
    expected = {"one": "only one fine-tuned model", "twice": "models 1 and 2 are the same model",
                "copy": "models 1 and 2 are the same model", "base": "model 2 (%s) is the base model" % base}[case]
    with caplog.at_level(logging.WARNING, logger="taskmerge.merge"):
        merge_checkpoints(base, models, tmp_path / "o", "task_arithmetic", progress=False)
    assert expected in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taskmerge.merge"):
        merge_checkpoints(base, [a, b], tmp_path / "o2", "task_arithmetic", progress=False)
    assert "same model" not in caplog.text and "base model" not in caplog.text and "only one" not in caplog.text


# ----------------------------------------------------------------------------------- dependencies


def test_io_depends_on_nothing_above_it() -> None:
    """``taskmerge.io`` reads and writes: it imports only itself, ``errors`` and ``linalg`` (no merge driving)."""
    allowed = {"taskmerge.errors", "taskmerge.linalg", "taskmerge"}
    io_dir = Path(__file__).resolve().parents[2] / "taskmerge" / "io"
    for path in io_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("taskmerge"):
                    assert name.startswith("taskmerge.io") or name in allowed, f"{path.name} imports {name}"
                    if name == "taskmerge":
                        assert all(a.name in ("linalg", "errors") for a in node.names), f"{path.name}"
