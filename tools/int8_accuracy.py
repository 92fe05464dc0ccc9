"""Accuracy of weight-only INT8 against the bf16 model it was made from, on a named random
shape (autotp.bench.shapes) or a checkpoint directory, in one process (world size 1: each rank
of a sharded run holds exactly its slice of this model, tests/test_quantize.py).

    python tools/int8_accuracy.py [--model llama-1b] [--group 128 0] [--prompt 32] [--steps 32]

Prints, per group size: the max relative logits error on a random prompt (max |int8 - bf16| /
max |bf16|) and the share of greedy steps on which INT8 picks the bf16 model's token, each step
fed the bf16 model's own sequence so far (so one difference does not make the rest differ).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import autotp
from autotp.bench import shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="named shape or checkpoint directory")
    parser.add_argument("--group", type=int, nargs="+", default=[128, 0], help="group sizes (0: per row)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    args = parser.parse_args()
    path, config = shapes.prepare(args.model, args.work_dir, torch.bfloat16, print)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(100, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.steps, min_new_tokens=args.steps, pad_token_id=0)
        ref = plain(input_ids=seq).logits.float()
    print(f"{args.model}: bf16 logits max |.| {ref.abs().max():.3f}, std {ref.std():.3f}; "
          f"prompt {args.prompt}, {args.steps} greedy steps")
    print(f"{'group':>6} {'max rel logits err':>19} {'greedy agreement':>17}")
    for group in args.group:
        model = autotp.shard(copy.deepcopy(plain), 1, quantize="int8", quant_group_size=group)
        with torch.no_grad():
            got = model(input_ids=seq).logits.float()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        picks = [t[:, -args.steps - 1:-1].argmax(-1) for t in (ref, got)]
        agree = (picks[0] == picks[1]).float().mean().item()
        print(f"{group or 'row':>6} {rel * 100:>18.2f}% {agree * 100:>16.1f}%")


if __name__ == "__main__":
    main()
