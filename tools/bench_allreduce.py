"""All-reduce latency per message size: autotp's shared-memory all-reduce against gloo
(torch.distributed), measured in one run, alternating, with the ratio. Rank 0 prints.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/bench_allreduce.py [--dtype bfloat16]

Each size is timed over ``--rounds`` alternating rounds of ``--repeats`` back-to-back calls
(the pattern of a decoding loop, where each layer's all-reduce follows the last); the table
gives the median over rounds of the time per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import autotp
from autotp.comm import TPGroup

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


def timed_calls(fn, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per call of ``repeats`` back-to-back calls (as in a decoding loop), after a
    barrier; one number per batch."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return [(time.perf_counter() - start) / repeats]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    autotp.init_distributed()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world, rank = dist.get_world_size(), dist.get_rank()
    group = TPGroup.from_torch(world, runtime=autotp.Runtime.from_env().replace(comm="shm"))
    dtype = getattr(torch, args.dtype)
    rows = []
    for size in SIZES:
        x = torch.ones(size // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
        times: dict[str, list[float]] = {"shm": [], "gloo": []}
        for name, fn in (("shm", group.all_reduce), ("gloo", dist.all_reduce)):  # warm-up
            timed_calls(fn, x, 5)
        for _ in range(args.rounds):
            times["shm"].extend(timed_calls(group.all_reduce, x, args.repeats))
            times["gloo"].extend(timed_calls(dist.all_reduce, x, args.repeats))
        rows.append((size, statistics.median(times["shm"]), statistics.median(times["gloo"])))
    if rank == 0:
        print(f"all-reduce of {args.dtype}, {world} ranks x {torch.get_num_threads()} thread(s), "
              f"median over {args.rounds} rounds of {args.repeats} back-to-back calls per side")
        print(f"{'size':>8} {'shm us':>9} {'gloo us':>9} {'gloo/shm':>9} {'shm GB/s':>9}")
        for size, a, b in rows:
            label = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
            print(f"{label:>8} {a * 1e6:>9.1f} {b * 1e6:>9.1f} {b / a:>9.1f} {size / a / 1e9:>9.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
