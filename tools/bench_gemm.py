"""BF16 linear layers on this CPU: F.linear against torch's prepacked oneDNN path, measured
interleaved in one run, with GFLOP/s and, for decoding shapes (M <= 16), the weight bytes read
per second as a share of the read bandwidth this script measures. A float32 F.linear column
shows what the CPU's fp32 FMA units reach on the same shape (on CPUs without AMX or AVX-512
BF16, oneDNN emulates bf16 and an fp32 kernel that widens bf16 weights in registers is the
better model of a native kernel's ceiling).

    python tools/bench_gemm.py [--threads 1 2] [--m 1 4 16 64 256 1024]

The native autotp kernel (issue: native BF16 GEMM) is to be added as a third column; until
then this is the yardstick it must meet. The script prints the CPU's ISA first: AMX tiles
and AVX-512 BF16 decide what oneDNN (and a native kernel) can use.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): weight [N, K]


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes per second of summing a buffer much larger than the caches (median of 5)."""
    torch.set_num_threads(threads)
    buf = torch.ones(int(gib * 2**30 / 4))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times)


def timed(fn, min_time: float = 0.3, min_runs: int = 3) -> float:
    fn()  # warm-up
    times = []
    while len(times) < min_runs or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths per shape")
    args = parser.parse_args()
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    print(f"torch {torch.__version__}, CPU ISA: {' '.join(isa)}; torch capability {torch.backends.cpu.get_cpu_capability()}")
    for threads in args.threads:
        bw = read_bandwidth(threads)
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): measured read bandwidth {bw / 1e9:.1f} GB/s")
        print(f"{'N x K':>12} {'M':>5} {'F.linear ms':>12} {'prepacked ms':>13} {'F/prep':>7} "
              f"{'F GFLOP/s':>10} {'prep GFLOP/s':>13} {'fp32 GFLOP/s':>13} {'F %bw':>6} {'prep %bw':>9}")
        for n, k in SHAPES:
            w32 = torch.randn(n, k) * 0.02
            w = w32.bfloat16()
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            for m in args.m:
                x32 = torch.randn(m, k)
                x = x32.bfloat16()
                plain = lambda: F.linear(x, w)
                pre = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                t_plain, t_pre = [], []
                for _ in range(args.rounds):  # interleaved: noise hits both alike
                    t_plain.append(timed(plain))
                    t_pre.append(timed(pre))
                a, b = statistics.median(t_plain), statistics.median(t_pre)
                c = timed(lambda: F.linear(x32, w32))
                flop = 2 * m * n * k
                row = (f"{n:>6}x{k:<5} {m:>5} {a * 1e3:>12.3f} {b * 1e3:>13.3f} {a / b:>7.2f} "
                       f"{flop / a / 1e9:>10.1f} {flop / b / 1e9:>13.1f} {flop / c / 1e9:>13.1f}")
                if m <= 16:
                    row += f" {n * k * 2 / a / bw * 100:>5.0f}% {n * k * 2 / b / bw * 100:>8.0f}%"
                print(row, flush=True)


if __name__ == "__main__":
    main()
