"""Every case of issue 15's hard edges, run as a new user would: the ``taskmerge`` CLI in a subprocess.

Tiny BERT and LLaMA checkpoints are built locally with ``transformers`` (``save_pretrained``) in a
temporary folder; each case prepares its input (a NaN, a crafted shard index, a symlink, a locked
folder, …), runs ``python -m taskmerge.cli merge …`` and records the exit code, the first line of the
message (the ``error:`` line; for a success, the warning it must print or the final ``merged …`` line),
whether output was left behind (the output or ``<output>.partial`` where none should be), and whether the
row is what the issue asks for: a clean ``error:`` with exit code 2 and nothing left (or the completed
shards kept when the message says ``--resume``), or a success whose result is checked against an
independent computation (``θ₀ + λ Σ_t (θ_t − θ₀)`` from the input files, or the bytes of a fresh merge).

Cases that need a kernel refusal (a folder or file the user may not read or write) run without the
``CAP_DAC_OVERRIDE`` / ``CAP_DAC_READ_SEARCH`` capabilities (``setpriv``) when run as root, since root
ignores permission bits. The disk-full case runs on a 64 KiB tmpfs when one can be mounted (root), and
a disk that fills after some shards is simulated by an ``os.pwrite`` that fails with ``ENOSPC``.

Usage::

    python benchmarks/hard_edges.py [--json results.json]

Prints the table as markdown, then as JSON. Light: ~30 subprocesses, a few seconds each (torch import).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = os.geteuid() == 0
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if ROOT and shutil.which("setpriv") else []

# A process whose os.pwrite fails with ENOSPC once HARD_EDGES_ENOSPC_AFTER bytes are written.
_ENOSPC_WRAPPER = """
import errno, os, sys
left = [int(os.environ["HARD_EDGES_ENOSPC_AFTER"])]
real = os.pwrite
def pwrite(fd, data, offset):
    if len(data) > left[0]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    left[0] -= len(data)
    return real(fd, data, offset)
os.pwrite = pwrite
from taskmerge.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A Python caller of the library, reporting a TaskmergeError as the CLI does.
_LIBRARY_CALLER = """
import sys
from taskmerge.errors import TaskmergeError
from taskmerge.merge import merge_checkpoints
try:
    merge_checkpoints(sys.argv[1], sys.argv[2:-1], sys.argv[-1], "task_arithmetic", progress=False)
except TaskmergeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


# ----------------------------------------------------------------------------------- tiny models


def _family(root: Path, name: str, make: Callable[[], torch.nn.Module], n: int = 2) -> dict[str, Path | list[Path]]:
    torch.manual_seed(0)
    model = make()
    model.save_pretrained(root / f"{name}-base")
    models = []
    for t in range(n):
        ft = make()
        ft.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ft.save_pretrained(root / f"{name}-ft{t}")
        models.append(root / f"{name}-ft{t}")
    return {"base": root / f"{name}-base", "models": models}


def build_families(root: Path) -> dict[str, dict[str, Path | list[Path]]]:
    """A tiny ``BertModel`` and a tiny ``LlamaForCausalLM``, each with two fine-tunes."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    def bert() -> torch.nn.Module:
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=32))

    def llama() -> torch.nn.Module:
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))

    return {"bert": _family(root, "bert", bert), "llama": _family(root, "llama", llama)}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def task_arithmetic_holds(base: Path, models: list[Path], out: Path, lam: float) -> bool:
    """The output equals ``θ₀ + λ Σ_t (θ_t − θ₀)`` on every floating tensor (computed here from the files)."""
    b, fts, o = _weights(base), [_weights(m) for m in models], _weights(out)
    for name, t0 in b.items():
        if not t0.is_floating_point():
            continue
        ref = t0.double() + lam * sum(f[name].double() - t0.double() for f in fts)
        if not torch.allclose(o[name].double(), ref.to(t0.dtype).double(), atol=1e-6, rtol=1e-5):
            return False
    return True


# ----------------------------------------------------------------------------------- running a case


