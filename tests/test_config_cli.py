"""The YAML configuration and the command line (on small safetensors files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from taskmerge.cli import main
from taskmerge.config import parse_size


def _files(tmp_path: Path, n: int = 2) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(n):
        sd = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        p = tmp_path / f"ft{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return tmp_path / "base.safetensors", paths


def test_yaml_config_and_flag_override(tmp_path: Path) -> None:
    base, models = _files(tmp_path)
    cfg = {"base": str(base), "models": [str(m) for m in models], "method": "task_arithmetic",
           "lambda": 0.25, "output": str(tmp_path / "out.safetensors")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yaml"), "--lambda", "1.0", "--no-progress"]) == 0
    out = load_file(str(tmp_path / "out.safetensors"))
    b = load_file(str(base))
    fts = [load_file(str(m)) for m in models]
    torch.testing.assert_close(out["w"], b["w"] + sum(f["w"] - b["w"] for f in fts))


def test_flags_only_with_options(tmp_path: Path) -> None:
    base, models = _files(tmp_path, 3)
    rc = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties",
               "-o", "keep=0.5", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _files(tmp_path)
    rc = main(["merge", "--base", str(base), "--models", str(tmp_path / "missing.safetensors"),
               "--method", "task_arithmetic", "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "missing.safetensors" in err and "\n" not in err
    rc = main(["merge", "--base", str(base), "--models", str(models[0]), "--method", "ties",
               "-o", "keep=high", "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "option keep" in err
    (tmp_path / "bad.yaml").write_text("base: x\nmodels: []\nmethod: ties\noutput: o\nfoo: 1\n")
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "foo" in err and "models" in err


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _files(tmp_path)
    args = ["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
            "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_methods_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts", "consensus", "weight_averaging"):
        assert name in out
    assert main(["methods", "ties"]) == 0
    assert "keep" in capsys.readouterr().out


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5MiB") == int(1.5 * 2**20)
    assert parse_size(123) == 123


def test_readme_method_table_lists_every_method() -> None:
    # a fresh process: methods that other tests register temporarily must not count
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    out = subprocess.run([sys.executable, "-m", "taskmerge.cli", "methods", "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[2:]:
        name = line.split("|")[1].strip()
        assert f"| {name} |" in readme, f"README's method table lacks {name}"
