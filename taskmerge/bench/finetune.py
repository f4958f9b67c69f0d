"""Fine-tuning of the backbone on one task through a frozen head, cached on disk.

The merging papers fine-tune CLIP through frozen *zero-shot* heads; the recipe reproduces that:

1. **The head** (:attr:`Recipe.head`), built once from the *pretrained* encoder and never trained or merged:

   * ``"zeroshot"`` (protocol v2, the named recipes ``"full"`` / ``"lora"``): :func:`zero_shot_head`, CLIP's
     recipe on the text encoder itself — every class name is put in each of the task's prompt templates
     (:attr:`~taskmerge.bench.datasets.TaskData.class_names`, :attr:`~taskmerge.bench.datasets.TaskData.templates`),
     each prompt embedded like an input (mean pooling, L2-normalised), the prompts of a class averaged and
     renormalised; logits are :attr:`Recipe.logit_scale` (20) times the cosine between text and class
     embedding, no bias (Radford et al. 2021, §3.1.4 and Fig. 3's pseudo-code; ``logit_scale`` plays CLIP's
     learned temperature).
   * ``"probe"`` (protocol v1, the first benchmark): a few-shot linear probe, below.

   **Linear probe.** Features of the frozen *pretrained* encoder (mean pooling, L2-normalised) are computed
   for the first :attr:`Recipe.lp_shots` (default 16) training examples of each class and a multinomial
   logistic-regression head is fitted by full-batch L-BFGS; the L2 penalty is picked from
   :attr:`Recipe.lp_l2_grid` by validation accuracy. The few-shot probe plays the part of CLIP's zero-shot
   heads: a meaningful but weak head, so that fine-tuning has real work to do (with a probe on all ~1000
   training examples the head already fits the training set and fine-tuning gains only 5-10 points;
   ``lp_shots=None`` gives that variant).
2. **Fine-tuning with the head frozen.** ``recipe.kind == "full"``: every encoder weight (the unused BERT
   pooler excepted) is trained with AdamW (``lr`` 5e-5, weight decay 0.01 except biases and LayerNorm,
   linear warm-up over 10 % of the steps then linear decay to 0, gradient clipping at 1.0), batch 16,
   sequences truncated to 48 tokens, :attr:`Recipe.steps` steps over seeded reshuffled epochs, dropout on.
   ``recipe.kind == "lora"``: the same loop trains only rank-16 LoRA adapters (``peft``) on the attention
   ``query``/``key``/``value`` projections (alpha 16, no dropout, lr 5e-4); the adapter is saved and also
   merged into the weights.

Because the head never moves, every fine-tuned encoder keeps the pretrained feature space, so merged
encoders can be evaluated with the same heads (which are stored with each checkpoint and never merged).

A checkpoint folder holds ``model/`` (``save_pretrained``: ``config.json`` + ``model.safetensors`` +
tokenizer files), ``head.safetensors``, ``recipe.json`` and, for LoRA, ``adapter/`` (PEFT format). It lives in
``$TASKMERGE_CACHE`` (default ``~/.cache/taskmerge``) under ``finetune/<task>/<kind>-<key>`` where ``key`` is a
SHA-256 of the recipe, the data manifest and the backbone's weights hash, and is reused when present.
Probe-headed recipes leave ``head`` and ``logit_scale`` out of the key (:meth:`Recipe.to_dict`), so the keys of
the first benchmark's checkpoints (v1) are unchanged; the training seed is part of every key, ``0`` by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from taskmerge.bench.backbone import Backbone
from taskmerge.bench.datasets import TaskData
from taskmerge.bench.evaluate import Evaluator, Head, accuracy_of_logits, collate, pool

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

HEADS: tuple[str, ...] = ("zeroshot", "probe")


@dataclass(frozen=True)
class Recipe:
    """Every setting that determines a fine-tuned checkpoint (all of it enters the cache key)."""

    kind: str = "full"
    steps: int = 250
    batch_size: int = 16
    max_length: int = 48
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    normalize: bool = True
    lp_l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    lp_max_iter: int = 300
    lp_shots: int | None = 16
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "key", "value")
    head: str = "probe"
    logit_scale: float = 20.0

    def __post_init__(self) -> None:
        if self.kind not in ("full", "lora"):
            raise ValueError(f"recipe kind must be 'full' or 'lora', got {self.kind!r}")
        if self.steps < 0 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("steps must be >= 0, batch_size >= 1 and max_length >= 2")
        if self.head not in HEADS:
            raise ValueError(f"recipe head must be one of {HEADS}, got {self.head!r}")
        if self.head == "zeroshot" and not (self.normalize and self.logit_scale > 0):
            raise ValueError("a zero-shot head scores cosines: it needs normalize=True and logit_scale > 0")

    def to_dict(self) -> dict[str, Any]:
        """All fields (tuples as lists); a probe-headed recipe omits ``head`` and ``logit_scale``, which keeps
        its cache key equal to the key it had before zero-shot heads existed."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.head == "probe":
            del out["head"], out["logit_scale"]
        return out

    def head_dict(self) -> dict[str, Any]:
        """The settings that determine the head (the zero-shot head's prompts are added by :func:`head_key`)."""
        if self.head == "zeroshot":
            return {"head": "zeroshot", "max_length": self.max_length, "logit_scale": self.logit_scale}
        return {"max_length": self.max_length, "normalize": self.normalize, "lp_l2_grid": list(self.lp_l2_grid),
                "lp_max_iter": self.lp_max_iter, "lp_shots": self.lp_shots, "seed": self.seed}


