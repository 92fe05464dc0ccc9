"""Mixture-of-experts blocks split two ways, timed side by side: ``experts="tensor"`` (every
expert cut like a dense MLP: each rank reads 1/N of every expert a token picks) against
``experts="expert"`` (whole experts per rank: a rank computes only the tokens routed to its
experts). Both variants live in each rank and are timed in alternation on a Mixtral-shaped
random model (8 experts, top-2), so machine noise hits them alike; rank 0 prints medians, the
ratio, and how evenly the routed tokens fell on the ranks.

    torchrun --nproc-per-node 2 tools/bench_moe.py [--layers 4] [--hidden 1024] [--prompt 32 256]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp
from bench_fusion import one_generation  # tools/ is the script's directory, on sys.path


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "mixtral", hidden_size=args.hidden, intermediate_size=int(args.hidden * 3.5), num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
        num_local_experts=args.experts, num_experts_per_tok=2, vocab_size=args.vocab, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def routed_share(model: torch.nn.Module, ids: torch.Tensor, world: int) -> list[float]:
    """Of the (token, expert) pairs the prompt routes in every layer, the share whose expert
    lives on each rank under expert parallelism (1/world each would be even)."""
    counts = [0] * world
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts") and hasattr(module, "num_experts"):
            per_rank = module.num_experts  # local count after sharding

            def count(m, args, per_rank=per_rank):
                for e in args[1].flatten().tolist():
                    counts[min(e // per_rank, world - 1)] += 1
            hooks.append(module.register_forward_pre_hook(count, prepend=True))  # before the remap
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    total = max(sum(counts), 1)
    return [c / total for c in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Mixtral-8x7B has 32)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size; experts 3.5x wide, heads of 128")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, nargs="+", default=[32, 256], help="prompt lengths to time")
    parser.add_argument("--steps", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="generations per variant, alternating")
    args = parser.parse_args()

    autotp.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    base = build(args)
    variants = {"tensor": autotp.shard(copy.deepcopy(base), world),
                "expert": autotp.shard(base, world, experts="expert")}
    rows = []
    for prompt in args.prompt:
        ids = torch.randint(3, args.vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
        first = {k: [] for k in variants}
        nexts = {k: [] for k in variants}
        for model in variants.values():  # warm-up, untimed
            one_generation(model, ids, 2)
        for _ in range(args.rounds):
            for name, model in variants.items():
                f, step_times = one_generation(model, ids, args.steps)
                first[name].append(f)
                nexts[name].extend(step_times)
        share = routed_share(variants["expert"], ids, world)
        rows.append((prompt, {k: statistics.median(v) for k, v in first.items()},
                     {k: statistics.median(v) for k, v in nexts.items()}, share))
    if rank == 0:
        params = sum(p.numel() for p in variants["tensor"].parameters()) * world / 1e9
        print(f"Mixtral-shaped random model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
              f"(top-2), ~{params:.2f} B params, bf16, {world} ranks x {torch.get_num_threads()} thread, "
              f"{args.rounds} x {args.steps} steps per variant, alternating")
        print(f"{'prompt':>6} {'split':<7} {'first token':>12} {'next token':>11}   prompt's routed pairs per rank")
        for prompt, first, nexts, share in rows:
            for name in variants:
                note = "/".join(f"{s:.0%}" for s in share) if name == "expert" else ""
                print(f"{prompt:>6} {name:<7} {first[name] * 1e3:>9.1f} ms {nexts[name] * 1e3:>8.2f} ms   {note}")
            print(f"{prompt:>6} ratio expert/tensor: first {first['expert'] / first['tensor']:.2f}, "
                  f"next {nexts['expert'] / nexts['tensor']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
