"""Next-token latency with and without the fused attention+MLP all-reduce, on a GPT-J-shaped
random model. Both variants live in each rank and are timed in alternation, so machine noise
hits them alike; medians and their ratio are printed by rank 0.

    torchrun --nproc-per-node 2 tools/bench_fusion.py [--layers 8] [--hidden 2048]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import autotp
from autotp.comm.group import TPGroup
from autotp.sharding.decode import cache_keyword, returned_cache


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "gptj", n_embd=args.hidden, n_head=args.hidden // 128, n_layer=args.layers, n_inner=4 * args.hidden,
        rotary_dim=64, vocab_size=args.vocab, n_positions=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def one_generation(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """(first-token seconds, next-token seconds per step) for one greedy generation."""
    dist.barrier()
    with torch.no_grad():
        start = time.perf_counter()
        key = cache_keyword(model)
        out = model(input_ids=ids, **{key: DynamicCache()}, use_cache=True)
        first = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        steps_s = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, **{key: returned_cache(out)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps_s.append(time.perf_counter() - start)
    return first, steps_s


def alternate(variants: dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int,
              steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each variant up, then time ``rounds`` generations of each in alternation (so noise
    hits all alike). Returns (first-token seconds, next-token seconds) per variant."""
    first: dict[str, list[float]] = {k: [] for k in variants}
    nexts: dict[str, list[float]] = {k: [] for k in variants}
    for model in variants.values():  # warm-up, untimed
        one_generation(model, ids, 4)
    for _ in range(rounds):
        for name, model in variants.items():
            f, step_times = one_generation(model, ids, steps)
            first[name].append(f)
            nexts[name].extend(step_times)
    return first, nexts


def allreduce_latency(hidden: int, repeats: int = 200) -> float:
    """Median seconds of one gloo all-reduce of one token's hidden state (bf16), through a TPGroup
    (which holds the tensor until gloo's worker lets go of it: a plain dist.all_reduce here made a
    rank abort at exit now and then, "terminate called without an active exception")."""
    group = TPGroup.from_torch(dist.get_world_size(), runtime=autotp.Runtime.from_env().replace(comm="torch"))
    x = torch.randn(1, 1, hidden, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        group.all_reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (GPT-J-6B has 28)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size; heads of 128")
    parser.add_argument("--vocab", type=int, default=50400)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="generations per variant, alternating")
    args = parser.parse_args()

    autotp.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    base = build(args)
    variants = {"fused": autotp.shard(copy.deepcopy(base), world),
                "unfused": autotp.shard(base, world, fuse_allreduce=False)}
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    first, nexts = alternate(variants, ids, args.rounds, args.steps)
    ar = allreduce_latency(args.hidden)
    if rank == 0:
        params = sum(p.numel() for p in variants["fused"].parameters()) * world / 1e9
        print(f"GPT-J-shaped random model: {args.layers} layers, hidden {args.hidden}, ~{params:.2f} B params, "
              f"bf16, {world} ranks x {torch.get_num_threads()} thread, prompt {args.prompt}, "
              f"{args.rounds} x {args.steps} steps per variant")
        print(f"{'variant':<9} {'all-reduces/token':>18} {'next token (median)':>20} {'first token (median)':>21}")
        for name in variants:
            per_token = (1 if name == "fused" else 2) * args.layers + 1
            print(f"{name:<9} {per_token:>18} {statistics.median(nexts[name]) * 1e3:>17.2f} ms "
                  f"{statistics.median(first[name]) * 1e3:>18.2f} ms")
        ratio = statistics.median(nexts["unfused"]) / statistics.median(nexts["fused"])
        print(f"next-token ratio unfused / fused: {ratio:.3f}  "
              f"(one gloo all-reduce of a {args.hidden}-wide bf16 token: {ar * 1e6:.0f} us median)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
