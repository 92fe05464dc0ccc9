"""Accuracy of weight-only INT8 against the bf16 model it was made from, on a named random
shape (autotp.bench.shapes) or a checkpoint directory, on 1, 2 and 3 ranks.

    python tools/int8_accuracy.py [--model llama-1b] [--group 128 0] [--world-sizes 1 2 3]
                                  [--dtype bfloat16|float32] [--prompt 32] [--steps 32]

The bf16 model greedily extends a random prompt by --steps tokens. Each INT8 model (one per
group size and world size: autotp.from_pretrained(MODEL_DIR, quantize="int8") in each of N
spawned ranks, gloo + the SHM all-reduce, one thread each) reads that whole sequence once.
Printed per group size and world size: the max relative logits error (max |int8 - bf16| / max
|bf16|), the share of greedy steps on which INT8 picks the bf16 model's token (each step fed
the bf16 model's own sequence so far, so one difference does not make the rest differ), and
how far the logits are from the 1-rank INT8 model's (every rank holds exactly its slice of the
same quantized model; only the order of the sums differs). --dtype is the activations' (and
the reference's) dtype: in float32 the INT8 weights are the same (quantization reads the
weights in float32 either way) and the rank count changes the sums at float32's precision,
not bfloat16's.
"""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import autotp
from autotp.bench import shapes


def _rank(rank: int, world: int, port: int, path: str, group: int, seq: torch.Tensor, out: str,
          dtype: torch.dtype) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    autotp.init_distributed()
    model = autotp.from_pretrained(path, dtype=dtype, quantize="int8", quant_group_size=group)
    with torch.no_grad():
        logits = model(input_ids=seq).logits.float()
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


def int8_logits(path: Path, group: int, world: int, seq: torch.Tensor, work: Path, dtype: torch.dtype) -> torch.Tensor:
    """The INT8 model's logits on ``seq``, computed by ``world`` ranks."""
    out = work / f"int8-logits-g{group}-w{world}.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, str(path), group, seq, str(out), dtype), nprocs=world, join=True)
    logits = torch.load(out)
    out.unlink()
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="named shape or checkpoint directory")
    parser.add_argument("--group", type=int, nargs="+", default=[128, 0], help="group sizes (0: per row)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3], help="ranks to run INT8 on")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="activations and reference (the checkpoint is bf16)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    args = parser.parse_args()
    path, config = shapes.prepare(args.model, args.work_dir, torch.bfloat16, print)
    dtype = getattr(torch, args.dtype)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(100, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.steps, min_new_tokens=args.steps, pad_token_id=0)
        ref = plain(input_ids=seq).logits.float()
    del plain
    print(f"{args.model}, {args.dtype} activations: reference logits max |.| {ref.abs().max():.3f}, "
          f"std {ref.std():.3f}; "
          f"prompt {args.prompt}, {args.steps} greedy steps")
    print(f"{'group':>6} {'ranks':>5} {'max rel logits err':>19} {'greedy agreement':>17} "
          f"{'max |d| vs 1 rank':>18} {'argmax = 1 rank':>16}")
    steps = slice(-args.steps - 1, -1)
    for group in args.group:
        first = None
        for world in args.world_sizes:
            got = int8_logits(path, group, world, seq, args.work_dir, dtype)
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            agree = (ref[:, steps].argmax(-1) == got[:, steps].argmax(-1)).float().mean().item()
            first = got if first is None else first
            same = (got.argmax(-1) == first.argmax(-1)).float().mean().item()
            print(f"{group or 'row':>6} {world:>5} {rel * 100:>18.2f}% {agree * 100:>16.1f}% "
                  f"{(got - first).abs().max().item():>18.2e} {same * 100:>15.1f}%", flush=True)


if __name__ == "__main__":
    main()
