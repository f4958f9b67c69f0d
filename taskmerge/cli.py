"""The ``taskmerge`` command line.

* ``taskmerge merge [CONFIG.yaml] [flags]`` — merge checkpoints; flags override the file's keys.
* ``taskmerge methods`` — list the registered methods, their papers and options.

Bad input exits with code 2 and a one-line ``error:`` message naming the file, tensor or option.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

# Transparent huge pages for torch's large CPU buffers (read before torch's first allocation): a streaming
# merge allocates fresh multi-MB tensors for every tensor name, and with 4 KiB pages the kernel's page
# faults took half of a 1B-parameter task-arithmetic merge's time (no effect where THP is disabled).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import yaml  # noqa: E402

from taskmerge.config import MergeConfig, load_config  # noqa: E402
from taskmerge.errors import OptionError, TaskmergeError  # noqa: E402
from taskmerge.merge import merge_checkpoints  # noqa: E402
from taskmerge.registry import list_methods  # noqa: E402

__all__ = ["main", "build_parser"]

logger = logging.getLogger("taskmerge")


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``taskmerge`` command."""
    parser = argparse.ArgumentParser(prog="taskmerge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge fine-tuned checkpoints into one model")
    m.add_argument("config", nargs="?", help="YAML configuration file (flags override its keys)")
    m.add_argument("--base", help="pretrained model: file or Hugging Face folder")
    m.add_argument("--models", nargs="+", help="fine-tuned models (files or folders)")
    m.add_argument("--method", help="merging method (see `taskmerge methods`)")
    m.add_argument("--option", "-o", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="a method option; VALUE is parsed as YAML (repeatable)")
    m.add_argument("--lambda", dest="lam", type=float, help="scaling coefficient λ (method default if omitted)")
    m.add_argument("--output", help="output folder, or a .safetensors file")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: base's)")
    m.add_argument("--compute-dtype", choices=["float32", "float64"], help="dtype of the task-vector algebra")
    m.add_argument("--device", help="cpu or cuda")
    m.add_argument("--seed", type=int, help="seed for stochastic methods")
    m.add_argument("--include", nargs="+", help="regexes: merge only matching tensors")
    m.add_argument("--exclude", nargs="+", help="regexes: keep matching tensors at the base value")
    m.add_argument("--matrix-exclude", nargs="+", help="regexes: 2-D tensors to treat as non-matrix")
    m.add_argument("--max-shard-size", help="shard size limit, e.g. 5GB")
    m.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.add_argument("--output-format", choices=["dense", "lora"],
                   help="dense: a merged model (default); lora: a PEFT LoRA adapter of the base (needs --lora-rank)")
    m.add_argument("--lora-rank", type=int, help="rank of the LoRA adapter written by --output-format lora")
    m.add_argument("--lora-drop-other", action="store_true", default=None,
                   help="with --output-format lora: drop changed biases/norms/embeddings (warned) instead of failing")
    m.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted merge of the same request from its completed shards (<output>.partial)")
    m.add_argument("--workers", type=int, help="tensors merged at once (default: one per core, at most 4; Ray: the cluster's CPUs)")
    m.add_argument("--executor", choices=["thread", "ray"],
                   help="thread: a CPU thread pool (default); ray: a Ray cluster (pip install 'taskmerge[ray]')")

    from taskmerge.bench.runner import build_parser as build_bench_parser

    build_bench_parser(sub.add_parser("bench", help="run the offline benchmark: fine-tune (cached), merge, tabulate"))

    lm = sub.add_parser("methods", help="list merging methods and their options")
    lm.add_argument("name", nargs="?", help="show one method in detail")
    lm.add_argument("--markdown", action="store_true", help="print the README's method table")
    return parser


