"""The ``taskmerge`` command line.

* ``taskmerge merge [CONFIG.yaml] [flags]`` — merge checkpoints; flags override the file's keys. The file is
  taskmerge's own configuration or a MergeKit one (``merge_method:``, :mod:`taskmerge.mergekit_compat`).
* ``taskmerge methods [NAME]`` — list the merging methods, or one method's paper and options.
* ``taskmerge bench`` — the offline benchmark (``taskmerge bench --help``).

Bad input exits with code 2 and a one-line ``error:`` message naming the file, tensor or option.
``--help``, ``--version`` and ``methods`` read the generated method catalog (:mod:`taskmerge.catalog`) and
never import torch; the merge imports it when it starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# Transparent huge pages for torch's large CPU buffers (read before torch's first allocation): a streaming
# merge allocates fresh multi-MB tensors for every tensor name, and with 4 KiB pages the kernel's page
# faults took half of a 1B-parameter task-arithmetic merge's time (no effect where THP is disabled).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from taskmerge import __version__  # noqa: E402
from taskmerge.catalog import format_list, format_method, load_catalog, markdown_table, method_entry  # noqa: E402
from taskmerge.errors import OptionError, TaskmergeError, cli_spelling  # noqa: E402

__all__ = ["main", "build_parser"]

logger = logging.getLogger("taskmerge")


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``taskmerge`` command (``bench`` takes the rest of the line as is)."""
    parser = argparse.ArgumentParser(prog="taskmerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"taskmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge fine-tuned checkpoints into one model")
    m.add_argument("config", nargs="?",
                   help="YAML configuration file, taskmerge's or MergeKit's (flags override its keys)")
    m.add_argument("--base", help="pretrained model: file or Hugging Face folder")
    m.add_argument("--models", nargs="+", help="fine-tuned models (files or folders)")
    m.add_argument("--weights", type=_weights, metavar="W1,W2,...",
                   help="per-model weights: each model's task update is multiplied by its weight (default: all 1)")
    m.add_argument("--method", help="merging method (see `taskmerge methods`)")
    m.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option; VALUE is parsed as YAML (repeatable; `taskmerge methods NAME` lists them)")
    m.add_argument("--lambda", dest="lam", type=float, help="scaling coefficient λ (method default if omitted)")
    m.add_argument("--output", help="output folder, or a .safetensors file")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: base's)")
    m.add_argument("--compute-dtype", choices=["float32", "float64"], help="dtype of the task-vector algebra")
    m.add_argument("--cast-inputs", action="store_true", default=None,
                   help="accept fine-tuned models stored in another dtype than the base (e.g. float16 vs float32): "
                        "every tensor is read in the compute dtype")
    m.add_argument("--device", help="cpu or cuda")
    m.add_argument("--seed", type=int, help="seed for stochastic methods")
    m.add_argument("--include", nargs="+", help="regexes: merge only matching tensors")
    m.add_argument("--exclude", nargs="+",
                   help="regexes: keep matching tensors at the base value (default: classification heads)")
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

    # The benchmark's own parser imports torch: `taskmerge bench ARGS` hands ARGS to it unparsed.
    sub.add_parser("bench", add_help=False, help="run the offline benchmark: fine-tune (cached), merge, tabulate; "
                   "--suite vit: the papers' CLIP ViT protocol")

    lm = sub.add_parser("methods", help="list merging methods, or one method's paper and options")
    lm.add_argument("name", nargs="?", help="show one method in detail")
    lm.add_argument("--markdown", action="store_true", help="print the README's method table")
    return parser


_FLAGS = {  # configuration key → argparse destination
    "base": "base", "models": "models", "weights": "weights", "method": "method", "lambda": "lam",
    "output": "output", "dtype": "dtype", "compute_dtype": "compute_dtype", "cast_inputs": "cast_inputs",
    "device": "device", "seed": "seed", "include": "include", "exclude": "exclude",
    "matrix_exclude": "matrix_exclude", "max_shard_size": "max_shard_size", "overwrite": "overwrite",
    "output_format": "output_format", "lora_rank": "lora_rank", "lora_drop_other": "lora_drop_other",
    "resume": "resume", "workers": "workers", "executor": "executor",
}


def _config_data(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration mapping: the file's keys (a MergeKit file translated), then the flags over them."""
    from taskmerge.config import load_config, parse_option
    from taskmerge.mergekit_compat import from_mergekit, is_mergekit_config

    data: dict[str, Any] = load_config(args.config) if args.config else {}
    if is_mergekit_config(data):
        data = from_mergekit(data, str(args.config))
    data.update({key: getattr(args, dest) for key, dest in _FLAGS.items() if getattr(args, dest) is not None})
    if args.option:
        data["options"] = {**(data.get("options") or {}), **dict(parse_option(o) for o in args.option)}
    return data


def _merge(args: argparse.Namespace) -> int:
    from taskmerge.config import MergeConfig

    cfg = MergeConfig.from_mapping(_config_data(args), args.config or "command line")
    if cfg.weights is not None and (cfg.output_format == "lora" or _is_data_based(cfg.method)):
        raise OptionError("option weights: supported by data-free merges with dense output only")
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
    from taskmerge.merge import merge_checkpoints

    out = merge_checkpoints(
        cfg.base, cfg.models, cfg.output, cfg.method, cfg.options, lam=cfg.lam, policy=cfg.policy(),
        compute_dtype=cfg.compute_dtype, output_dtype=cfg.dtype, device=cfg.device, seed=cfg.seed,
        overwrite=cfg.overwrite, max_shard_bytes=cfg.max_shard_size, progress=not args.no_progress,
        resume=cfg.resume, workers=cfg.workers, executor=cfg.executor, weights=cfg.weights,
        cast_inputs=cfg.cast_inputs,
    )
    print(f"merged {len(cfg.models)} models with {cfg.method} ({_lambda_words(cfg)}) into {out}")
    return 0


def _lambda_words(cfg: Any) -> str:
    """``λ = 0.5`` or ``λ = 0.3, the method's default``: the λ a data-free merge used."""
    if cfg.lam is not None:
        return f"λ = {cfg.lam:g}"
    # the registry, not the catalog: a method registered at run time is not in the catalog (torch is loaded by now)
    from taskmerge.registry import get_method

    return f"λ = {get_method(cfg.method).default_lambda:g}, the method's default"


def _is_data_based(method: str) -> bool:
    methods = load_catalog()["methods"]
    return method in methods and methods[method]["kind"] == "data-based"


def _merge_lora(cfg: Any, args: argparse.Namespace) -> int:
    from taskmerge.merge import merge_to_lora

    assert cfg.lora_rank is not None
    report = merge_to_lora(
        cfg.base, cfg.models, cfg.output, cfg.method, cfg.options, rank=cfg.lora_rank, lam=cfg.lam,
        policy=cfg.policy(), compute_dtype=cfg.compute_dtype, output_dtype=cfg.dtype, device=cfg.device,
        seed=cfg.seed, overwrite=cfg.overwrite, drop_other=cfg.lora_drop_other, progress=not args.no_progress,
    )
    print(f"merged {len(cfg.models)} models with {cfg.method} ({_lambda_words(cfg)}) into the rank-{report.rank} "
          f"LoRA adapter {report.path} ({len(report.errors)} matrices)")
    print(f"max relative truncation error: {report.max_error:.3g}" + (f" ({report.max_tensor})" if report.max_tensor else ""))
    if report.dropped:
        print(f"dropped {len(report.dropped)} changed tensor(s) a LoRA adapter cannot hold, e.g. {report.dropped[0]}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    if args.markdown:
        print(markdown_table(catalog))
    elif args.name:
        print(format_method(args.name, method_entry(catalog, args.name)))
    else:
        print(format_list(catalog))
    return 0


def _bench(argv: list[str]) -> int:
    from taskmerge.bench.runner import build_parser as build_bench_parser
    from taskmerge.bench.runner import run_from_args

    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=["text", "vit"], default="text")
    chosen, argv = suite.parse_known_args(argv)
    if chosen.suite == "vit":  # the papers' CLIP ViT protocol (taskmerge.bench.vision)
        from taskmerge.bench.vision import runner as vision

        return vision.run_from_args(vision.build_parser(argparse.ArgumentParser(
            prog="taskmerge bench --suite vit", description=vision.__doc__.splitlines()[0])).parse_args(argv))
    parser = build_bench_parser(argparse.ArgumentParser(
        prog="taskmerge bench", description="run the offline benchmark: fine-tune (cached), merge, tabulate"))
    return run_from_args(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskmerge`` command; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with cli_spelling():
            if args.command == "bench":
                return _bench(rest)
            return {"merge": _merge, "methods": _methods}[args.command](args)
    except TaskmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a merge keeps its completed shards: rerun it with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
