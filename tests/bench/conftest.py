"""Fixtures of the benchmark tests: a tiny random BERT, an isolated checkpoint cache, one torch thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from taskmerge.bench.backbone import Backbone, tiny_bert


@pytest.fixture(autouse=True)
def _single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny-model tests run single-threaded (faster than 2 contended threads for such small matmuls);
    tests marked ``slow`` (real MiniLM) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    return tiny_bert(seed=0)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TASKMERGE_CACHE", str(d))
    return d
