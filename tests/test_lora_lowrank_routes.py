"""The low-rank routes of TSV-M, Iso-C / Iso-CTS (``subspace = lora``) and DC-Merge through the merge engine with
real PEFT adapters (different ranks and target modules): the factors reach the methods, and the result equals the
dense route's."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from taskmerge import linalg  # noqa: E402
from taskmerge.io import open_checkpoint  # noqa: E402
from taskmerge.merge import MergeRequest, iter_merged  # noqa: E402
from test_lora_end_to_end import family  # noqa: E402, F401  (the base model and its three adapters)

CASES = [
    ("tsv_m", {}),
    ("iso_c", {"subspace": "lora"}),
    ("iso_cts", {"subspace": "lora"}),
    # TIES inside the cover space with linear smoothing: the default average smoothing gives a module touched by
    # one adapter equal diagonal entries in M, whose top-10 % trim is then a tie that rounding decides (both routes)
    ("dc_merge", {"setting": "lora", "lora_rank": 4, "smoothing": "linear"}),
    ("dc_merge", {"setting": "full", "inner": "ta"}),
]


@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
@pytest.mark.parametrize("method, options", CASES)
def test_low_rank_route_through_the_engine(family: dict, monkeypatch: pytest.MonkeyPatch, method: str, options: dict,
                                           compute_dtype: str) -> None:
    calls = []
    original = linalg.lowrank_svd
    monkeypatch.setattr(linalg, "lowrank_svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    base = open_checkpoint(family["base"])
    tasks = [open_checkpoint(a, base=base) for a in family["adapters"]]
    results = {}
    for route in (True, False):
        calls.clear()
        req = MergeRequest.build(method, {**options, "lowrank": route}, compute_dtype=compute_dtype)
        results[route] = {n: t for n, _, t in iter_merged(base, tasks, req) if t is not None}
        assert bool(calls) == route  # the factors reach the method exactly when the route is on
    rtol = 1e-5 if compute_dtype == "float64" else 1e-3
    for name, dense in results[False].items():
        low = results[True][name]
        scale = float(dense.abs().max())
        assert float((low - dense).abs().max()) <= rtol * max(scale, 1e-12), name
