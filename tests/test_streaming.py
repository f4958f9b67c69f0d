"""The streaming engine on files: planned shard writing, resume after an interruption, peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from taskmerge.errors import CheckpointError
from taskmerge.io.writers import JOURNAL_NAME, CheckpointWriter, partial_path, write_safetensors
from taskmerge.merge import merge_checkpoints
from taskmerge.methods.ties import TiesOptions, _ties_statistic, ties
from taskmerge.registry import register_method

# ----------------------------------------------------------------------------------- fixtures

_CALLS: list[str] = []  # tensor names the flaky method merged, in order
_FAIL_AFTER: list[int | None] = [None]  # raise on the call after this many


def _flaky(deltas, options, ctx):
    if _FAIL_AFTER[0] is not None and len(_CALLS) >= _FAIL_AFTER[0]:
        raise RuntimeError("injected failure")
    _CALLS.append(ctx.name)
    return ties(deltas, options, ctx)


register_method("_test_flaky_ties", options=TiesOptions, paper="test", summary="TIES that fails on demand",
                global_statistic=_ties_statistic)(_flaky)


def _model(seed: int, layers: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g).to(torch.bfloat16)
        sd[p + "mlp.up_proj.weight"] = torch.randn(40, 16, generator=g).to(torch.bfloat16)
        sd[p + "input_layernorm.weight"] = torch.randn(16, generator=g).to(torch.bfloat16)
    sd["lm_head.weight"] = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    sd["position_ids"] = torch.arange(8)
    return sd


def _folder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.fixture()
def family(tmp_path: Path) -> dict[str, object]:
    base = _model(0)
    models = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
              for k, v in base.items()}
        models.append(_folder(tmp_path / f"ft{t}", ft))
    return {"base": _folder(tmp_path / "base", base), "models": models}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------- the writer


def test_planned_writer_writes_out_of_order_and_loads(tmp_path: Path) -> None:
    sd = {"b": torch.randn(5, 3).to(torch.bfloat16), "a": torch.randn(7), "ids": torch.arange(4),
          "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=40) as w:
        w.plan([(n, tuple(t.shape), t.dtype) for n, t in sd.items()])
        for name in reversed(list(sd)):
            w.add(name, sd[name])
        w.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(str(out / shard)))
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert merged.keys() == sd.keys()
    for name, t in sd.items():
        assert merged[name].dtype == t.dtype and torch.equal(merged[name], t)


def test_write_safetensors_is_readable_and_deterministic(tmp_path: Path) -> None:
    sd = {"x": torch.randn(3, 4), "y": torch.randn(5).to(torch.float16), "z": torch.arange(3, dtype=torch.int32)}
    write_safetensors(tmp_path / "a.safetensors", sd, {"k": "v", "b": "c"})
    write_safetensors(tmp_path / "b.safetensors", dict(reversed(sd.items())), {"b": "c", "k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:  # safetensors validates offsets on open
        assert f.metadata() == {"format": "pt", "b": "c", "k": "v"}


def test_planned_writer_rejects_unplanned_or_mismatched_tensors(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "o.safetensors") as w:
        w.plan([("a", (2,), torch.float32)])
        with pytest.raises(CheckpointError, match="not planned"):
            w.add("b", torch.ones(2))
        with pytest.raises(CheckpointError, match="planned as"):
            w.add("a", torch.ones(3))
        with pytest.raises(CheckpointError, match="never written"):
            w.commit()


# ----------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_interrupted_merge_resumes_to_the_same_bytes_without_recomputing(family, tmp_path: Path, scope: str) -> None:
    kw = dict(options={"keep": 0.3, "scope": scope}, lam=0.7, max_shard_bytes=1500, progress=False)
    _CALLS.clear()
    _FAIL_AFTER[0] = None
    ref = merge_checkpoints(family["base"], family["models"], tmp_path / "ref", "_test_flaky_ties", **kw)
    merged_names = list(_CALLS)
    assert len(merged_names) > 10

    out = tmp_path / "out"
    _CALLS.clear()
    _FAIL_AFTER[0] = 9
    with pytest.raises(RuntimeError, match="injected failure"):
        merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", **kw)
    assert not out.exists()
    journal = json.loads((partial_path(out) / JOURNAL_NAME).read_text())
    completed = {n for s in journal["shards"].values() for n in s["tensors"]}
    assert journal["shards"] and completed  # some shards finished before the failure ...
    assert len(journal["shards"]) < journal["shards_total"]  # ... not all
    assert not list(partial_path(out).glob("*.tmp"))

    with pytest.raises(CheckpointError, match="resume=True"):  # neither resume nor overwrite (a Python caller's spelling)
        merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", **kw)

    _CALLS.clear()
    _FAIL_AFTER[0] = None
    merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", resume=True, **kw)
    assert not partial_path(out).exists()
    assert _files(out) == _files(ref)  # bit for bit, index and copied config included
    assert not completed.intersection(_CALLS)  # tensors of completed shards were not recomputed
    assert sorted(_CALLS) == sorted(n for n in merged_names if n not in completed)


_KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from taskmerge.merge import merge_checkpoints
    from taskmerge.methods.ties import TiesOptions, _ties_statistic, ties
    from taskmerge.registry import register_method

    calls = []

    def flaky(deltas, options, ctx):  # the test's method, but the process dies (SIGKILL) on the 10th tensor
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(ctx.name)
        return ties(deltas, options, ctx)

    register_method("_test_flaky_ties", options=TiesOptions, paper="test", summary="test",
                    global_statistic=_ties_statistic)(flaky)
    base, out, *models = sys.argv[1:]
    merge_checkpoints(base, models, out, "_test_flaky_ties", {"keep": 0.3}, lam=0.7, max_shard_bytes=1500,
                      progress=False, workers=1)
    """
)


