"""The native GEMMs with the weights' software prefetch on and off, side by side, on every rank
at once: the measurement behind the per-CPU default of ``autotp.kernels.weight_prefetch``.

A bench-shaped random model (``autotp.bench.shapes``) is sharded over the ranks torchrun starts
(bf16, INT8 or INT4 weights, on huge pages as ``autotp.shard`` places them); then each round,
with the prefetch on and then off, every rank runs its share of one decoding step's GEMMs
(each sharded Linear's local product, the lm_head excluded, no collective) over 1 and 4
activation rows, all ranks starting each pass together (a barrier), as they stream their
weights in a real step. Rank 0 prints each rank's median time per pass, the GB/s, and the
median over rounds of off / on time (below 1.00: off is faster). The switch reaches only the
tiles that stream (``autotp.kernels.weight_prefetch``): INT4's and those of more than 2 rows
(bar AVX512-BF16's bf16 tile) always prefetch, so their rows show it doing nothing (off / on
near 1.00, up to the machine's noise).
``--isa`` forces a lower kernel table (AUTOTP_ISA), to measure its tiles too; ``--ahead`` times
the prefetch at several distances (``autotp.kernels.weight_prefetch_pairs``, K pairs of packed
weight; the AVX2 and AVX-512 tiles), each against off.

    autotp-run --nproc 2 --bind-cores tools/bench_prefetch.py --model llama-1b [--kinds bf16 int8 int4] [--isa avx2] [--ahead 4 8 16]
    python tools/bench_prefetch.py --model llama-test      # one rank
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import autotp
from autotp import kernels
from autotp.bench import shapes
from autotp.sharding.layers import PackableLinear, VocabParallelLMHead


def local_gemms(model: torch.nn.Module) -> list[PackableLinear]:
    """The sharded Linear layers of ``model`` in module order, the lm_head left out."""
    return [m for m in model.modules() if isinstance(m, PackableLinear) and not isinstance(m, VocabParallelLMHead)]


def one_pass(layers: list[PackableLinear], xs: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.matmul(xs[layer.in_features], None)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def alternate(layers: list, xs: dict[int, torch.Tensor], world: int, rounds: int,
              settings: dict[Any, Callable[[], Any]]) -> dict[Any, list[float]]:
    """``rounds`` rounds of one pass under each of ``settings`` (a key and what switches to it),
    in turn, all ranks starting each pass together: each key's pass times."""
    times: dict[Any, list[float]] = {key: [] for key in settings}
    for _ in range(rounds):
        for key, switch in settings.items():
            switch()
            barrier(world)
            start = time.perf_counter()
            one_pass(layers, xs)
            times[key].append(time.perf_counter() - start)
    return times


def gather(row: tuple, world: int) -> list[tuple]:
    """Every rank's ``row``, in rank order (for rank 0 to print)."""
    gathered = [row] * world
    if world > 1:
        dist.all_gather_object(gathered, row)
    return gathered


def start_ranks(tool: str) -> tuple[int, int]:
    """(world size, this rank): joins the ranks torchrun started (one rank without it), and
    stops with a message naming ``tool`` where the native kernels are not built."""
    if "WORLD_SIZE" in os.environ:
        autotp.init_distributed()
    if not kernels.extension_loaded():
        raise SystemExit(f"{tool}: the native kernels are not built here; nothing to measure")
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def sharded_gemms(tool: str, model_name: str, kind: str, world: int, runtime: autotp.Runtime) -> list[PackableLinear]:
    """A bench-shaped random model (seed 0) sharded over ``world`` ranks with ``kind`` weights
    ("bf16", "int8", "int4"): its sharded Linear layers, lm_head left out; stops (naming
    ``tool``) where they are not on the native kernels."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shapes.shape_config(model_name), dtype=torch.bfloat16).eval()
    model = autotp.shard(model, world, quantize=None if kind == "bf16" else kind, runtime=runtime)
    layers = local_gemms(model)
    if not all(layer.packed for layer in layers):
        raise SystemExit(f"{tool}: {kind} layers are not on the native kernels here")
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help=f"a bench shape: {', '.join(shapes.SHAPES)}")
    parser.add_argument("--kinds", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8", "int4"],
                        help="weight formats to measure (each shards the model once)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="activation rows per GEMM")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of (on at each distance, off) passes per kind and rows")
    parser.add_argument("--isa", default="", help="kernel table to start from (default: the best this CPU runs)")
    parser.add_argument("--ahead", type=int, nargs="+", default=None, metavar="PAIRS",
                        help="prefetch distances to time with the prefetch on, in K pairs of packed weight "
                             "(autotp.kernels.weight_prefetch_pairs; default: this CPU's own)")
    args = parser.parse_args()

    world, rank = start_ranks("bench_prefetch")
    default, default_pairs = kernels.weight_prefetch(), kernels.weight_prefetch_pairs()
    aheads = args.ahead or [default_pairs]
    runtime = autotp.Runtime.from_env()
    if args.isa:
        runtime = runtime.replace(isa=args.isa)

    def switch(pairs: int | None) -> None:  # None: off
        kernels.weight_prefetch(pairs is not None)
        kernels.weight_prefetch_pairs(default_pairs if pairs is None else pairs)

    rows_out = []
    for kind in args.kinds:
        layers = sharded_gemms("bench_prefetch", args.model, kind, world, runtime)
        nbytes = sum(t.numel() * t.element_size() for layer in layers for t in layer.parameters())
        for m in args.rows:
            xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in {layer.in_features for layer in layers}}
            one_pass(layers, xs)  # warm-up
            times = alternate(layers, xs, world, args.rounds,
                              {pairs: functools.partial(switch, pairs) for pairs in [*aheads, None]})
            kernels.weight_prefetch(default)
            kernels.weight_prefetch_pairs(default_pairs)
            ons = [(statistics.median(times[d]), statistics.median(off / on for on, off in zip(times[d], times[None])))
                   for d in aheads]
            rows_out.append(gather((kind, m, nbytes, statistics.median(times[None]), ons), world))
        del layers
    if rank == 0:
        print(f"{args.model}, {world} rank(s) x {torch.get_num_threads()} thread(s), ISA {kernels.isa(runtime)}, "
              f"default prefetch here: {'on' if default else 'off'}, {default_pairs} pairs ahead; {args.rounds} rounds")
        heads = "".join(f" {f'on {d} ms':>10} {'GB/s':>6} {'off / on':>9}" for d in aheads)
        print(f"{'weights':<8} {'rows':>4} {'rank':>4} {'MB':>7} {'off ms':>8} {'GB/s':>6}{heads}")
        for gathered in rows_out:
            for r, (kind, m, nbytes, off, ons) in enumerate(gathered):
                cells = "".join(f" {on * 1e3:>10.2f} {nbytes / on / 1e9:>6.1f} {ratio:>9.3f}" for on, ratio in ons)
                print(f"{kind:<8} {m:>4} {r:>4} {nbytes / 1e6:>7.0f} {off * 1e3:>8.2f} {nbytes / off / 1e9:>6.1f}{cells}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
