"""Decoding with sibling layers merged (``Runtime.merge_siblings``, the default) against each
layer alone, side by side: the same bench-shaped random model sharded twice in one process per
rank, generate runs alternating between the two, every rank at once.

Each round runs ``generate`` once on each model (their order alternating round by round) and
times the first token and the mean next token (a logits processor's clock, as autotp-bench
does). Rank 0 prints the medians, the median of the per-round ratios (merged / alone, below 1:
merging is faster) and whether both gave the same tokens. The VM's bandwidth moves within
minutes; only ratios from the same rounds are firm.

    autotp-run --nproc 2 --bind-cores tools/bench_siblings.py --model llama-1b --quantize int8 --prompt 256
    python tools/bench_siblings.py --model llama-test --eager --rounds 2        # one rank
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LogitsProcessorList

import autotp
from autotp.bench import shapes
from autotp.bench.worker import StepClock, case_ids, exact_length
from autotp.sharding.layers import ColumnParallelLinear
from bench_prefetch import start_ranks


def generate_once(model, ids: torch.Tensor, beams: int, new_tokens: int, world: int
                  ) -> tuple[float, float, torch.Tensor]:
    """(first-token seconds, mean next-token seconds, tokens) of one generate."""
    clock = StepClock()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             logits_processor=LogitsProcessorList([clock]), **exact_length(model, beams, new_tokens))
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return clock.stamps[0] - start, statistics.fmean(steps) if steps else float("nan"), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help=f"a bench shape: {', '.join(shapes.SHAPES)}")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weights (default: bf16)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--beams", type=int, default=1, help="beam search over this many beams (1: greedy)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (alone, merged) runs")
    parser.add_argument("--eager", action="store_true", help="decode eagerly (default: the compiled step)")
    args = parser.parse_args()

    world, rank = start_ranks("bench_siblings")
    models, groups = {}, {}
    for merge in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shapes.shape_config(args.model), dtype=torch.bfloat16).eval()
        runtime = autotp.Runtime.from_env().replace(merge_siblings=merge, compile=not args.eager)
        models[merge] = autotp.shard(model, world, quantize=args.quantize, runtime=runtime)
        groups[merge] = len({id(m.siblings) for m in models[merge].modules()
                             if isinstance(m, ColumnParallelLinear) and m.siblings is not None})
    if groups[True] == 0:
        raise SystemExit("bench_siblings: no layers were merged (are the weights on the native kernels here?)")
    ids = case_ids(models[False].config.vocab_size, 1, args.prompt)
    tokens = {}
    for merge, model in models.items():  # warm-up (a compiled step compiles here)
        tokens[merge] = generate_once(model, ids, args.beams, args.new_tokens, world)[2]
    first: dict[bool, list[float]] = {False: [], True: []}
    step: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for merge in (False, True) if r % 2 == 0 else (True, False):
            f, s, _ = generate_once(models[merge], ids, args.beams, args.new_tokens, world)
            first[merge].append(f)
            step[merge].append(s)
    if rank == 0:
        kind = args.quantize or "bf16"
        how = "eager" if args.eager else "compiled"
        print(f"{args.model} {kind}, {world} rank(s) x {torch.get_num_threads()} thread(s), {how}, prompt "
              f"{args.prompt}, beams {args.beams}, {args.new_tokens} tokens, {args.rounds} rounds; "
              f"{groups[True]} groups merged")
        print(f"{'':<8} {'next ms':>9} {'first ms':>9}")
        for merge, label in ((False, "alone"), (True, "merged")):
            print(f"{label:<8} {statistics.median(step[merge]) * 1e3:>9.2f} {statistics.median(first[merge]) * 1e3:>9.1f}")
        ratio_next = statistics.median(m / a for a, m in zip(step[False], step[True]))
        ratio_first = statistics.median(m / a for a, m in zip(first[False], first[True]))
        print(f"merged / alone: next {ratio_next:.3f}, first {ratio_first:.3f}")
        print(f"same tokens: {torch.equal(tokens[False], tokens[True])}")
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