def test_a_killed_merge_resumes_to_the_same_bytes(family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(family["base"]), str(out),
                           *map(str, family["models"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed: no clean-up ran
    journal = json.loads((partial_path(out) / JOURNAL_NAME).read_text())
    completed = {n for s in journal["shards"].values() for n in s["tensors"]}
    assert completed and len(journal["shards"]) < journal["shards_total"]
    _CALLS.clear()
    _FAIL_AFTER[0] = None
    kw = dict(options={"keep": 0.3}, lam=0.7, max_shard_bytes=1500, progress=False)
    merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", resume=True, **kw)
    assert not completed.intersection(_CALLS)
    ref = merge_checkpoints(family["base"], family["models"], tmp_path / "ref", "_test_flaky_ties", **kw)
    assert _files(out) == _files(ref)


def test_resume_refuses_a_different_request(family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kw = dict(options={"keep": 0.3}, max_shard_bytes=1500, progress=False)
    _CALLS.clear()
    _FAIL_AFTER[0] = 9
    with pytest.raises(RuntimeError):
        merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", lam=0.7, **kw)
    _FAIL_AFTER[0] = None
    before = _files(partial_path(out))
    with pytest.raises(CheckpointError, match=r"different request \(differs in: lambda\)"):
        merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", lam=0.8, resume=True, **kw)
    with pytest.raises(CheckpointError, match=r"differs in: method\)"):
        merge_checkpoints(family["base"], family["models"], out, "ties", lam=0.7, resume=True, **kw)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in load_file(str(family["models"][1] / "model.safetensors")).items()}
    save_file(changed, str(family["models"][1] / "model.safetensors"))  # an input changed on disk (same shapes)
    with pytest.raises(CheckpointError, match=r"differs in: models"):
        merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", lam=0.7, resume=True, **kw)
    assert _files(partial_path(out)) == before  # a refused resume leaves the partial output alone
    # --overwrite starts over
    merge_checkpoints(family["base"], family["models"], out, "_test_flaky_ties", lam=0.7, overwrite=True, **kw)
    assert out.is_dir() and not partial_path(out).exists()


def test_resume_without_partial_output_is_a_plain_merge(family, tmp_path: Path) -> None:
    a = merge_checkpoints(family["base"], family["models"], tmp_path / "a.safetensors", "ties", resume=True, progress=False)
    b = merge_checkpoints(family["base"], family["models"], tmp_path / "b.safetensors", "ties", progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_cli_resume_flag(family, tmp_path: Path, capsys) -> None:
    from taskmerge.cli import main

    out = tmp_path / "out"
    args = ["merge", "--base", str(family["base"]), "--models", *map(str, family["models"]), "--method",
            "_test_flaky_ties", "--output", str(out), "--max-shard-size", "1500", "--no-progress", "--workers", "1"]
    _CALLS.clear()
    _FAIL_AFTER[0] = 5
    with pytest.raises(RuntimeError):
        main(args)
    _FAIL_AFTER[0] = None
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert out.is_dir() and not partial_path(out).exists()


def test_bad_input_leaves_no_partial_output(family, tmp_path: Path) -> None:
    bad = load_file(str(family["models"][0] / "model.safetensors"))
    bad["model.layers.5.mlp.up_proj.weight"][0, 0] = float("nan")  # found late, after shards were written
    save_file(bad, str(family["models"][0] / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        merge_checkpoints(family["base"], family["models"], tmp_path / "out", "ties", max_shard_bytes=1500, progress=False)
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- memory

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file
    from taskmerge.merge import apply_task_vector, merge_checkpoints, merged_task_vector
    from taskmerge.io.writers import write_safetensors

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    from taskmerge.registry import MethodOptions, register_method

    class Norms:  # a two-pass model-level statistic: one number per tensor
        def collect(self, name, deltas, options):
            return float(deltas.norm())
        def finalize(self, collected, options):
            return sum(collected.values()) / len(collected)

    @register_method("_twopass", options=MethodOptions, paper="test", summary="test",
                     global_statistic=lambda options: Norms())
    def _twopass(deltas, options, ctx):
        return deltas.sum(dim=0) / ctx.state

    root, mode, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    models = [root / f"ft{t}" for t in range(int(sys.argv[4]))]
    # warm up every code path on a tiny checkpoint, then reset the high-water mark
    merge_checkpoints(root / "tiny-base", [root / "tiny-ft"] * len(models), root / "warm", method,
                      progress=False, overwrite=True, max_shard_bytes=int(sys.argv[5]), workers=1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = status("VmRSS")
    if mode == "stream":
        merge_checkpoints(root / "base", models, root / "out", method, progress=False, overwrite=True,
                          max_shard_bytes=int(sys.argv[5]), workers=1)
    else:  # the naive way: whole state dicts in memory
        base = load_file(str(root / "base" / "model.safetensors"))
        fts = [load_file(str(m / "model.safetensors")) for m in models]
        merged = apply_task_vector(base, merged_task_vector(base, fts, method), 0.3)
        write_safetensors(root / "naive.safetensors", merged)
    print(json.dumps({"peak_over_start": status("VmHWM") - rss0}))
    """
)

_N, _LARGEST, _LAYERS = 1 << 20, 2 << 20, 24  # elements of the ordinary tensors and of the largest one (float32)


def _synthetic(root: Path, T: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(1024, _N // 1024, generator=g) for i in range(_LAYERS)}
    base["embed.weight"] = torch.randn(2048, _LARGEST // 2048, generator=g)
    for name, sd in [("base", base)] + [(f"ft{t}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
                                        for t in range(T)]:
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
    for name, value in (("tiny-base", 0.0), ("tiny-ft", 1.0)):
        (root / name).mkdir()
        save_file({k: torch.full((2, 2), value) for k in base}, str(root / name / "model.safetensors"))


def _peak(root: Path, mode: str, method: str, T: int, shard: int) -> int:
    # glibc's dynamic mmap threshold would keep freed multi-MiB tensors cached in the heap, varying the
    # high-water mark by a tensor or two from run to run; pinned, every freed tensor goes back to the OS
    # and the mark measures live memory
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(root), mode, method, str(T), str(shard)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_over_start"]


def test_peak_memory_is_t_plus_two_largest_tensors_not_the_model(tmp_path: Path) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    T = 3
    _synthetic(tmp_path, T)
    largest = _LARGEST * 4
    model = (_LAYERS * _N + _LARGEST) * 4  # 104 MiB per model; 416 MiB of inputs
    shard = 1 << 30  # one shard: a writer holding its shard in memory would hold the whole output
    # the T task updates, θ₀ and the merged tensor (T + 2 float32 copies of the largest tensor; one worker),
    # one more copy's worth of transients (the method's own), 4 MiB slack. Measured: T + 2 copies exactly for
    # task arithmetic, T + 3 for the two-pass method below (its sum and quotient)
    bound = (T + 3) * largest + (4 << 20)
    assert bound < model  # the bound rules out holding even one whole model
    stream = _peak(tmp_path, "stream", "task_arithmetic", T, shard)
    print(f"peaks over start (MiB): bound {bound / 2**20:.0f}, streaming {stream / 2**20:.0f}", file=sys.stderr)
    assert stream <= bound, f"streaming merge peaked {stream / 2**20:.0f} MiB over its start, bound {bound / 2**20:.0f} MiB"
    # a model-level method's two passes (statistics, then merge) stream as well
    two_pass = _peak(tmp_path, "stream", "_twopass", T, shard)
    assert two_pass <= bound, f"two-pass merge peaked {two_pass / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    # the check can fail: the naive in-memory merge of the same files exceeds it by far
    naive = _peak(tmp_path, "naive", "task_arithmetic", T, shard)
    print(f"two-pass {two_pass / 2**20:.0f}, naive {naive / 2**20:.0f}", file=sys.stderr)
    assert naive > 3 * bound, f"naive merge peaked only {naive / 2**20:.0f} MiB"
