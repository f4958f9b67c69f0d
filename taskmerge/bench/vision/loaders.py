"""The one loader of the vision suite: pretrained CLIP, fine-tuned vision encoders and image datasets, from
local folders or the Hugging Face hub. Nothing else in taskmerge downloads, and nothing downloads at import.

**Where things come from** (:class:`Sources`). Defaults per backbone (:data:`BACKBONES`): the pretrained CLIP
``openai/clip-vit-*`` and FusionBench's fine-tuned vision encoders ``tanganke/clip-vit-*_<checkpoint>``
(``<checkpoint>`` is :attr:`VisionTask.checkpoint`). Each reference is a local folder or file if one exists at
that path, else a hub repo id. A sources YAML (``--sources``) overrides any of it::

    pretrained: /models/clip-vit-base-patch32          # a CLIPModel folder (or hub id)
    checkpoint_pattern: /models/ft/{task}               # {task}: the task name, {checkpoint}: its FusionBench suffix
    checkpoints: {mnist: /elsewhere/mnist-ft}           # per task, wins over the pattern
    data_dir: /data/vision                              # image folders (taskmerge.bench.vision.images)
    cache_dir: /data/hf-cache                           # Hugging Face cache for hub downloads
    tasks:                                              # per-task fields of taskmerge.bench.vision.tasks.VisionTask
      svhn: {hub_dataset: my-org/svhn, hub_config: null}

**Checkpoints** are read as safetensors (or ``pytorch_model.bin``) files; only the vision tower's tensors are
kept (``vision_model.*``; a ``CLIPVisionModel`` or a whole ``CLIPModel`` both work), and every tensor of the
pretrained tower must be there with its shape.

**Datasets**: ``<data_dir>/<task>/`` in the image-folder format of :mod:`taskmerge.bench.vision.images` if the
folder exists; otherwise the task's hub dataset through the optional ``datasets`` package (``pip install
datasets``), test split and the training split validation is carved from.

**Offline** (``offline=True``, ``--offline``): hub references resolve only from the local Hugging Face cache,
and hub datasets are not read. A missing checkpoint or dataset is a one-line
:class:`~taskmerge.errors.TaskmergeError` naming what to fetch and where to put it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from taskmerge.bench.vision.images import ImageSplit, carve_validation, read_classnames, read_image_folder
from taskmerge.bench.vision.tasks import VisionTask
from taskmerge.errors import CheckpointError, OptionError, TaskmergeError

__all__ = ["BackboneSource", "BACKBONES", "Sources", "backbone_source", "read_sources_yaml", "make_sources",
           "ClipParts", "load_clip", "load_encoder_checkpoint", "load_task_splits", "with_local_classnames"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSource:
    """Default sources of one backbone: the pretrained CLIP and the pattern of its fine-tuned checkpoints."""

    name: str
    pretrained: str
    checkpoint_pattern: str


BACKBONES: dict[str, BackboneSource] = {
    b.name: b for b in (
        BackboneSource("ViT-B/32", "openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_{checkpoint}"),
        BackboneSource("ViT-B/16", "openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16_{checkpoint}"),
        BackboneSource("ViT-L/14", "openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14_{checkpoint}"),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower()).removeprefix("vit")


def backbone_source(name: str) -> BackboneSource:
    """The backbone called ``name`` (``ViT-B/32``, ``vit-b-32``, ``B/32`` … all name the same one)."""
    for b in BACKBONES.values():
        if _key(b.name) == _key(name):
            return b
    raise OptionError(f"--backbone {name!r}: known backbones are {', '.join(BACKBONES)}")


@dataclass(frozen=True)
class Sources:
    """Where a run's models and data come from (module docstring).

    Attributes:
        backbone: the backbone's name (labels errors and tables).
        pretrained: the pretrained CLIP: folder or hub id.
        checkpoints: task name → fine-tuned vision encoder (folder, file or hub id).
        data_dir: root of the image folders (``None``: hub datasets only).
        offline: resolve hub references from the local cache only; no hub datasets.
        cache_dir: Hugging Face cache directory (``None``: the library's default).
    """

    backbone: str
    pretrained: str
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    offline: bool = False
    cache_dir: Path | None = None


_YAML_KEYS = {"pretrained", "checkpoint_pattern", "checkpoints", "data_dir", "cache_dir", "tasks"}


def read_sources_yaml(path: str | Path) -> dict[str, Any]:
    """The sources YAML at ``path`` (module docstring), its keys checked."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise OptionError(f"--sources {p}: cannot read it ({exc.__class__.__name__}: {first})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--sources {p}: expected a mapping at the top level")
    unknown = sorted(set(data) - _YAML_KEYS)
    if unknown:
        raise OptionError(f"--sources {p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_YAML_KEYS))}")
    for key in ("checkpoints", "tasks"):
        if not isinstance(data.get(key) or {}, dict):
            raise OptionError(f"--sources {p}: {key} must be a mapping of task names")
    return data


def make_sources(backbone: str, tasks: Mapping[str, VisionTask], config: Mapping[str, Any] | None = None, *,
                 data_dir: str | Path | None = None, offline: bool = False,
                 cache_dir: str | Path | None = None) -> Sources:
    """The sources of a run on ``tasks`` (name → task): the backbone's defaults, then ``config`` (a parsed
    sources YAML), then the explicit arguments (command-line flags) where given."""
    cfg = dict(config or {})
    default = backbone_source(backbone)
    pattern = str(cfg.get("checkpoint_pattern") or default.checkpoint_pattern)
    explicit = {str(k): str(v) for k, v in (cfg.get("checkpoints") or {}).items()}
    checkpoints = {}
    for name, task in tasks.items():
        try:
            checkpoints[name] = explicit.get(name) or pattern.format(task=name, checkpoint=task.checkpoint)
        except (KeyError, IndexError) as exc:
            raise OptionError(f"checkpoint_pattern {pattern!r}: unknown placeholder {exc}; "
                              "use {task} or {checkpoint}") from None
    data = data_dir if data_dir is not None else cfg.get("data_dir")
    cache = cache_dir if cache_dir is not None else cfg.get("cache_dir")
    return Sources(default.name, str(cfg.get("pretrained") or default.pretrained), checkpoints,
                   Path(data).expanduser() if data else None, offline, Path(cache).expanduser() if cache else None)


# ------------------------------------------------------------------------------------------------- models

_WEIGHT_PATTERNS = (["*.safetensors"], ["*.bin"])
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _hub_snapshot(repo: str, what: str, sources: Sources) -> Path:
    """A local snapshot of hub repo ``repo`` (config files and one weight format), downloaded unless offline."""
    from huggingface_hub import snapshot_download

    path: Path | None = None
    try:
        for weights in _WEIGHT_PATTERNS:
            path = Path(snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS + weights,
                                          local_files_only=sources.offline,
                                          cache_dir=str(sources.cache_dir) if sources.cache_dir else None))
            if _has_weights(path):
                return path
    except Exception as exc:  # the hub's errors (offline, not found, no network) have many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        how = "not in the local Hugging Face cache (--offline)" if sources.offline else f"not fetched ({reason})"
        raise CheckpointError(f"{what}: {repo} is neither a local path nor available from the Hugging Face hub: {how}; "
                              f"fetch it with `huggingface-cli download {repo} --local-dir DIR` and give DIR in "
                              "the sources YAML") from None
    raise CheckpointError(f"{what}: hub repo {repo} has no .safetensors or .bin weights ({path})")