@dataclass
class Row:
    case: str
    exit_code: int
    message: str
    output_left: bool
    expected: str
    ok: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _run(argv: list[str], cwd: Path, env_extra: dict[str, str] | None = None, prefix: list[str] | None = None,
         wrapper: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env_extra or {}))
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "taskmerge.cli"]
    proc = subprocess.run([*(prefix or []), *head, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _first(lines: str, starts: tuple[str, ...]) -> str:
    return next((line.strip() for line in lines.splitlines() if line.strip().startswith(starts)), "")


def _left(*paths: Path) -> bool:
    return any(p.exists() for p in paths)


class Runner:
    def __init__(self, work: Path, fam: dict[str, dict[str, Path | list[Path]]]) -> None:
        self.work = work
        self.fam = fam
        self.rows: list[Row] = []
        self._n = 0

    def out(self) -> Path:
        self._n += 1
        return self.work / "outputs" / f"o{self._n:02d}"

    def merge_args(self, out: Path, family: str = "bert", *extra: str, models: list[Path] | None = None,
                   base: Path | None = None, method: str = "task_arithmetic") -> list[str]:
        f = self.fam[family]
        return ["merge", "--base", str(base or f["base"]), "--models", *map(str, models or f["models"]),
                "--method", method, "--output", str(out), "--no-progress", *extra]

    def error_case(self, case: str, argv: list[str], out: Path, *, must_say: str, keep_partial: bool = False,
                   **run_kw) -> Row:
        """A case that must end in one ``error:`` line with exit code 2 naming ``must_say``, and leave
        nothing (or, with ``keep_partial``, only ``<output>.partial`` with the message saying --resume)."""
        t = time.perf_counter()
        rc, _, err = self._run(argv, **run_kw)
        line = _first(err, ("error:",))
        must_say = must_say.replace(str(self.work), "$TMP")
        partial = out.with_name(out.name + ".partial")
        left = _left(out, partial)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        traceback = "Traceback" in err
        if keep_partial:
            clean = not out.exists() and partial.is_dir() and "--resume" in line
        else:
            clean = not left
        ok = rc == 2 and len(errors) == 1 and not traceback and must_say in line and clean
        row = Row(case, rc, line or (err.strip().splitlines() or [""])[-1], left, "error: exit 2"
                  + (", completed shards kept for --resume" if keep_partial else ", nothing left"), ok,
                  time.perf_counter() - t)
        if must_say not in line:
            row.notes.append(f"message lacks {must_say!r}")
        self.rows.append(row)
        return row

    def success_case(self, case: str, argv: list[str], out: Path, *, check: Callable[[], bool],
                     warning: str | None = None, **run_kw) -> Row:
        """A case that must succeed with a right result (``check``), printing ``warning`` if given."""
        t = time.perf_counter()
        rc, stdout, err = self._run(argv, **run_kw)
        line = _first(err, ("WARNING",)) if warning else _first(stdout, ("merged",))
        right = rc == 0 and check()
        ok = right and (warning is None or warning in err)
        row = Row(case, rc, line or (err.strip().splitlines() or [""])[-1],
                  _left(out.with_name(out.name + ".partial")),
                  "success, result checked" + (f", warns {warning!r}" if warning else ""), ok, time.perf_counter() - t)
        self.rows.append(row)
        return row

    def _run(self, argv: list[str], **kw) -> tuple[int, str, str]:
        rc, out, err = _run(argv, kw.pop("cwd", self.work), **kw)
        return rc, out.replace(str(self.work), "$TMP"), err.replace(str(self.work), "$TMP")


# ----------------------------------------------------------------------------------- the cases


def run_cases(work: Path) -> list[Row]:
    fam = build_families(work / "in")
    r = Runner(work, fam)
    (work / "outputs").mkdir()
    bert, llama = fam["bert"], fam["llama"]

    # 0. what works: the baseline the other rows are measured against
    out = r.out()
    r.success_case("baseline: BERT task arithmetic, λ 0.5", r.merge_args(out, "bert", "--lambda", "0.5"), out,
                   check=lambda o=out: task_arithmetic_holds(bert["base"], bert["models"], o, 0.5))
    out = r.out()
    r.success_case("baseline: LLaMA task arithmetic, bfloat16 output", r.merge_args(out, "llama", "--lambda", "0.3",
                   "--dtype", "bfloat16"), out,
                   check=lambda o=out: _weights(o)["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16)

    # 1. output not writable, disk full
    locked = work / "locked"
    locked.mkdir(mode=0o555)
    out = locked / "o"
    if ROOT and not DROP_DAC:
        r.rows.append(Row("output folder not writable", -1, "skipped: root without setpriv", False, "", True))
    else:
        r.error_case("output folder not writable", r.merge_args(out), out, must_say="Permission denied",
                     prefix=DROP_DAC)
    afile = work / "afile"
    afile.write_text("x")
    out = afile / "o"
    r.error_case("output path below a file", r.merge_args(out), out, must_say="is a file, not a folder")
    small = work / "small"
    small.mkdir()
    mounted = ROOT and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                                      capture_output=True).returncode == 0
    try:
        if mounted:
            out = small / "o"
            r.error_case("disk full (64 KiB tmpfs)", r.merge_args(out, "llama"), out, must_say="No space left")
        else:
            r.rows.append(Row("disk full (64 KiB tmpfs)", -1, "skipped: cannot mount a tmpfs", False, "", True))
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
    out = r.out()
    r.error_case("disk full before the first shard completes (simulated ENOSPC)", r.merge_args(out, "llama"), out,
                 must_say="disk full", wrapper=_ENOSPC_WRAPPER, env_extra={"HARD_EDGES_ENOSPC_AFTER": "2000"})
    out = r.out()
    shards = ("--max-shard-size", "20KB")
    r.error_case("disk full after some shards (simulated ENOSPC)", r.merge_args(out, "llama", *shards), out,
                 must_say="disk full", keep_partial=True, wrapper=_ENOSPC_WRAPPER,
                 env_extra={"HARD_EDGES_ENOSPC_AFTER": "60000"})
    fresh = r.out()
    _run(r.merge_args(fresh, "llama", *shards), work)
    os.utime(llama["models"][0] / "model.safetensors")  # `touch` an input before resuming
    r.success_case("... space freed, an input touched, then --resume", r.merge_args(out, "llama", *shards, "--resume"),
                   out, check=lambda o=out, f=fresh: all(
                       (o / p.name).read_bytes() == p.read_bytes() for p in f.glob("*.safetensors")))

    # 2. -o values
    out = r.out()
    r.error_case("-o 'keep=[0.2' (malformed YAML)", r.merge_args(out, method="ties") + ["-o", "keep=[0.2"], out,
                 must_say="option keep")
    row = r.error_case("-o with a !!python/object tag", r.merge_args(out, method="ties")
                       + ["-o", "keep=!!python/object/apply:os.system ['touch pwned']"], out, must_say="option keep")
    row.ok = row.ok and not (work / "pwned").exists()
    r.error_case("-o kep=0.2 (unknown option)", r.merge_args(out, method="ties") + ["-o", "kep=0.2"], out,
                 must_say="did you mean 'keep'")

    # 3. non-finite output
    for lam in ("nan", "inf"):
        r.error_case(f"--lambda {lam}", r.merge_args(out, "bert", f"--lambda={lam}"), out, must_say="option lambda")
    r.error_case("--lambda 1e30 --dtype float16", r.merge_args(out, "llama", "--lambda", "1e30", "--dtype", "float16"),
                 out, must_say="not finite in torch.float16")

    # 4. paths out of the checkpoint's folder
    outside = work / "outside"
    shutil.copytree(llama["models"][1], outside)
    names = list(_weights(llama["base"]))
    for tag, case, shard in (("climb", "shard index naming ../../outside/model.safetensors", "../../outside/model.safetensors"),
                             ("absolute", "shard index naming an absolute path", str(outside / "model.safetensors"))):
        crafted = work / "crafted" / f"ckpt-{tag}"  # ../.. is the work folder, where outside/ is
        shutil.copytree(llama["models"][0], crafted)
        (crafted / "model.safetensors").unlink()
        (crafted / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
        r.error_case(case, r.merge_args(out, "llama", models=[crafted, llama["models"][1]]), out,
                     must_say="refused" if "absolute" not in case else "absolute path")
    linked = work / "linked"
    shutil.copytree(llama["models"][0], linked)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside / "model.safetensors")
    r.error_case("weights file a symlink out of its folder", r.merge_args(out, "llama", models=[linked, llama["models"][1]]),
                 out, must_say="outside the checkpoint's folder")
    adapter = work / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 1)},
              str(work / "stolen_adapter.safetensors"))
    (adapter / "adapter_model.safetensors").symlink_to(work / "stolen_adapter.safetensors")
    r.error_case("adapter weights a symlink out of its folder", r.merge_args(out, "llama", models=[adapter]), out,
                 must_say="outside the checkpoint's folder")

    # 5. messages
    nan_base = work / "nan-base"
    shutil.copytree(bert["base"], nan_base)
    sd = load_file(str(nan_base / "model.safetensors"))
    sd["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    save_file(sd, str(nan_base / "model.safetensors"), metadata={"format": "pt"})
    r.error_case("NaN in the base model", r.merge_args(out, "bert", base=nan_base), out,
                 must_say=f"{nan_base / 'model.safetensors'}: tensor 'encoder.layer.0.attention.self.query.weight' of the base")
    unreadable = work / "unreadable"
    shutil.copytree(bert["models"][1], unreadable)
    (unreadable / "model.safetensors").chmod(0)
    if ROOT and not DROP_DAC:
        r.rows.append(Row("input file with mode 000", -1, "skipped: root without setpriv", False, "", True))
    else:
        r.error_case("input file with mode 000", r.merge_args(out, "bert", models=[bert["models"][0], unreadable]), out,
                     must_say="Permission denied", prefix=DROP_DAC)
    r.error_case("--output-format lora without --lora-rank", r.merge_args(out, "llama", "--output-format", "lora"), out,
                 must_say="lora_rank")
    (work / "typo.yaml").write_text(yaml.safe_dump({"base": str(bert["base"]), "models": [str(m) for m in bert["models"]],
                                                    "method": "task_arithmetic", "output": str(out), "lamda": 0.5}))
    r.error_case("YAML key typo (lamda)", ["merge", str(work / "typo.yaml")], out, must_say="did you mean 'lambda'")
    done = r.out()
    _run(r.merge_args(done, "bert"), work)
    r.error_case("existing output, CLI", r.merge_args(done, "bert"), done.with_name("never"), must_say="--overwrite")
    r.error_case("existing output, library call (Python)", [str(bert["base"]), *map(str, bert["models"]), str(done)],
                 done.with_name("never"), must_say="overwrite=True", wrapper=_LIBRARY_CALLER)

    # 6. --overwrite
    mine = work / "outputs" / "user-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("do not delete")
    row = r.error_case("--overwrite on a folder with a user's file", r.merge_args(mine, "bert", "--overwrite"),
                       mine.with_name("never"), must_say="notes.txt")
    row.ok = row.ok and (mine / "notes.txt").read_text() == "do not delete"
    r.success_case("--overwrite on a previous taskmerge output", r.merge_args(done, "bert", "--lambda", "0.7", "--overwrite"),
                   done, check=lambda o=done: task_arithmetic_holds(bert["base"], bert["models"], o, 0.7))
    r.error_case("output is one of the inputs", r.merge_args(bert["models"][0], "bert", "--overwrite"),
                 work / "never", must_say="the output is also an input")

    # 7. YAML paths, suspicious model lists
    cfg = work / "in" / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": "bert-base", "models": ["bert-ft0", "bert-ft1"], "method": "task_arithmetic",
                                   "lambda": 0.4, "output": "../outputs/from-yaml"}))
    cwd = work / "elsewhere"
    cwd.mkdir()
    r.success_case("relative paths in a YAML file, run from another folder", ["merge", str(cfg), "--no-progress"],
                   work / "outputs" / "from-yaml", cwd=cwd, check=lambda: task_arithmetic_holds(
                       bert["base"], bert["models"], work / "outputs" / "from-yaml", 0.4))
    for case, models, warning in (
        ("one fine-tuned model", [bert["models"][0]], "only one fine-tuned model"),
        ("the same model twice", [bert["models"][0], bert["models"][0]], "are the same model"),
        ("the base given as a model", [bert["models"][0], bert["base"]], "is the base model"),
    ):
        out = r.out()
        r.success_case(case, r.merge_args(out, "bert", "--lambda", "1", models=models), out, warning=warning,
                       check=lambda o=out, m=models: task_arithmetic_holds(bert["base"], m, o, 1.0))
    return r.rows


# ----------------------------------------------------------------------------------- report


def markdown(rows: list[Row]) -> str:
    lines = ["| case | exit | message (first line) | output left? | as promised? |", "|---|---|---|---|---|"]
    for row in rows:
        msg = row.message.replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        lines.append(f"| {row.case} | {row.exit_code} | `{msg}` | {'yes' if row.output_left else 'no'} | "
                     f"{'yes' if row.ok else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="taskmerge-hard-edges-"))
    os.chmod(work, 0o755)
    try:
        rows = run_cases(work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            for p in work.rglob("*"):  # make the locked folder and mode-000 file removable
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    print()
    payload = [asdict(r) for r in rows]
    print(json.dumps(payload, indent=1))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