RECIPES: dict[str, Recipe] = {
    "full": Recipe(head="zeroshot"),
    "lora": Recipe(kind="lora", lr=5e-4, head="zeroshot"),
}
"""Named recipes; ``recipe="full"`` / ``"lora"`` in :func:`finetune` and the runner mean these (zero-shot heads;
the runner's protocol v1 replaces the head by ``"probe"``, which gives the first benchmark's recipes exactly)."""


def get_recipe(recipe: str | Recipe | Mapping[str, Any], **overrides: Any) -> Recipe:
    """A :class:`Recipe` from a name in :data:`RECIPES`, a mapping of fields, or a recipe.

    ``overrides`` replace fields of the result."""
    if isinstance(recipe, str):
        try:
            base = RECIPES[recipe]
        except KeyError:
            raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}") from None
    elif isinstance(recipe, Recipe):
        base = recipe
    else:
        fields = dict(recipe)
        for k in ("lp_l2_grid", "lora_targets"):
            if k in fields:
                fields[k] = tuple(fields[k])
        base = Recipe(**fields)
    return replace(base, **overrides) if overrides else base


def cache_dir() -> Path:
    """``$TASKMERGE_CACHE`` or ``~/.cache/taskmerge``."""
    return Path(os.environ.get("TASKMERGE_CACHE", Path.home() / ".cache" / "taskmerge")).expanduser()


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads``, else ``$TASKMERGE_THREADS``, else leave torch's default
    (one per physical core); returns the number in use."""
    n = num_threads or (int(os.environ["TASKMERGE_THREADS"]) if os.environ.get("TASKMERGE_THREADS") else None)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def checkpoint_key(recipe: Recipe, task: TaskData, backbone: Backbone) -> str:
    """SHA-256 of (checkpoint format, recipe, data manifest hash, backbone weights hash)."""
    return _sha({"format": CHECKPOINT_FORMAT, "recipe": recipe.to_dict(), "data": task.manifest_hash,
                 "backbone": backbone.identity})


def head_key(recipe: Recipe, task: TaskData, backbone: Backbone) -> str:
    """SHA-256 of what determines the head (so full and LoRA runs share one head); a zero-shot head's key also
    holds the task's class names and templates."""
    content: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "head": recipe.head_dict(), "data": task.manifest_hash,
                               "backbone": backbone.identity}
    if recipe.head == "zeroshot":
        content["prompts"] = {"class_names": task.class_names, "templates": list(task.templates)}
    return _sha(content)


# ------------------------------------------------------------------------------------------------ zero-shot head


def zero_shot_head(
    backbone: Backbone, task: TaskData, recipe: Recipe, evaluator: Evaluator | None = None
) -> Head:
    """CLIP-style zero-shot head from the pretrained encoder's own embeddings of class-name prompts.

    For class ``c`` with name ``n_c`` and templates ``p_1..p_M``: ``e_cm = normalize(pool(enc(p_m(n_c))))``,
    ``w_c = normalize(mean_m e_cm)`` (Radford et al. 2021, prompt ensembling: "averaging the text embeddings");
    ``W = logit_scale · [w_1; ...; w_C]``, bias 0, so ``logits = logit_scale · cos(f, w_c)`` on normalised
    features ``f``.
    """
    ev = evaluator or Evaluator(backbone.model, backbone.tokenizer, recipe.max_length)
    ev.load(backbone.model.state_dict())
    templates = task.templates
    prompts = [template.format(name) for name in task.class_names for template in templates]
    emb = ev.features(prompts, normalize=True).reshape(task.num_classes, len(templates), -1)
    weight = recipe.logit_scale * F.normalize(emb.mean(1), dim=-1)
    return Head(weight=weight, bias=torch.zeros(task.num_classes), labels=list(task.labels), normalize=True)


