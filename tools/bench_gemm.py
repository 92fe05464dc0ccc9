"""BF16 linear layers on this CPU: autotp's native GEMM against F.linear and torch's prepacked
oneDNN path, and autotp's weight-only INT8 GEMM (bf16 activations) against the native bf16 one,
measured interleaved in one run, with GFLOP/s and, for decoding shapes (M <= 16), the weight
bytes read per second as a share of the machine's read bandwidth.

    python tools/bench_gemm.py [--threads 1 2] [--m 1 4 16 64 256 1024] [--rounds 3] [--quant-group-size 128]

The read bandwidth is measured by the same script, interleaved with the GEMMs: an AVX-512
streaming read of a 1 GiB buffer (autotp.kernels.read_probe) on the same threads, median
over the run. Ratios are time of the other path / time of native: above 1.00 native is faster.
The script prints the CPU's ISA first: AMX tiles and AVX-512 BF16 decide what oneDNN can use
(without them oneDNN emulates bf16, and native's fp32 FMAs on widened weights win).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from autotp import kernels

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): weight [N, K]


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def timed(fn, min_time: float = 0.2, min_runs: int = 3) -> float:
    """Median seconds of fn() over at least ``min_runs`` runs and ``min_time`` seconds."""
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
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the four paths per shape")
    parser.add_argument("--quant-group-size", type=int, default=128,
                        help="input columns per INT8 scale (0: one scale per output row)")
    args = parser.parse_args()
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    ok, why = kernels.status()
    print(f"torch {torch.__version__}, CPU ISA: {' '.join(isa)}; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; native kernels: {why}")
    if not ok:
        sys.exit("the native kernels cannot run here; nothing to compare")
    probe = torch.ones(2**30, dtype=torch.uint8)
    summary = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidths: list[float] = []
        rows = []

        def read_bw() -> None:
            bandwidths.append(probe.numel() / timed(lambda: kernels.read_probe(probe), 0.0, 3))

        for n, k in SHAPES:
            w = (torch.randn(n, k) * 0.02).bfloat16()
            packed_native = kernels.prepack(w)
            packed_onednn = torch.ops.mkldnn._reorder_linear_weight(w, None)
            group = args.quant_group_size or k
            q8, s8 = kernels.prepack_int8(*kernels.quantize_int8(w, group))
            int8_bytes = q8.numel() + s8.numel() * 4  # what one product streams
            for m in args.m:
                x = torch.randn(m, k).bfloat16()
                paths = {
                    "native": lambda: kernels.linear(x, packed_native, None, n),
                    "F.linear": lambda: F.linear(x, w),
                    "prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed_onednn, None, "none", [], ""),
                    "int8": lambda: kernels.linear_int8(x, q8, s8, None, n, group),
                }
                times = {name: [] for name in paths}
                for _ in range(args.rounds):  # interleaved: noise hits all alike
                    for name, fn in paths.items():
                        times[name].append(timed(fn))
                    if m <= 16:
                        read_bw()
                rows.append((n, k, m, int8_bytes, {name: statistics.median(t) for name, t in times.items()}))
                print(".", end="", flush=True, file=sys.stderr)
        print(file=sys.stderr)
        bw = statistics.median(bandwidths)
        print(f"\n{threads} thread(s): measured read bandwidth {bw / 1e9:.1f} GB/s "
              f"(median of {len(bandwidths)}, range {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f})")
        print(f"{'N x K':>12} {'M':>5} {'native ms':>10} {'F.linear ms':>12} {'prepack ms':>11} "
              f"{'F/nat':>6} {'pre/nat':>8} {'nat GF/s':>9} {'F GF/s':>7} {'pre GF/s':>9} "
              f"{'int8 ms':>8} {'i8/nat':>7} {'i8 GF/s':>8} {'nat %bw':>8} {'F %bw':>6} {'pre %bw':>8} {'i8 %bw':>7}")
        for n, k, m, i8_bytes, t in rows:
            flop = 2 * m * n * k
            a, b, c, d = t["native"], t["F.linear"], t["prepacked"], t["int8"]
            line = (f"{n:>6}x{k:<5} {m:>5} {a * 1e3:>10.3f} {b * 1e3:>12.3f} {c * 1e3:>11.3f} "
                    f"{b / a:>6.2f} {c / a:>8.2f} {flop / a / 1e9:>9.1f} {flop / b / 1e9:>7.1f} {flop / c / 1e9:>9.1f} "
                    f"{d * 1e3:>8.3f} {d / a:>7.2f} {flop / d / 1e9:>8.1f}")
            if m <= 16:
                line += "".join(f" {n * k * 2 / v / bw * 100:>{width}.0f}%" for v, width in ((a, 7), (b, 5), (c, 7)))
                line += f" {i8_bytes / d / bw * 100:>6.0f}%"
            print(line)
            summary.append((threads, m, b / a, c / a, n * k * 2 / a / bw if m == 1 else None,
                            d / a, i8_bytes / d / bw if m == 1 else None))
    print("\nworst ratios over all shapes (>= 1.00: native at least as fast):")
    for threads in args.threads:
        mine = [s for s in summary if s[0] == threads]
        at_m1 = [s[4] for s in mine if s[4] is not None]
        print(f"  {threads} thread(s): F.linear/native min {min(s[2] for s in mine):.2f}, "
              f"prepacked/native min {min(s[3] for s in mine):.2f}"
              + (f", native M=1 share of read bandwidth min {min(at_m1) * 100:.0f}%" if at_m1 else ""))
        m1 = [s for s in mine if s[1] == 1]
        if m1:
            print(f"  {threads} thread(s): int8/native time at M=1 max {max(s[5] for s in m1):.2f} (target <= 0.60), "
                  f"int8 M=1 share of read bandwidth (int8 weights + fp32 scales) min "
                  f"{min(s[6] for s in m1) * 100:.0f}%")


if __name__ == "__main__":
    main()