def resolve_model(ref: str, what: str, sources: Sources) -> Path:
    """A local folder or file for ``ref``: the path itself if it exists, else a hub snapshot."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):
        return _hub_snapshot(ref, what, sources)
    raise CheckpointError(f"{what}: {ref} does not exist (give a local folder, a file, or a Hugging Face repo id "
                          "owner/name)")


@dataclass
class ClipParts:
    """The pretrained CLIP: model (eval mode, float32), tokenizer, image processor and where it was read."""

    model: Any
    tokenizer: Any
    processor: Any
    path: Path


def load_clip(sources: Sources) -> ClipParts:
    """The pretrained CLIP of ``sources`` (a ``CLIPModel`` folder with its tokenizer and image processor)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    what = f"pretrained CLIP ({sources.backbone})"
    path = resolve_model(sources.pretrained, what, sources)
    try:
        model = CLIPModel.from_pretrained(str(path)).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{what}: {path} is not a CLIPModel folder with tokenizer and image processor "
                              f"({str(exc).strip().splitlines()[0]})") from None
    return ClipParts(model, tokenizer, processor, path)


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{what}: no .safetensors or .bin weights in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                out.update(load_file(str(f)))
            else:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # a corrupt or foreign file: safetensors / pickle errors of many kinds
            raise CheckpointError(f"{what}: cannot read {f} ({exc.__class__.__name__})") from None
    return out


def load_encoder_checkpoint(ref: str, task: str, base_sd: Mapping[str, torch.Tensor],
                            sources: Sources) -> dict[str, torch.Tensor]:
    """Task ``task``'s fine-tuned vision tower, with the keys, shapes and dtypes of ``base_sd`` (the
    pretrained ``vision_model.*`` tensors). Tensors named without the ``vision_model.`` prefix are accepted;
    tensors outside the vision tower (text tower, projections, heads) are ignored."""
    what = f"fine-tuned checkpoint of task {task!r}"
    path = resolve_model(ref, what, sources)
    found: dict[str, torch.Tensor] = {}
    for key, value in _read_tensors(path, what).items():
        name = key if key.startswith("vision_model.") else f"vision_model.{key}"
        if name in base_sd:
            found[name] = value
    missing = [k for k in base_sd if k not in found]
    if missing:
        raise CheckpointError(f"{what}: {path} lacks {missing[0]} ({len(missing)} of the {len(base_sd)} tensors of the "
                              f"{sources.backbone} vision tower); is it a CLIP {sources.backbone} checkpoint?")
    for name, base in base_sd.items():
        if found[name].shape != base.shape:
            raise CheckpointError(f"{what}: {path}: tensor {name} has shape {tuple(found[name].shape)}, the pretrained "
                                  f"{sources.backbone} has {tuple(base.shape)}")
    return {name: found[name].to(base.dtype).contiguous() for name, base in base_sd.items()}


