"""What a new user meets first (issue 15, friction): start-up, ``methods``, ``--version``, the model card,
the output's dtype, per-model weights, mixed input dtypes, and which tensors stay at the base."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

import taskmerge
from taskmerge.catalog import build_catalog, default_text, describe_options, range_text, type_text
from taskmerge.cli import main
from taskmerge.merge import input_identity
from taskmerge.model_card import config_with_dtype
from taskmerge.registry import MethodOptions

# ----------------------------------------------------------------------------- start-up without torch

_NO_TORCH = """
import sys
from taskmerge.cli import main
for argv in ({argvs}):
    try:
        main(list(argv))
    except SystemExit:
        pass
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
"""


def test_help_version_and_methods_do_not_import_torch() -> None:
    argvs = "['--help'], ['--version'], ['merge', '--help'], ['methods'], ['methods', 'ties'], ['methods', '--markdown']"
    done = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argvs=argvs)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_catalog_is_up_to_date_with_the_registry() -> None:
    # a fresh process: methods that other tests register temporarily must not count
    done = subprocess.run([sys.executable, "-m", "taskmerge.catalog", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"taskmerge {importlib.metadata.version('taskmerge')}"
    assert taskmerge.__version__ == importlib.metadata.version("taskmerge")


# -------------------------------------------------------------------------------------- method listing


class _Opts(MethodOptions):
    mode: Literal["a", "b"] = Field("a", description="the mode")
    frac: float = Field(0.2, gt=0.0, le=1.0)
    rank: Optional[int] = Field(None, ge=1)
    table: dict[str, int] = Field(default_factory=dict)
    tol: float = Field(1e-5, lt=1.0)


def test_option_types_defaults_and_ranges_in_words() -> None:
    rows = {r["name"]: r for r in describe_options(_Opts)}
    assert rows["mode"] == {"name": "mode", "type": "one of a, b", "default": "a", "range": None, "description": "the mode"}
    assert (rows["frac"]["type"], rows["frac"]["default"], rows["frac"]["range"]) == ("float", "0.2", "0.0 < x ≤ 1.0")
    assert (rows["rank"]["type"], rows["rank"]["default"], rows["rank"]["range"]) == ("int or none", "none", "x ≥ 1")
    assert (rows["table"]["type"], rows["table"]["default"]) == ("mapping", "{}")
    assert rows["tol"]["range"] == "x < 1.0"
    assert type_text(list[int] | None) == "list of int or none"
    assert range_text([]) is None
    assert default_text(_Opts.model_fields["frac"]) == "0.2"


def test_methods_name_shows_paper_summary_and_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    catalog = build_catalog()["methods"]
    assert main(["methods", "ties"]) == 0
    out = capsys.readouterr().out
    assert catalog["ties"]["paper"] in out and catalog["ties"]["summary"] in out
    assert "boundary: one of round, floor, floor_plus_one; default round" in out
    assert "keep: float; default 0.2; 0.0 < x ≤ 1.0" in out
    assert "dare" not in out.split("\n")[0]  # one method, not the whole list
    for name, entry in catalog.items():
        assert main(["methods", name]) == 0
        text = capsys.readouterr().out
        assert "PydanticUndefined" not in text and "typing." not in text and "Literal" not in text
        if entry["kind"] == "data-free":  # every data-free method's options are described
            missing = [o["name"] for o in entry["options"] if not o["description"]]
            assert not missing, f"{name}: options without a description: {missing}"


def test_unknown_method_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "tie"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'tie'") and "ties" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------- merges and outputs

_NAMES = {"model.embed_tokens.weight": (12, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
          "model.norm.weight": (4,), "lm_head.weight": (12, 4), "classifier.weight": (3, 4)}


def _models(root: Path, n: int = 2, dtype: torch.dtype = torch.float32, task_dtype: torch.dtype | None = None) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in _NAMES.items()}
    paths = []
    for name, sd in [("base", base)] + [(f"ft{i}", {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(task_dtype or dtype)
                                                     for k, v in base.items()}) for i in range(n)]:
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
                                                             "text_config": {"dtype": "float32"}}))
        (root / name / "README.md").write_text("the base model's card")
        paths.append(root / name)
    return paths[0], paths[1:]


def _sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_weights_final_line_card_and_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _models(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base: {base}\nmodels: [{models[0]}, {models[1]}]\nweights: [1.0, 0.5]\nmethod: task_arithmetic\n"
                   f"output: {out}\ndtype: bfloat16\n")
    assert main(["merge", str(cfg), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"(λ = 0.3, the method's default) into {out}")
    b, t0, t1 = _sd(base), _sd(models[0]), _sd(models[1])
    got = _sd(out)
    for k in _NAMES:
        expected = b[k] + 0.3 * ((t0[k] - b[k]) + 0.5 * (t1[k] - b[k])) if k != "classifier.weight" else b[k]
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], expected.to(torch.bfloat16), rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["text_config"]["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert card != "the base model's card"
    for words in ("task_arithmetic", "Ilharco", "| λ | 0.3 |", "| per-model weights | 1, 0.5 |", "bfloat16",
                  f"| taskmerge version | {taskmerge.__version__} |", str(models[1].resolve())):
        assert words in card, words
    request = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert request["base"] == input_identity(base) and request["models"] == [input_identity(m) for m in models]
    assert request["weights"] == [1.0, 0.5] and request["lambda"] == "0.3"


def test_explicit_lambda_in_final_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _models(tmp_path)
    args = ["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties", "--lambda", "0.7",
            "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0
    assert "(λ = 0.7) into" in capsys.readouterr().out


def test_fp16_finetunes_of_an_fp32_base_need_cast_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _models(tmp_path, task_dtype=torch.float16)
    args = ["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
            "--lambda", "1", "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "torch.float16" in err and "--cast-inputs" in err and not (tmp_path / "o").exists()
    assert main([*args, "--cast-inputs"]) == 0
    b, got = _sd(base), _sd(tmp_path / "o")
    expected = b["lm_head.weight"] + sum(_sd(m)["lm_head.weight"].float() - b["lm_head.weight"] for m in models)
    torch.testing.assert_close(got["lm_head.weight"], expected, rtol=1e-6, atol=1e-6)
    assert got["lm_head.weight"].dtype == torch.float32


def test_lm_head_merged_heads_kept_and_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base, models = _models(tmp_path)
    args = ["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
            "--output", str(tmp_path / "o"), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="taskmerge"):
        assert main(args) == 0
    got, b = _sd(tmp_path / "o"), _sd(base)
    assert torch.equal(got["classifier.weight"], b["classifier.weight"])  # a classification head: kept
    assert not torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # a causal LM's head: merged (MergeKit)
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept at the base value")]
    assert len(kept) == 1 and "classifier.weight" in kept[0] and "classification heads" in kept[0]
    assert "lm_head" not in kept[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="taskmerge"):
        assert main([*args, "--overwrite", "--exclude", "lm_head"]) == 0
    assert torch.equal(_sd(tmp_path / "o")["lm_head.weight"], b["lm_head.weight"])
    assert any("lm_head.weight" in r.getMessage() and "'lm_head'" in r.getMessage() for r in caplog.records)


def test_weights_count_must_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, models = _models(tmp_path)
    assert main(["merge", "--base", str(base), "--models", *map(str, models), "--weights", "1,2,3",
                 "--method", "ties", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "weights: 3 weight(s) for 2 model(s)" in capsys.readouterr().err


def test_config_with_dtype_adds_torch_dtype_when_absent() -> None:
    assert json.loads(config_with_dtype('{"a": 1}', "float16")) == {"a": 1, "torch_dtype": "float16"}
    assert json.loads(config_with_dtype('{"dtype": "float32"}', "bfloat16")) == {"dtype": "bfloat16"}


def test_lora_output_has_a_model_card(tmp_path: Path) -> None:
    base, models = _models(tmp_path)
    out = tmp_path / "adapter"
    assert main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties", "--output", str(out),
                 "--output-format", "lora", "--lora-rank", "2", "--lora-drop-other", "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "`ties`" in card and '"lora_rank": 2' in card and str(base.resolve()) in card
