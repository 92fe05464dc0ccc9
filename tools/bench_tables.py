"""One decoding step's GEMMs on two kernel tables side by side, and the read probe over the same
weights: how far each table's tiles stand from the memory they stream, on every rank at once.

A bench-shaped random model (``autotp.bench.shapes``) is sharded over the ranks torchrun starts
(bf16, INT8 or INT4 weights, on huge pages as ``autotp.shard`` places them); then each round
every rank runs its share of one step's GEMMs (each sharded Linear's local product, the lm_head
excluded, no collective) on table A, on table B, and reads the same weight bytes once with
``autotp.kernels.read_probe``, all ranks starting each pass together (a barrier). Rank 0 prints
per rank the median pass times, each table's median over rounds of time / the probe's (1.00:
the GEMMs stream at the read bandwidth) and of B / A (above 1.00: A is faster). The VM's
bandwidth moves within minutes; only ratios from the same rounds are firm.

    autotp-run --nproc 2 --bind-cores tools/bench_tables.py --model llama-1b --kinds int8 --isas amx avx512_vnni
    python tools/bench_tables.py --model llama-test --isas avx2 generic      # one rank
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

import autotp
from autotp import kernels
from autotp.bench import shapes
from autotp.kernels import pages
from bench_prefetch import alternate, gather, sharded_gemms, start_ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help=f"a bench shape: {', '.join(shapes.SHAPES)}")
    parser.add_argument("--kinds", nargs="+", default=["int8"], choices=["bf16", "int8", "int4"],
                        help="weight formats to measure (each shards the model once)")
    parser.add_argument("--isas", nargs=2, required=True, metavar=("A", "B"),
                        help="the two kernel tables to start from (autotp.kernels.available_isas)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="activation rows per GEMM")
    parser.add_argument("--bits", type=int, default=16, choices=[16, 8], help="INT8's activation bits")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of (A, B, probe) passes per kind and rows")
    args = parser.parse_args()

    world, rank = start_ranks("bench_tables")
    have = kernels.available_isas()
    for name in args.isas:
        if name not in have:
            raise SystemExit(f"bench_tables: this CPU does not run the {name} kernels (it runs {', '.join(have)})")
    runtime = autotp.Runtime.from_env().replace(isa=args.isas[0],
                                                int8_activations="int8" if args.bits == 8 else "int16")
    rows_out = []
    for kind in args.kinds:
        layers = sharded_gemms("bench_tables", args.model, kind, world, runtime)
        weights = [t for layer in layers for t in layer.parameters()]
        nbytes = sum(t.numel() * t.element_size() for t in weights)
        formats = {name: [dataclasses.replace(layer.weight_format, isa=name) for layer in layers]
                   for name in args.isas}

        def use(name: str) -> None:
            for layer, fmt in zip(layers, formats[name]):
                layer.weight_format = fmt

        raw = pages.empty(nbytes)  # the benchmark's floor reads one such buffer
        arena = (raw if raw is not None else torch.empty(nbytes, dtype=torch.uint8)).fill_(1)
        on_huge = sum(t.numel() * t.element_size() for t in weights if pages.huge_bytes(t) > 0) / nbytes

        def probe() -> None:
            for t in weights:
                kernels.read_probe(t)

        for m in args.rows:
            xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in {layer.in_features for layer in layers}}
            for name in args.isas:
                use(name)
                with torch.no_grad():
                    for layer in layers:
                        layer.matmul(xs[layer.in_features], None)  # warm-up
            settings = {name: (lambda name=name: use(name)) for name in args.isas}
            times = alternate(layers, xs, world, args.rounds, settings)
            probe_times, arena_times = [], []
            for _ in range(args.rounds):  # the probes, interleaved with more rounds of the two
                for read, out in ((probe, probe_times), (lambda: kernels.read_probe(arena), arena_times)):
                    if world > 1:
                        dist.barrier()
                    start = time.perf_counter()
                    read()
                    out.append(time.perf_counter() - start)
                more = alternate(layers, xs, world, 1, settings)
                for name in args.isas:
                    times[name] += more[name]
            a, b = args.isas
            n = len(probe_times)
            ratio = lambda name: statistics.median(t / p for t, p in zip(times[name][-n:], probe_times))
            row = (kind, m, nbytes, statistics.median(times[a]), statistics.median(times[b]),
                   statistics.median(probe_times), statistics.median(arena_times), on_huge, ratio(a), ratio(b),
                   statistics.median(y / x for x, y in zip(times[a], times[b])))
            rows_out.append(gather(row, world))
        del layers, weights, formats, arena, raw
    if rank == 0:
        a, b = args.isas
        print(f"{args.model}, {world} rank(s) x {torch.get_num_threads()} thread(s), A = {a}, B = {b}"
              f"{', 8-bit activations' if args.bits == 8 else ''}; {args.rounds} rounds (+ as many with the probe)")
        print("probe: read_probe over the weights themselves; arena: over one huge-page buffer of their size "
              "(the benchmark's floor); huge: the share of weight bytes on huge pages")
        print(f"{'weights':<8} {'rows':>4} {'rank':>4} {'MB':>6} {'huge':>5} {'A ms':>8} {'B ms':>8} {'probe ms':>9} "
              f"{'arena ms':>9} {'A/probe':>8} {'B/probe':>8} {'B / A':>6}")
        for gathered in rows_out:
            for r, (kind, m, nbytes, ta, tb, tp, tr, huge, ra, rb, ba) in enumerate(gathered):
                print(f"{kind:<8} {m:>4} {r:>4} {nbytes / 1e6:>6.0f} {huge:>5.2f} {ta * 1e3:>8.2f} {tb * 1e3:>8.2f} "
                      f"{tp * 1e3:>9.2f} {tr * 1e3:>9.2f} {ra:>8.3f} {rb:>8.3f} {ba:>6.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
