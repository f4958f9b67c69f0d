"""Fixtures of the data-based merging tests: one torch thread, a toy MLP problem and a tiny random BERT problem
(built in :mod:`databased_problems`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from databased_problems import Problem, tiny_bert_problem, toy_problem


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def toy() -> Problem:
    return toy_problem()


@pytest.fixture(scope="module")
def bert() -> Problem:
    return tiny_bert_problem()
