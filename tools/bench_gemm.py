"""Every GEMM path this CPU can run, side by side in one run: autotp's bf16 GEMM as dispatched
by default (``auto``) and forced onto each instruction set (generic, avx2, avx512, avx512_vnni,
avx512_bf16, amx, as the CPU allows), torch's bf16 ``F.linear``, its prepacked oneDNN linear
(where oneDNN has native bf16 here) and fp32 ``F.linear``; then autotp's weight-only INT8 and INT4 (symmetric)
GEMMs on each path that serves them.
Timings interleave (every path once per round), so machine noise falls on all alike.

    python tools/bench_gemm.py [--threads 1 2] [--m 1 4 16 64 256 1024] [--shapes 4096x4096 ...]
                               [--rounds 3] [--paths auto avx512 ...] [--quant-group-size 128]

Ratios are the fastest torch bf16 time over the path's time, taken within each round (paths
measured next to each other) and the median over rounds: at or above 1.00 the path is at least
as fast as torch. Times shown are medians over rounds. For M <= 16 (decoding) the weight bytes streamed per second are given
as a share of the read bandwidth, measured interleaved by autotp's read probe: with portable
loads (``generic``) and with the best ISA's loads; the share is of the higher of the two.
Paths slower than 0.5 s a call are timed once per round (the generic path at prefill sizes).
The closing lines check the targets of issue 15 for the auto path, and issue 18's for INT4
(M=1 time <= 0.35x the auto bf16 time of the same shape).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from autotp import kernels
from autotp.runtime import Runtime

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]  # N x K of Llama-7B's projections: q/k/v/o, gate/up, down
SLOW_S = 0.5


def timed(fn: Callable[[], object], min_time: float = 0.2, min_runs: int = 3) -> float:
    """Median seconds of fn() over at least ``min_runs`` runs and ``min_time`` seconds, after a
    warm-up; one run when the warm-up alone took more than SLOW_S."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > SLOW_S:
        min_runs, min_time = 1, 0.0
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name_and_flags() -> tuple[str, set[str]]:
    name, flags = "?", set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and name == "?":
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return name, flags


