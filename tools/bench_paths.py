"""Every GEMM path this CPU can run, side by side in one run: autotp's native bf16 GEMM on each
instruction set (generic, avx2, avx512, avx512_bf16, amx as the CPU allows), torch's bf16 F.linear and prepacked
oneDNN linear, and fp32 F.linear; with the weight read rate at M=1 against the read bandwidth
(autotp's read probe on the best ISA's loads, interleaved; the portable probe's scalar loop
underestimates a machine whose loads outrun one XOR chain per core).

    python tools/bench_paths.py [--threads 1] [--m 1 16 256] [--shapes 4096x4096 11008x4096] [--rounds 3]

Ratios are the fastest torch bf16 time over each path's time: above 1.00 the path is faster.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from autotp import kernels
from autotp.runtime import Runtime
from bench_gemm import timed  # tools/: the same timing loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"], help="N x K of the weight")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    isas = kernels.available_isas(Runtime())
    if not isas:
        sys.exit(f"the extension is not built here: {kernels.status()[1]}")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}; torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}); "
          f"autotp paths: {', '.join(isas)} (auto picks {kernels.isa(Runtime())})")
    probe = torch.ones(1 << 30, dtype=torch.uint8)
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidths = []
        rows = []
        for shape in args.shapes:
            n, k = map(int, shape.lower().split("x"))
            w = (torch.randn(n, k) * 0.02).bfloat16()
            w32 = w.float()
            packed = kernels.prepack(w)
            onednn = torch.ops.mkldnn._reorder_linear_weight(w, None)
            for m in args.m:
                x = torch.randn(m, k).bfloat16()
                x32 = x.float()
                paths = {f"native-{i}": (lambda i=i: kernels.linear(x, packed, None, n, isa=i)) for i in isas}
                paths.update({"F.linear bf16": lambda: F.linear(x, w),
                              "oneDNN bf16": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""),
                              "F.linear fp32": lambda: F.linear(x32, w32)})
                times = {name: [] for name in paths}
                for _ in range(args.rounds):
                    for name, fn in paths.items():
                        times[name].append(timed(fn))
                    bandwidths.append(probe.numel() / timed(lambda: kernels.read_probe(probe, Runtime()),
                                                            0.0, 1))
                rows.append((n, k, m, {name: statistics.median(t) for name, t in times.items()}))
                print(".", end="", flush=True, file=sys.stderr)
        print(file=sys.stderr)
        bw = statistics.median(bandwidths)
        names = list(rows[0][3])
        print(f"\n{threads} thread(s), read bandwidth {bw / 1e9:.1f} GB/s (read probe on the {kernels.isa(Runtime())} loads, median of {len(bandwidths)})")
        print(f"{'N x K':>12} {'M':>5} " + " ".join(f"{nm:>14}" for nm in names) + "   (ms; ratio = best torch bf16 / path)")
        for n, k, m, t in rows:
            best_torch = min(t["F.linear bf16"], t["oneDNN bf16"])
            cells = [f"{t[nm] * 1e3:7.2f} {best_torch / t[nm]:5.2f}x" for nm in names]
            line = f"{n:>6}x{k:<5} {m:>5} " + " ".join(f"{c:>14}" for c in cells)
            if m == 1:
                line += "   M=1 %bw: " + " ".join(f"{nm.split('-')[-1]} {n * k * 2 / t[nm] / bw * 100:.0f}%"
                                             for nm in names if nm.startswith("native"))
            print(line)


if __name__ == "__main__":
    main()