def _merge(args: argparse.Namespace) -> int:
    data: dict[str, Any] = load_config(args.config) if args.config else {}
    flags = {
        "base": args.base, "models": args.models, "method": args.method, "lambda": args.lam,
        "output": args.output, "dtype": args.dtype, "compute_dtype": args.compute_dtype,
        "device": args.device, "seed": args.seed, "include": args.include, "exclude": args.exclude,
        "matrix_exclude": args.matrix_exclude, "max_shard_size": args.max_shard_size,
        "overwrite": args.overwrite, "output_format": args.output_format, "lora_rank": args.lora_rank,
        "lora_drop_other": args.lora_drop_other, "resume": args.resume, "workers": args.workers,
        "executor": args.executor,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.option:
        data["options"] = {**(data.get("options") or {}), **dict(args.option)}
    cfg = MergeConfig.from_mapping(data, args.config or "command line")
    if _is_data_based(cfg.method):
        from taskmerge.databased.cli import merge_with_data

        out = merge_with_data(cfg, progress=not args.no_progress)
        print(f"merged {len(cfg.models)} models with {cfg.method} into {out}")
        return 0
    if cfg.data is not None:
        raise OptionError(f"method {cfg.method!r} is data-free: remove the data section")
    if cfg.output_format == "lora":
        if cfg.resume:
            raise OptionError("option resume: not supported with output_format lora")
        return _merge_lora(cfg, args)
    out = merge_checkpoints(
        cfg.base, cfg.models, cfg.output, cfg.method, cfg.options, lam=cfg.lam, policy=cfg.policy(),
        compute_dtype=cfg.compute_dtype, output_dtype=cfg.dtype, device=cfg.device, seed=cfg.seed,
        overwrite=cfg.overwrite, max_shard_bytes=cfg.max_shard_size, progress=not args.no_progress,
        resume=cfg.resume, workers=cfg.workers, executor=cfg.executor,
    )
    print(f"merged {len(cfg.models)} models with {cfg.method} into {out}")
    return 0


def _is_data_based(method: str) -> bool:
    from taskmerge.databased import DATA_METHODS

    return method in DATA_METHODS


def _merge_lora(cfg: MergeConfig, args: argparse.Namespace) -> int:
    from taskmerge.io.lora_export import merge_to_lora

    assert cfg.lora_rank is not None
    report = merge_to_lora(
        cfg.base, cfg.models, cfg.output, cfg.method, cfg.options, rank=cfg.lora_rank, lam=cfg.lam,
        policy=cfg.policy(), compute_dtype=cfg.compute_dtype, output_dtype=cfg.dtype, device=cfg.device,
        seed=cfg.seed, overwrite=cfg.overwrite, drop_other=cfg.lora_drop_other, progress=not args.no_progress,
    )
    print(f"merged {len(cfg.models)} models with {cfg.method} into the rank-{report.rank} LoRA adapter {report.path} "
          f"({len(report.errors)} matrices)")
    print(f"max relative truncation error: {report.max_error:.3g}" + (f" ({report.max_tensor})" if report.max_tensor else ""))
    if report.dropped:
        print(f"dropped {len(report.dropped)} changed tensor(s) a LoRA adapter cannot hold, e.g. {report.dropped[0]}")
    return 0


def _describe_options(spec_options: type) -> list[str]:
    lines = []
    for name, field in spec_options.model_fields.items():
        default = "required" if field.is_required() else repr(field.default)
        desc = f" — {field.description}" if field.description else ""
        lines.append(f"    {name}: {getattr(field.annotation, '__name__', field.annotation)} = {default}{desc}")
    return lines


def _markdown_table() -> str:
    rows = ["| method | paper | data | default λ | options |", "|---|---|---|---|---|"]
    for spec in list_methods():
        opts = ", ".join(f"`{k}`" for k in spec.options.model_fields) or "–"
        data = "data-free" if spec.data_free else "needs data"
        rows.append(f"| `{spec.name}` | {textwrap.shorten(spec.paper, 70, placeholder=' …')} | {data} | {spec.default_lambda} | {opts} |")
    return "\n".join(rows)


def _methods(args: argparse.Namespace) -> int:
    if args.markdown:
        print(_markdown_table())
        return 0
    specs = list_methods()
    if args.name:
        specs = [s for s in specs if s.name == args.name]
        if not specs and not _is_data_based(args.name):
            raise TaskmergeError(f"unknown method {args.name!r}; run `taskmerge methods` for the list")
    for spec in specs:
        kind = "data-free" if spec.data_free else "data-based"
        print(f"{spec.name}  [{kind}, default λ={spec.default_lambda}]  {spec.summary}")
        print(f"    paper: {spec.paper}")
        print("\n".join(_describe_options(spec.options)) or "    (no options)")
    from taskmerge.databased import DATA_METHODS

    for dm in DATA_METHODS.values():  # data-based methods (taskmerge.databased): need a data section
        if args.name and args.name != dm.name:
            continue
        print(f"{dm.name}  [data-based]  {dm.summary}")
        print(f"    paper: {dm.paper}")
        print("\n".join(_describe_options(dm.options)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from taskmerge.bench.runner import run_from_args

    return run_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskmerge`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"merge": _merge, "methods": _methods, "bench": _bench}
    try:
        return handlers[args.command](args)
    except TaskmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a merge keeps its completed shards: rerun it with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
