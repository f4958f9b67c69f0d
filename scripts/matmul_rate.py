"""Print this machine's 2048 × 2048 float32 matmul rate (GFLOPS), the yardstick stated next to every benchmark time.

    python scripts/matmul_rate.py [--threads N] [--size 2048] [--repeats 5]

The benchmark runner measures the same number at its start and records it in its JSON / Markdown header
(``machine.matmul_gflops_2048``), so a wall time can be compared across machines.
"""

from __future__ import annotations

import argparse

import torch

from taskmerge.bench.runner import matmul_gflops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--size", type=int, default=2048, help="matrix side (default 2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed products; the best is kept (default 5)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = matmul_gflops(args.size, args.repeats)
    print(f"{args.size} x {args.size} float32 matmul: {rate:.1f} GFLOPS ({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
