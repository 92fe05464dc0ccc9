"""Streaming weights from 4 KiB pages against transparent huge pages, side by side.

    python tools/bench_pages.py [--mb 400] [--procs 1 2] [--rounds 9]

Each process (one thread) holds the same weights twice: once on pages the kernel may not make
huge (``MADV_NOHUGEPAGE``, what a plain allocation gets where the THP mode is ``madvise``) and
once where ``autotp.kernels.pages`` puts them. It times, alternating, autotp's read probe and
its M=1 GEMMs (bf16 packed, INT8 packed) over both copies, so machine noise falls on both
alike; with ``--procs 2`` two processes do so at once (as two ranks on one machine do).
Prints GB/s (weight bytes over the median time) per process and the huge / 4k ratio.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import time

import torch

from autotp import kernels
from autotp.kernels import pages


def on_small_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory marked MADV_NOHUGEPAGE."""
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    out = torch.frombuffer(region, dtype=torch.uint8).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def weights(mb: int, k: int = 2048) -> dict[str, list[tuple]]:
    """Per format, a list of (callable inputs) over about ``mb`` MB of weight bytes."""
    n = 1024
    count = max(1, mb * (1 << 20) // (n * k * 2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).bfloat16()
    plain = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(count)]
    bf16 = [kernels.prepack(w) for w in plain]
    int8 = [kernels.prepack_int8(*kernels.quantize_int8(w, 128)) for w in plain for _ in range(2)]
    return {"x": x, "n": n, "bf16": bf16, "int8": int8}


def run(rank: int, args: argparse.Namespace, barrier, out) -> None:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    assert kernels.extension_loaded(), "the autotp extension did not build (see AUTOTP_VERBOSE_BUILD=1)"
    w = weights(args.mb)
    x, n = w["x"], w["n"]
    copies = {"4k": on_small_pages, "huge": pages.copy_to_huge_pages}
    calls, nbytes = {}, {}
    probe_bytes = args.mb << 20
    for where, move in copies.items():
        b = [move(p) for p in w["bf16"]]
        q = [(move(a), move(s)) for a, s in w["int8"]]
        buf = move(torch.ones(probe_bytes, dtype=torch.uint8))
        calls[f"probe {where}"] = lambda buf=buf: kernels.read_probe(buf)
        calls[f"bf16 {where}"] = lambda b=b: [kernels.linear(x, p, None, n) for p in b]
        calls[f"int8 {where}"] = lambda q=q: [kernels.linear_int8(x, a, s, None, n, 128) for a, s in q]
        nbytes[f"probe {where}"] = probe_bytes
        nbytes[f"bf16 {where}"] = sum(p.numel() * p.element_size() for p in b)
        nbytes[f"int8 {where}"] = sum(a.numel() * a.element_size() + s.numel() * s.element_size() for a, s in q)
        huge = sum(pages.huge_bytes(p) > 0 for p in b)
        out.put((rank, f"backed by huge pages {where}", f"{huge} of {len(b)} bf16 weights"))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    for _ in range(args.rounds):
        for key, fn in calls.items():
            barrier.wait()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    for kind in ("probe", "bf16", "int8"):
        rates = {where: nbytes[f"{kind} {where}"] / statistics.median(times[f"{kind} {where}"]) / 1e9
                 for where in copies}
        out.put((rank, kind, f"{rates['4k']:.1f} GB/s on 4k pages, {rates['huge']:.1f} on huge pages: "
                               f"x{rates['huge'] / rates['4k']:.2f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="weight megabytes per process (default 400)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes at once (default 1 2)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating passes (default 9)")
    args = parser.parse_args()
    if pages.huge_page_size() is None:
        raise SystemExit("bench_pages: this system has no transparent huge pages "
                         "(/sys/kernel/mm/transparent_hugepage/enabled is [never], or not Linux)")
    ctx = mp.get_context("spawn")
    for procs in args.procs:
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=run, args=(r, args, barrier, out)) for r in range(procs)]
        for p in workers:
            p.start()
        for p in workers:
            p.join()
        print(f"\n{procs} process(es) at once, {args.mb} MB each, 1 thread each, median of {args.rounds}:")
        lines = []
        while not out.empty():
            lines.append(out.get())
        for rank, kind, text in sorted(lines):
            print(f"  process {rank}  {kind:32s} {text}")


if __name__ == "__main__":
    main()