def onednn_bf16() -> bool:
    """Whether torch's oneDNN computes bf16 natively on this CPU (AVX512-BF16 or AMX), rather
    than emulating it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_paths(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, onednn: torch.Tensor | None,
               isas: list[str], n: int) -> dict[str, Callable[[], object]]:
    x32, w32 = x.float(), w.float()
    paths: dict[str, Callable[[], object]] = {"auto": lambda: kernels.linear(x, packed, None, n)}
    paths.update({i: (lambda i=i: kernels.linear(x, packed, None, n, isa=i)) for i in isas})
    paths["F.linear bf16"] = lambda: F.linear(x, w)
    if onednn is not None:
        paths["oneDNN bf16"] = lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")
    paths["F.linear fp32"] = lambda: F.linear(x32, w32)
    return paths


def measure(args: argparse.Namespace, isas: list[str], threads: int) -> tuple[list, dict[str, float]]:
    """Rows (n, k, m, bytes of each quantized kind, medians by path, times of each round by
    path) and the read bandwidths."""
    torch.set_num_threads(threads)
    probe = torch.ones(1 << 30, dtype=torch.uint8)
    reads: dict[str, list[float]] = {"generic": [], isas[0]: []}
    rows = []
    for shape in args.shapes:
        n, k = map(int, shape.lower().split("x"))
        w = (torch.randn(n, k) * 0.02).bfloat16()
        packed = kernels.prepack(w)
        onednn = torch.ops.mkldnn._reorder_linear_weight(w, None) if onednn_bf16() else None
        group = args.quant_group_size or k
        q8, s8 = kernels.prepack_int8(*kernels.quantize_int8(w, group))
        q4, s4, z4 = kernels.prepack_int4(*kernels.quantize_int4(w, group))
        qbytes = {"int8": q8.numel() + s8.numel() * 4, "int4": q4.numel() + s4.numel() * 4}
        serving = {kind: [i for i in isas if kernels.serving_isa(i, kind) == i] for kind in qbytes}
        for m in args.m:
            x = torch.randn(m, k).bfloat16()
            paths = bf16_paths(x, w, packed, onednn, isas, n)
            paths.update({f"int8 {i}": (lambda i=i: kernels.linear_int8(x, q8, s8, None, n, group, isa=i))
                          for i in serving["int8"]})
            paths.update({f"int4 {i}": (lambda i=i: kernels.linear_int4(x, q4, s4, z4, None, n, group, isa=i))
                          for i in serving["int4"]})
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    times[name].append(timed(fn))
                if m <= 16:
                    for isa in reads:
                        reads[isa].append(probe.numel() / timed(lambda: kernels.read_probe(probe, Runtime(isa=isa)),
                                                                0.0, 1))
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append((n, k, m, qbytes, medians, times))
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return rows, {isa: statistics.median(v) for isa, v in reads.items() if v}


def best_torch(t: dict[str, float]) -> float:
    return min(t["F.linear bf16"], t.get("oneDNN bf16", float("inf")))


def ratio(rounds: dict[str, list[float]], name: str, over: str | None = None) -> float:
    """Median over rounds of (fastest torch bf16, or path ``over``) / ``name``, each round's
    pair measured side by side."""
    def base(r: int) -> float:
        return rounds[over][r] if over else best_torch({nm: v[r] for nm, v in rounds.items()})
    return statistics.median(base(r) / rounds[name][r] for r in range(len(rounds[name])))


def print_tables(rows: list, bw: dict[str, float], threads: int) -> None:
    band = max(bw.values()) if bw else float("nan")
    print(f"\n{threads} thread(s); read bandwidth " +
          ", ".join(f"{v / 1e9:.1f} GB/s with {isa} loads" for isa, v in bw.items()))
    names = [nm for nm in rows[0][4] if not nm.startswith(("int8", "int4"))]
    print(f"{'N x K':>11} {'M':>5} " + "".join(f"{nm:>16}" for nm in names) + "   ms (best torch bf16 / path)")
    for n, k, m, _, t, rounds in rows:
        cells = "".join(f"{t[nm] * 1e3:9.2f} {ratio(rounds, nm):5.2f}x" for nm in names)
        line = f"{n:>5}x{k:<5} {m:>5} {cells}"
        if m <= 16:
            line += "   %bw " + " ".join(f"{nm} {n * k * 2 / t[nm] / band * 100:.0f}%"
                                          for nm in names if not nm.startswith(("F.", "oneDNN")))
        print(line)
    quant = [nm for nm in rows[0][4] if nm.startswith(("int8", "int4"))]
    print("\nINT8 and INT4 weights (bf16 activations): ms, and time / auto bf16 time")
    print(f"{'N x K':>11} {'M':>5} " + "".join(f"{nm:>18}" for nm in quant))
    for n, k, m, qbytes, t, rounds in rows:
        line = f"{n:>5}x{k:<5} {m:>5} " + "".join(f"{t[nm] * 1e3:10.2f} {1 / ratio(rounds, nm, 'auto'):5.2f}x"
                                                  for nm in quant)
        if m <= 16:
            line += "   %bw " + " ".join(f"{nm} {qbytes[nm[:4]] / t[nm] / band * 100:.0f}%" for nm in quant)
        print(line)


def print_targets(rows: list, bw: dict[str, float], threads: int, emulated: bool) -> None:
    """The worst ratios of the auto path against issue 15's targets."""
    band = max(bw.values()) if bw else float("nan")
    ratios = [(ratio(rounds, "auto"), n, k, m) for n, k, m, _, t, rounds in rows]
    worst = min(ratios)
    m1 = [r for r in ratios if r[3] == 1]
    share = [(n * k * 2 / t["auto"] / band, n, k) for n, k, m, _, t, _ in rows if m == 1]
    print(f"\n{threads} thread(s), auto path: worst best-torch-bf16/auto {worst[0]:.2f} "
          f"({worst[1]}x{worst[2]} M={worst[3]}; target >= 0.95)")
    if m1:
        w1 = min(m1)
        ws = min(share)
        print(f"  M=1: worst ratio {w1[0]:.2f} ({w1[1]}x{w1[2]}; target >= 1.00), lowest share of read bandwidth "
              f"{ws[0] * 100:.0f}% ({ws[1]}x{ws[2]}; target >= 85%)")
    served = "int4 " + kernels.serving_isa("", "int4")  # timed only when --paths names it
    int4 = [(1 / ratio(rounds, served, "auto"), n, k, m)
            for n, k, m, _, t, rounds in rows if m in (1, 4, 16) and served in rounds]
    for rows_m in (1, 4, 16):
        picked = [r for r in int4 if r[3] == rows_m]
        if picked:
            w = max(picked)
            print(f"  INT4 (auto) M={rows_m}: worst int4 / auto bf16 time {w[0]:.2f} ({w[1]}x{w[2]})"
                  + ("; target <= 0.35" if rows_m == 1 else ""))
    if emulated:
        at256 = [(ratio(rounds, "auto", "F.linear fp32"), n, k) for n, k, m, _, t, rounds in rows if m == 256]
        if at256:
            w = min(at256)
            print(f"  torch emulates bf16 here: M=256 fp32 F.linear / auto worst {w[0]:.2f} ({w[1]}x{w[2]}; "
                  f"target >= 0.80)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K of each weight")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes over every path per shape")
    parser.add_argument("--paths", nargs="+", default=None,
                        help="forced ISAs to time beside auto (default: every one this CPU runs)")
    parser.add_argument("--quant-group-size", type=int, default=128,
                        help="input columns per INT8 / INT4 scale (0: one scale per output row)")
    args = parser.parse_args()
    isas = kernels.available_isas(Runtime())
    if not isas:
        sys.exit(f"the extension is not built here: {kernels.status(Runtime())[1]}")
    if args.paths:
        unknown = set(args.paths) - set(isas)
        if unknown:
            sys.exit(f"--paths {' '.join(sorted(unknown))}: this CPU runs only {', '.join(isas)}")
        isas = [i for i in isas if i in args.paths]
    name, flags = cpu_name_and_flags()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    emulated = not onednn_bf16()
    print(f"{name} ({' '.join(shown)}); torch {torch.__version__}, oneDNN bf16 "
          f"{'emulated' if emulated else 'native'}; autotp paths {', '.join(isas)}; auto = "
          f"{kernels.isa(Runtime())} (the table serving each call follows the shape: kernels.serving_isa)")
    for threads in args.threads:
        rows, bw = measure(args, isas, threads)
        print_tables(rows, bw, threads)
        print_targets(rows, bw, threads, emulated)


if __name__ == "__main__":
    main()
