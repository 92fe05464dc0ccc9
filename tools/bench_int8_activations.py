"""The native INT8 GEMMs with int16 and with int8 activations (``Runtime.int8_activations``),
side by side, on every rank at once: what the 8-bit choice buys where it is taken.

As tools/bench_prefetch.py (whose pass it uses): a bench-shaped random model
(``autotp.bench.shapes``) is sharded with INT8 weights over the ranks torchrun starts; each round
every rank runs its share of one decoding step's GEMMs (each sharded Linear's local product,
the lm_head excluded, no collective) with int16 activations and then with int8 ones, all ranks
starting each pass together. Rank 0 prints each rank's median time per pass, the GB/s, the
median over rounds of int8 / int16 time (below 1.00: int8 is faster) and the largest
difference between the two outputs of the first layer relative to its largest output (the
price in accuracy; tools/quant_accuracy.py measures it on whole models). A CPU with
AVX512-VNNI multiplies 8-bit activations as bytes (twice the products per instruction); the
others compute the same integers as with int16 activations, at the same speed.

    autotp-run --nproc 2 --bind-cores tools/bench_int8_activations.py --model llama-1b [--rows 1 4 32]
    python tools/bench_int8_activations.py --model llama-test      # one rank
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import autotp
from autotp import kernels
from autotp.bench import shapes
from bench_prefetch import alternate, gather, local_gemms, start_ranks, one_pass

BITS = {"int16": 16, "int8": 8}


def set_activations(layers: list, bits: int) -> None:
    """Every layer's packed INT8 format switched to ``bits``-bit activations."""
    for layer in layers:
        layer.weight_format = dataclasses.replace(layer.weight_format, activation_bits=bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help=f"a bench shape: {', '.join(shapes.SHAPES)}")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32], help="activation rows per GEMM")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of (int16, int8) passes per row count")
    parser.add_argument("--isa", default="", help="kernel table to start from (default: the best this CPU runs)")
    args = parser.parse_args()

    world, rank = start_ranks("bench_int8_activations")
    runtime = autotp.Runtime.from_env()
    if args.isa:
        runtime = runtime.replace(isa=args.isa)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shapes.shape_config(args.model), dtype=torch.bfloat16).eval()
    model = autotp.shard(model, world, quantize="int8", runtime=runtime)
    layers = local_gemms(model)
    if not all(layer.packed for layer in layers):
        raise SystemExit("bench_int8_activations: the INT8 layers are not on the native kernels here")
    nbytes = sum(t.numel() * t.element_size() for layer in layers for t in layer.parameters())
    rows_out = []
    for m in args.rows:
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in {layer.in_features for layer in layers}}
        outs = {}
        for name, bits in BITS.items():
            set_activations(layers, bits)
            with torch.no_grad():
                outs[name] = layers[0].matmul(xs[layers[0].in_features], None).float()
            one_pass(layers, xs)  # warm-up
        error = ((outs["int8"] - outs["int16"]).abs().max() / outs["int16"].abs().max()).item()
        times = alternate(layers, xs, world, args.rounds,
                          {name: functools.partial(set_activations, layers, bits) for name, bits in BITS.items()})
        ratio = statistics.median(b / a for a, b in zip(times["int16"], times["int8"]))
        row = (m, nbytes, statistics.median(times["int16"]), statistics.median(times["int8"]), ratio, error)
        rows_out.append(gather(row, world))
    set_activations(layers, BITS[runtime.int8_activations])
    if rank == 0:
        print(f"{args.model}, {world} rank(s) x {torch.get_num_threads()} thread(s), INT8 on "
              f"{kernels.serving_isa(kernels.isa(runtime), 'int8', torch.bfloat16, 1)}; {args.rounds} rounds")
        print(f"{'rows':>4} {'rank':>4} {'MB':>7} {'int16 ms':>9} {'GB/s':>6} {'int8 ms':>8} {'GB/s':>6} "
              f"{'int8 / int16':>12} {'max diff':>9}")
        for gathered in rows_out:
            for r, (m, nb, a, b, ratio, error) in enumerate(gathered):
                print(f"{m:>4} {r:>4} {nb / 1e6:>7.0f} {a * 1e3:>9.2f} {nb / a / 1e9:>6.1f} {b * 1e3:>8.2f} "
                      f"{nb / b / 1e9:>6.1f} {ratio:>12.3f} {error:>9.2e}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