# ----------------------------------------------------------------------------------------------- linear probe


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: minimise mean cross-entropy + ``l2``·‖W‖²."""
    x = features.double()
    y = labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def probe_examples(task: TaskData, shots: int | None) -> list[tuple[str, int]]:
    """The training examples of the linear probe: all of ``task.train``, or its first ``shots`` per class."""
    if shots is None:
        return list(task.train)
    taken: dict[int, int] = {}
    out = []
    for text, y in task.train:
        if taken.get(y, 0) < shots:
            taken[y] = taken.get(y, 0) + 1
            out.append((text, y))
    return out


def train_linear_probe(
    backbone: Backbone, task: TaskData, recipe: Recipe, evaluator: Evaluator | None = None
) -> tuple[Head, dict[str, Any]]:
    """Fit the task's head on frozen pretrained features; returns the head and its metrics."""
    ev = evaluator or Evaluator(backbone.model, backbone.tokenizer, recipe.max_length)
    ev.load(backbone.model.state_dict())
    train = probe_examples(task, recipe.lp_shots)
    x_train = ev.features([t for t, _ in train], recipe.normalize)
    x_val = ev.features([t for t, _ in task.val], recipe.normalize)
    y_train = torch.tensor([y for _, y in train])
    y_val = [y for _, y in task.val]
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    scores: dict[str, float] = {}
    for l2 in recipe.lp_l2_grid:
        w, b = fit_logistic_regression(x_train, y_train, task.num_classes, l2, recipe.lp_max_iter)
        acc = accuracy_of_logits(x_val @ w.T + b, y_val)
        scores[repr(l2)] = acc
        if best is None or acc > best[0]:
            best = (acc, l2, w, b)
    assert best is not None
    val_acc, l2, w, b = best
    head = Head(weight=w, bias=b, labels=list(task.labels), normalize=recipe.normalize)
    train_acc = accuracy_of_logits(head.logits(x_train), y_train.tolist())
    logger.info("%s: linear probe l2=%g train acc %.3f, val acc %.3f", task.name, l2, train_acc, val_acc)
    return head, {"lp_l2": l2, "lp_val_acc_by_l2": scores, "lp_train_acc": train_acc, "lp_val_acc": val_acc}


