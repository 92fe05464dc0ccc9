"""autotp's decode attention over one rank's KV cache, read from memory, side by side.

    python tools/bench_attention.py [--model llama-1b gptj-1b] [--world 2] [--beams 4]
                                    [--length 288] [--isa auto avx2] [--rounds 20]

For each bench shape (autotp.bench.shapes) one rank's static cache is built as a decoding step
reads it: every layer's keys and values, [beams, the rank's KV heads, length, head dim] bf16,
and each layer's attention op (``autotp::decode_attention``, one query position, the query
heads of a KV head together) runs over all layers as a step does. The cache is held twice, on
4 KiB pages (what a plain allocation gets where the THP mode is ``madvise``) and on transparent
huge pages (autotp.kernels.pages), and before each timed pass 256 MB are written, so the cache
comes from memory. Passes alternate between the two copies and the ISAs asked for, with
autotp's read probe between them (one thread). Prints the cache bytes over the median time in
GB/s, and the share of the probe's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pages import on_small_pages  # noqa: E402

from autotp import kernels  # noqa: E402
from autotp.bench import shapes  # noqa: E402
from autotp.kernels import pages  # noqa: E402

PROBE_BYTES = 256 << 20


def rank_cache(model: str, world: int, beams: int, length: int) -> tuple[list, int, int, int]:
    """(layers of (keys, values), KV heads, query heads per KV head, head dim) of one rank."""
    config = shapes.shape_config(model).get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if kv_heads % world:
        raise SystemExit(f"bench_attention: {model} has {kv_heads} KV heads, not a multiple of --world {world}")
    gen = torch.Generator().manual_seed(0)
    shape = (beams, kv_heads // world, length, dim)
    layers = [tuple(torch.randn(shape, generator=gen).bfloat16() for _ in range(2))
              for _ in range(config.num_hidden_layers)]
    return layers, kv_heads // world, heads // kv_heads, dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama-1b", "gptj-1b"], help="bench shapes")
    parser.add_argument("--world", type=int, default=2, help="ranks the KV heads are split over")
    parser.add_argument("--beams", type=int, default=4, help="rows of the cache (beams x prompts)")
    parser.add_argument("--length", type=int, default=288, help="cached positions")
    parser.add_argument("--isa", nargs="+", default=["auto"], help="kernel paths (auto: the CPU's best)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not kernels.extension_loaded():
        raise SystemExit("bench_attention: the autotp extension did not build (see AUTOTP_VERBOSE_BUILD=1)")
    isas = [kernels.isa() if isa == "auto" else isa for isa in args.isa]
    flush = torch.empty(256 << 20, dtype=torch.uint8)
    probe = pages.empty(PROBE_BYTES)
    probe = torch.ones(PROBE_BYTES, dtype=torch.uint8) if probe is None else probe.fill_(1)
    print(f"one thread; cache of {args.beams} rows x {args.length} positions per layer, 1 of {args.world} ranks")
    print(f"{'model':10} {'isa':12} {'pages':6} {'MB':>7} {'ms':>7} {'GB/s':>6} {'of probe':>8}")
    for model in args.model:
        layers, kv_heads, group, dim = rank_cache(model, args.world, args.beams, args.length)
        copies = {"4k": [tuple(on_small_pages(t) for t in kv) for kv in layers]}
        huge = [tuple(pages.copy_to_huge_pages(t) for t in kv) for kv in layers]
        if all(t is not None for kv in huge for t in kv):
            copies["huge"] = huge
        # a bf16 model's query: bf16 values, which the op takes as float32 (AVX512-BF16 scores such
        # a query of several heads per KV head with vdpbf16ps)
        q = torch.randn(args.beams, kv_heads, group, dim, generator=torch.Generator().manual_seed(1)).bfloat16().float()
        nbytes = sum(t.numel() * t.element_size() for kv in layers for t in kv)
        times = {(isa, where): [] for isa in isas for where in copies}
        probe_times = []
        for _ in range(args.rounds):
            for isa, where in times:
                flush.add_(1)
                start = time.perf_counter()
                for k, v in copies[where]:
                    torch.ops.autotp.decode_attention(q, k, v, None, dim ** -0.5, isa)
                times[isa, where].append(time.perf_counter() - start)
            start = time.perf_counter()
            kernels.read_probe(probe)
            probe_times.append(time.perf_counter() - start)
        probe_rate = PROBE_BYTES / statistics.median(probe_times)
        for (isa, where), ts in times.items():
            t = statistics.median(ts)
            # three significant digits: a tiny shape's few microseconds, or a stalled pass's rate,
            # must not print as 0
            print(f"{model:10} {isa:12} {where:6} {nbytes / 1e6:7.2f} {t * 1e3:7.3g} {nbytes / t / 1e9:6.3g} "
                  f"{nbytes / t / probe_rate:8.1%}")
        print(f"{model:10} read probe {probe_rate / 1e9:.1f} GB/s (KV heads {kv_heads}, {group} query heads each, "
              f"head dim {dim})")


if __name__ == "__main__":
    main()
