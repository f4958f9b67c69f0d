"""Where weight averaging's time goes in a fresh process, against FusionBench's ``state_dict_avg`` (issue 16).

One mode per process (``fb``, ``ours`` or ``pass``), on ViT-B/32 shapes (``vit_shapes.py``, 12 layers, 8 tasks),
each printing one JSON line with the call's wall time and its minor page faults (``getrusage``):

* ``fb``: FusionBench 0.2.33's ``state_dict_avg`` of the 8 models (no base);
* ``ours``: building the zero base that taskmerge's API takes (timed apart, ``zero_base_s``) and then
  ``merged_task_vector(..., "weight_averaging")``, as ``merge_speed.py`` times it;
* ``pass``: the zero base, then only the streaming pass (:func:`taskmerge.linear_stream.linear_combination`,
  tensor by tensor), without the engine around it.

    for i in 1 2 3; do for m in fb ours pass; do PYTHONPATH=/tmp/fbenv python benchmarks/wa_breakdown.py $m; done; done
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_shapes import task_vectors  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(mode: str) -> dict:
    tvs = task_vectors(8, layers=12, seed=0)
    zero_base_s = None
    if mode == "fb":
        from fusion_bench.utils.state_dict_arithmetic import state_dict_avg

        small = {k: v[:2].clone() for k, v in list(tvs[0].items())[:2]}
        state_dict_avg([small, small])  # warm-up
        f0, t0 = _faults(), time.perf_counter()
        merged = state_dict_avg(tvs)
    elif mode in ("ours", "pass"):
        from taskmerge.linear_stream import linear_combination
        from taskmerge.merge import merged_task_vector
        from taskmerge.selection import TensorPolicy

        linear_combination(torch.zeros(4), [torch.ones(4)] * 2, divisor=2.0)  # warm-up
        f0, t0 = _faults(), time.perf_counter()
        zeros = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
        zero_base_s = round(time.perf_counter() - t0, 3)
        if mode == "ours":
            policy = TensorPolicy(exclude=(), matrix_exclude=())  # every 2-D tensor a matrix, as merge_speed.py
            merged = merged_task_vector(zeros, tvs, "weight_averaging", {}, workers=1, policy=policy)
        else:
            # kept, like the engine's result: each output takes fresh pages
            merged = {k: linear_combination(zeros[k], [sd[k] for sd in tvs], divisor=float(len(tvs))) for k in zeros}
    else:
        raise SystemExit(f"unknown mode {mode!r}: fb, ours or pass")
    return {"mode": mode, "s": round(time.perf_counter() - t0, 3), "zero_base_s": zero_base_s,
            "minor_faults": _faults() - f0, "tensors": len(merged)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "ours")))