def task_head(backbone: Backbone, task: TaskData, recipe: str | Recipe = "full", cache: Path | None = None) -> Head:
    """The task's frozen head of kind ``recipe.head`` (:func:`zero_shot_head` or the linear probe), loaded from
    the cache (``heads/<task>/<key>.safetensors``) or built and stored there."""
    recipe = get_recipe(recipe)
    path = (cache or cache_dir()) / "heads" / task.name / f"{head_key(recipe, task, backbone)[:16]}.safetensors"
    if path.exists():
        return Head.load(path)
    if recipe.head == "zeroshot":
        head = zero_shot_head(backbone, task, recipe)
        metrics: dict[str, Any] = {"head": "zeroshot", "logit_scale": recipe.logit_scale,
                                   "class_names": task.class_names, "templates": list(task.templates)}
    else:
        head, metrics = train_linear_probe(backbone, task, recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    head.save(tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    return head


# ------------------------------------------------------------------------------------------------ fine-tuning


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Index batches for ``steps`` steps: seeded reshuffled epochs, consecutive batches, the last partial batch of
    an epoch merged into the next epoch's stream (so every batch is full)."""
    rng = random.Random(seed)
    stream: list[int] = []
    batches: list[list[int]] = []
    while len(batches) < steps:
        if len(stream) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            stream.extend(perm)
        batches.append(stream[:batch_size])
        stream = stream[batch_size:]
    return batches


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _encoder_forward(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def train_encoder(
    model: Any, tokenizer: Any, head: Head, task: TaskData, recipe: Recipe, progress: bool = True
) -> dict[str, Any]:
    """Train ``model`` (a full BertModel or a PEFT-wrapped one) on ``task`` with ``head`` frozen; returns metrics."""
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    ids = tokenizer([t for t, _ in task.train], truncation=True, max_length=recipe.max_length)["input_ids"]
    labels = torch.tensor([y for _, y in task.train])
    weight, bias = head.weight.detach(), head.bias.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    warmup = max(1, round(recipe.warmup_ratio * recipe.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, recipe.steps, warmup))
    batches = batch_order(len(ids), recipe.steps, min(recipe.batch_size, len(ids)), recipe.seed)
    model.train()
    losses: list[float] = []
    correct = 0
    seen = 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"fine-tune {task.name} ({recipe.kind})", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        inputs = collate([ids[i] for i in batch], tokenizer.pad_token_id)
        feats = pool(_encoder_forward(model, inputs), inputs["attention_mask"], recipe.normalize)
        logits = feats @ weight.T + bias
        y = labels[batch]
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(batch)
        if step % 10 == 0 or step == len(batches) - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if (step + 1) % 50 == 0:
            recent = losses[-50:]
            logger.info("%s step %d/%d loss %.4f", task.name, step + 1, recipe.steps, sum(recent) / len(recent))
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "steps": recipe.steps,
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, recipe.steps),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "train_batch_acc": correct / seen if seen else None,
        "epochs": recipe.steps * recipe.batch_size / max(1, len(ids)),
    }


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A fine-tuned task checkpoint in the cache: the encoder folder, its frozen head and its recipe record."""

    task: str
    path: Path
    head: Head
    recipe: Recipe
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def adapter_dir(self) -> Path | None:
        d = self.path / "adapter"
        return d if d.is_dir() else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fine-tuned encoder's state dict (LoRA checkpoints: adapters merged into the weights)."""
        from safetensors.torch import load_file

        return load_file(str(self.model_dir / "model.safetensors"))

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        info = json.loads((path / "recipe.json").read_text())
        return cls(task=info["task"], path=path, head=Head.load(path / "head.safetensors"),
                   recipe=get_recipe(info["recipe"]), info=info)


def checkpoint_path(task: TaskData, recipe: Recipe, backbone: Backbone, cache: Path | None = None) -> Path:
    """Where :func:`finetune` stores (or finds) this checkpoint."""
    key = checkpoint_key(recipe, task, backbone)
    return (cache or cache_dir()) / "finetune" / task.name / f"{recipe.kind}-{key[:16]}"


def _environment() -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def finetune(
    backbone: Backbone,
    task: TaskData,
    recipe: str | Recipe = "full",
    cache: Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Checkpoint:
    """Fine-tune ``backbone`` on ``task`` through its frozen head (see the module docstring), or reuse the
    cached checkpoint."""
    recipe = get_recipe(recipe)
    configure_threads()
    path = checkpoint_path(task, recipe, backbone, cache)
    if (path / "recipe.json").exists() and not force:
        logger.info("%s: reusing cached checkpoint %s", task.name, path)
        return Checkpoint.load(path)
    head = task_head(backbone, task, recipe, cache=cache)
    model = backbone.fresh_model()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("pooler."))  # mean pooling: the pooler gets no gradient
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if recipe.kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=list(recipe.lora_targets), bias="none")
        peft_model = get_peft_model(model, config)
        metrics = train_encoder(peft_model, backbone.tokenizer, head, task, recipe, progress)
        peft_model.save_pretrained(str(tmp / "adapter"))
        model = peft_model.merge_and_unload()
    else:
        metrics = train_encoder(model, backbone.tokenizer, head, task, recipe, progress)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(str(tmp / "model"))
    backbone.tokenizer.save_pretrained(str(tmp / "model"))
    head.save(tmp / "head.safetensors")
    info = {
        "format": CHECKPOINT_FORMAT,
        "task": task.name,
        "labels": list(task.labels),
        "recipe": recipe.to_dict(),
        "key": checkpoint_key(recipe, task, backbone),
        "backbone": {"name": backbone.name, "identity": backbone.identity, "source": backbone.source},
        "data_manifest": task.manifest,
        "data_manifest_hash": task.manifest_hash,
        "metrics": metrics,
        "environment": _environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    logger.info("%s: fine-tuned %d steps in %.0f s (%.2f s/step), saved %s", task.name, recipe.steps,
                metrics["train_seconds"], metrics["seconds_per_step"], path)
    return Checkpoint.load(path)
