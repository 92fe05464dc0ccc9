"""Next-token and first-token latency of a random bf16 Llama (~1.1 B parameters, TinyLlama's
shape) on N ranks, with the parallel layers on autotp's native kernels and on torch's
(F.linear). Both variants live in each rank and are timed in alternation, so machine noise hits
them alike; rank 0 prints medians and their ratio.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/bench_native.py [--layers 22] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp
from autotp import kernels
from bench_fusion import alternate


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=4, vocab_size=args.vocab,
        max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def shard_with(model: torch.nn.Module, world: int, side: str) -> torch.nn.Module:
    return autotp.shard(model, world, runtime=autotp.Runtime.from_env().replace(kernels=side))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="generations per variant, alternating")
    args = parser.parse_args()

    autotp.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = build(args)
    params = sum(p.numel() for p in base.parameters())
    variants = {"torch": shard_with(copy.deepcopy(base), world, "torch"),
                "native": shard_with(base, world, "native")}
    del base
    packed = sum(getattr(m, "packed", False) for m in variants["native"].modules())
    backend = next(m.group.backend for m in variants["native"].modules() if hasattr(m, "group"))
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {k: m(input_ids=ids).logits.float() for k, m in variants.items()}
    first, nexts = alternate(variants, ids, args.rounds, args.steps)
    if rank == 0:
        diff = (logits["native"] - logits["torch"]).abs().max().item()
        print(f"random Llama: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
              f"{params / 1e9:.2f} B params, bf16, {world} ranks x {torch.get_num_threads()} thread(s), "
              f"prompt {args.prompt}, {args.rounds} x {args.steps} steps per variant; native: "
              f"{kernels.status()[1]}, {packed} packed layers per rank; all-reduce: {backend}")
        print(f"{'kernels':<8} {'next token (median)':>20} {'first token (median)':>21}")
        for name in variants:
            print(f"{name:<8} {statistics.median(nexts[name]) * 1e3:>17.2f} ms "
                  f"{statistics.median(first[name]) * 1e3:>18.2f} ms")
        n_ratio = statistics.median(nexts["torch"]) / statistics.median(nexts["native"])
        f_ratio = statistics.median(first["torch"]) / statistics.median(first["native"])
        print(f"torch / native: next token {n_ratio:.2f}x, first token {f_ratio:.2f}x; "
              f"max |logits native - torch| {diff:.3f} (logits std {logits['torch'].std():.2f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
