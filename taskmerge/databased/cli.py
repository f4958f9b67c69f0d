"""``taskmerge merge`` for data-based methods: checkpoint folders + heads + unlabeled texts -> merged model + heads.

The configuration is the usual merge YAML with ``method`` one of :data:`taskmerge.databased.DATA_METHODS`, its
``options`` the data-based method's options, ``lambda`` the λ of the data-free start (AdaMerging's and MDA-AM's
``init_lambda``, MOMA's ``lam``; the method's default if omitted) and a ``data`` section
(:class:`taskmerge.config.DataConfig`)::

    base: models/minilm                 # a Hugging Face model folder (architecture, tokenizer, θ₀)
    models: [ck/task_a/model, ck/task_b/model]
    method: moma
    options: {base: ties, steps: 200}
    lambda: 1.0
    output: merged/
    data:
      inputs: [texts/task_a.txt, texts/task_b.txt]    # unlabeled texts, one per line
      # heads: [...]                                   # default: head.safetensors in/next to each model folder

The encoder's feature is the attention-masked mean of the last hidden states (L2-normalised unless the
heads' metadata says ``normalize: false``), the feature the benchmark's heads read. The merged encoder is
written like any merge (folder or ``.safetensors``; config and tokenizer copied from ``base``) and the
per-task heads (with the learned matrices absorbed) to ``<output>/heads/<i>-<model>.safetensors`` (file output:
``<output stem>.heads/``), in the same format as the input heads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from taskmerge.databased import DATA_METHODS, get_data_method, parse_data_options
from taskmerge.databased.encoder import FunctionalEncoder, mean_pool_features
from taskmerge.databased.loop import LabeledInputs, LinearHead, TokenInputs, json_info
from taskmerge.errors import CheckpointError, OptionError

__all__ = ["merge_with_data", "load_head", "save_head", "heads_dir"]

logger = logging.getLogger(__name__)


def load_head(path: str | Path) -> tuple[LinearHead, dict[str, str]]:
    """A head file (safetensors ``weight`` C × d and optional ``bias``) and its metadata."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: head file not found")
    with safe_open(str(p), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        keys = set(fh.keys())
        if "weight" not in keys:
            raise CheckpointError(f"{p}: a head file needs a 'weight' tensor")
        weight = fh.get_tensor("weight").float()
        bias = fh.get_tensor("bias").float() if "bias" in keys else None
    return LinearHead(weight, bias), meta


def save_head(path: str | Path, head: Any, metadata: dict[str, str] | None = None) -> None:
    """Write a head as safetensors (``weight``, ``bias``) with its metadata."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().contiguous()}
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias.detach().contiguous()
    save_file(tensors, str(path), metadata=metadata or {})


def _default_head(model: Path) -> Path:
    for cand in (model / "head.safetensors", model.parent / "head.safetensors"):
        if cand.is_file():
            return cand
    raise OptionError(f"data.heads: no head.safetensors in or next to {model}; list the head files in data.heads")


def heads_dir(output: Path) -> Path:
    """Where the merged heads go: ``<output>/heads`` for a folder, ``<stem>.heads`` next to a file."""
    return output.with_name(output.stem + ".heads") if output.suffix == ".safetensors" else output / "heads"


def _texts(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise OptionError(f"data.inputs: cannot read {path} ({exc.strerror})") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise OptionError(f"data.inputs: {path} holds no text")
    return texts


def _labeled_file(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip().lstrip("-").isdigit():
            raise OptionError(f"data.labeled: {path}:{i}: expected 'label<TAB>text' with an integer label")
        labels.append(int(label))
        texts.append(text.strip())
    return texts, labels


def merge_with_data(cfg: Any, progress: bool = True) -> Path:
    """Run the data-based merge a :class:`taskmerge.config.MergeConfig` describes and write model and heads."""
    from transformers import AutoModel, AutoTokenizer

    from taskmerge.io.readers import open_checkpoint
    from taskmerge.io.writers import CheckpointWriter

    if cfg.method not in DATA_METHODS:
        raise OptionError(f"method {cfg.method!r} is not data-based; known: {', '.join(DATA_METHODS)}")
    data = cfg.data
    if data is None:
        raise OptionError(f"method {cfg.method!r} learns from data: the configuration needs a data section")
    spec = get_data_method(cfg.method)
    models = [Path(m) for m in cfg.models]
    T = len(models)
    base = Path(cfg.base)
    if not (base / "config.json").is_file():
        raise OptionError(f"base: {base} must be a Hugging Face model folder (config.json) for a data-based merge")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise CheckpointError(f"{out}: output already exists (pass --overwrite to replace it)")

    # heads, inputs
    head_paths = [Path(h) for h in data.heads] if data.heads is not None else [_default_head(m) for m in models]
    if len(head_paths) != T:
        raise OptionError(f"data.heads: {len(head_paths)} heads for {T} models")
    loaded = [load_head(h) for h in head_paths]
    heads = [h for h, _ in loaded]
    metas = [m for _, m in loaded]
    normalize = data.normalize
    if normalize is None:
        normalize = all(json.loads(m.get("normalize", "true")) for m in metas)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if data.inputs is not None:
        if len(data.inputs) != T:
            raise OptionError(f"data.inputs: {len(data.inputs)} files for {T} models")
        texts = [_texts(Path(p)) for p in data.inputs]
        bench_tasks = None
    else:
        from taskmerge.bench.datasets import load_task

        if len(data.tasks) != T:
            raise OptionError(f"data.tasks: {len(data.tasks)} tasks for {T} models")
        bench_tasks = [load_task(name) for name in data.tasks]
        texts = [[t for t, _ in task.split(data.split)] for task in bench_tasks]
    inputs = [TokenInputs.from_texts(tokenizer, tx, data.max_length) for tx in texts]

    # weights
    model = AutoModel.from_pretrained(str(base))
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_reader = open_checkpoint(base)
    task_sds = []
    for m in models:
        reader = open_checkpoint(m, base=base_reader)
        have = set(reader.keys())
        missing = [k for k in base_sd if k not in have]
        if missing:
            raise CheckpointError(f"{m}: tensor {missing[0]!r} of the base model is missing")
        task_sds.append({k: reader.get(k).to(base_sd[k].dtype) for k in base_sd})

    options = dict(cfg.options or {})
    options.setdefault("progress", progress)
    options.setdefault("seed", cfg.seed)
    if cfg.lam is not None:
        options.setdefault("lam" if cfg.method == "moma" else "init_lambda", cfg.lam)
    opts = parse_data_options(cfg.method, options)
    kwargs: dict[str, Any] = {"encoder": FunctionalEncoder(model, base_sd, mean_pool_features(normalize))}
    uses_labels = cfg.method == "mda_am" and opts.class_means == "labels"
    if data.labeled is not None and not uses_labels:
        raise OptionError("data.labeled: labelled files are read only by mda_am with options.class_means: labels "
                          "(the data-based methods use no label by default)")
    if uses_labels:
        if data.labeled is not None:
            if len(data.labeled) != T:
                raise OptionError(f"data.labeled: {len(data.labeled)} files for {T} models")
            pairs = [_labeled_file(Path(p)) for p in data.labeled]
        elif bench_tasks is not None:
            pairs = [([t for t, _ in task.val], [y for _, y in task.val]) for task in bench_tasks]
        else:
            raise OptionError("options.class_means: labels needs data.labeled (label<TAB>text files) or data.tasks "
                              "(the benchmark's validation split)")
        kwargs["labeled"] = [LabeledInputs(TokenInputs.from_texts(tokenizer, tx, data.max_length), torch.tensor(ys))
                             for tx, ys in pairs]
    result = spec.fn(base_sd, task_sds, heads, inputs, opts, **kwargs)

    out_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.dtype or "")
    from taskmerge.merge import input_identity
    from taskmerge.model_card import output_files

    described = {"method": cfg.method, "options": opts.model_dump(mode="json"), "lambda": repr(cfg.lam),
                 "output_dtype": cfg.dtype, "seed": cfg.seed, "base": input_identity(base),
                 "models": [input_identity(m) for m in models], "data": data.model_dump(mode="json")}
    with CheckpointWriter(out, overwrite=cfg.overwrite, copy_from=base, max_shard_bytes=cfg.max_shard_size,
                          metadata={"taskmerge_method": cfg.method},
                          extra_files=output_files(base, described, spec, resumable=False)) as writer:
        for name, value in result.state_dict.items():
            if out_dtype is not None and value.dtype.is_floating_point:
                value = value.to(out_dtype)
            writer.add(name, value)
        path = writer.commit()
    hdir = heads_dir(out)
    hdir.mkdir(parents=True, exist_ok=True)
    for i, (head, meta, m) in enumerate(zip(result.heads, metas, models)):
        save_head(hdir / f"{i}-{m.name if m.name not in ('model', '') else m.parent.name}.safetensors", head,
                  {**meta, "taskmerge_method": cfg.method})
    (hdir / "history.json").write_text(json.dumps({**result.history.to_dict(), "info": json_info(result.info)},
                                                  indent=1) + "\n")
    logger.info("%s: final loss %.5f; heads in %s", cfg.method, result.history.loss[-1] if result.history.loss else float("nan"), hdir)
    return path
