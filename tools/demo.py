"""The demo: shard a small random Llama over the ranks of this torchrun job and show that it
answers exactly like the unsharded model.

    torchrun --nproc-per-node 2 tools/demo.py        (or: make demo)

Every rank builds the same random model (same seed), computes the unsharded answer, shards the
model with autotp.shard and answers again. Rank 0 prints the plan and both token sequences.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp


def build_model(layers: int) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def generate(model: torch.nn.Module, inputs: dict, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random Llama")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    args = parser.parse_args()

    autotp.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_model(args.layers)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # the second prompt is shorter: left padding
    inputs = {"input_ids": ids, "attention_mask": mask}

    with torch.no_grad():
        ref_logits = model(**inputs).logits
    reference = generate(model, inputs, args.new_tokens)
    if rank == 0:
        print(autotp.plan(model, world_size), flush=True)
    autotp.shard(model, world_size)
    with torch.no_grad():
        diff = (model(**inputs).logits - ref_logits).abs().max().item()
    sharded = generate(model, inputs, args.new_tokens)

    same = torch.tensor([int(torch.equal(sharded, reference))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        prompt = ids.shape[1]
        print(f"\nunsharded model, 1 process : {reference[:, prompt:].tolist()}")
        print(f"sharded over {world_size} ranks       : {sharded[:, prompt:].tolist()}")
        print(f"max |logits difference| on rank 0: {diff:.2e}")
        print("MATCH: every rank generated the same tokens as the unsharded model" if same.item()
              else "MISMATCH: the sharded model generated different tokens")
    dist.destroy_process_group()
    if not same.item():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