# ------------------------------------------------------------------------------------------------ datasets


def with_local_classnames(task: VisionTask, sources: Sources) -> VisionTask:
    """``task`` with the class names of ``<data_dir>/<task>/classnames.txt`` if that file exists."""
    if sources.data_dir is None:
        return task
    path = sources.data_dir / task.name / "classnames.txt"
    return replace(task, classnames=read_classnames(path)) if path.is_file() else task


def _columns(ds: Any, task: VisionTask) -> tuple[str, str]:
    features = dict(ds.features)

    def pick(configured: str | None, kind: str, names: Sequence[str]) -> str:
        if configured is not None:
            if configured not in features:
                raise TaskmergeError(f"dataset {task.hub_dataset}: no column {configured!r} (task {task.name!r}); "
                                     f"columns: {', '.join(features)}")
            return configured
        typed = [c for c, f in features.items() if type(f).__name__ == kind]
        named = [c for c in names if c in features]
        if typed or named:
            return (typed or named)[0]
        raise TaskmergeError(f"dataset {task.hub_dataset}: cannot tell its {kind} column (task {task.name!r}); "
                             f"columns: {', '.join(features)}; set tasks.{task.name}.{kind.lower()}_column")

    image = pick(task.image_column, "Image", ("image", "img", "jpg", "png"))
    label = pick(task.label_column, "ClassLabel", ("label", "labels", "cls", "fine_label"))
    count = getattr(features[label], "num_classes", None)
    if count is not None and count != task.num_classes:
        raise TaskmergeError(f"dataset {task.hub_dataset}: column {label!r} has {count} classes, task {task.name!r} "
                             f"has {task.num_classes} class names")
    return image, label


def _to_rgb(value: Any) -> Any:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        import io

        with Image.open(io.BytesIO(value["bytes"])) as im:
            return im.convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        with Image.open(value["path"]) as im:
            return im.convert("RGB")
    import numpy as np

    return Image.fromarray(np.asarray(value)).convert("RGB")


def _hub_split(task: VisionTask, split: str, kind: str, sources: Sources, missing: str) -> ImageSplit:
    fix = (f"put its images in <data_dir>/{task.name}/{{test,train}}/<label>/ (taskmerge.bench.vision.images; "
           f"--data-dir or data_dir in the sources YAML)")
    if sources.offline:
        raise TaskmergeError(f"dataset of task {task.name!r}: {missing} and --offline reads no hub dataset; {fix}")
    try:
        import datasets
    except ImportError:
        raise TaskmergeError(f"dataset of task {task.name!r}: {missing}; {fix}, or `pip install datasets` to read "
                             f"{task.hub_dataset} from the Hugging Face hub") from None
    try:
        ds = datasets.load_dataset(task.hub_dataset, task.hub_config, split=split,
                                   cache_dir=str(sources.cache_dir) if sources.cache_dir else None)
    except Exception as exc:  # the hub's and the datasets library's errors have many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TaskmergeError(f"dataset of task {task.name!r}: {missing}, and {task.hub_dataset} (split {split!r}) "
                             f"could not be read from the hub ({reason}); {fix}") from None
    image, label = _columns(ds, task)
    labels = torch.tensor([int(v) for v in ds[label]], dtype=torch.long)
    logger.info("%s %s: %d examples from the hub (%s)", task.name, kind, len(labels), task.hub_dataset)
    return ImageSplit(task.name, kind, labels, lambda i: _to_rgb(ds[i][image]), f"hf://{task.hub_dataset}/{split}")


def load_task_splits(task: VisionTask, sources: Sources, val_fraction: float = 0.1, max_val: int | None = 5000,
                     val_seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    """``(validation, test)`` splits of ``task``: from ``<data_dir>/<task>/`` if it exists, else the hub.
    Validation is ``val/`` if present, else carved from the training split (:func:`carve_validation`)."""
    root = sources.data_dir / task.name if sources.data_dir is not None else None
    if root is not None and root.is_dir():
        test = read_image_folder(root / "test", task.name, "test", task.num_classes)
        if (root / "val").is_dir():
            return read_image_folder(root / "val", task.name, "val", task.num_classes), test
        if not (root / "train").is_dir():
            raise TaskmergeError(f"dataset of task {task.name!r}: {root} has neither val/ nor train/ "
                                 "(the validation split is carved from train/)")
        train = read_image_folder(root / "train", task.name, "train", task.num_classes)
        return carve_validation(train, val_fraction, max_val, val_seed), test
    missing = f"no folder {root}" if root is not None else "no --data-dir"
    test = _hub_split(task, task.test_split, "test", sources, missing)
    train = _hub_split(task, task.train_split, "train", sources, missing)
    return carve_validation(train, val_fraction, max_val, val_seed), test
