"""Accuracy of quantized weights on a model that has learned real text: held-out perplexity, max
relative logits error and top-1 agreement against the unquantized model, for bf16, INT8 and
INT4 at each group size, on 1, 2 and 3 ranks.

    python tools/train_tiny.py --out tiny-docs            # a few minutes: a small trained Llama
    python tools/quant_accuracy.py --model tiny-docs [--schemes bf16 int8:128 int4:32 int4:128]
                                   [--world-sizes 1 2 3] [--seq 128] [--eval-tokens 8192]

The held-out text (heldout.txt beside the model, written by train_tiny.py) is tokenized and cut
into windows of --seq tokens. The reference is plain transformers in --dtype on one process.
Each scheme (``bf16``: autotp unquantized; ``int8:G``, ``int4:G``, ``int4-asym:G``: weight-only
with G input columns per scale, 0 per row; ``int8a8:G``: INT8 whose native GEMM rounds the
activations to 8 bits, ``Runtime(int8_activations="int8")``) runs on N spawned ranks (gloo + the SHM all-reduce,
one thread each, ``autotp.from_pretrained(MODEL_DIR, quantize=...)``: each rank quantizes its
slices while loading), and rank 0's logits give: the perplexity of the held-out windows (exp of
the mean next-token loss), its change against the reference's, the max relative logits error
(max |q - ref| / max |ref|) and the share of positions whose top-1 token equals the reference's.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import autotp


def windows(model_dir: Path, seq: int, max_tokens: int) -> torch.Tensor:
    """[n, seq] token ids of the held-out text."""
    text = model_dir / "heldout.txt"
    if not text.is_file():
        raise SystemExit(f"{text} is missing: make the model with tools/train_tiny.py --out {model_dir}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.read_text(encoding="utf-8"))["input_ids"]
    n = min(len(ids), max_tokens) // seq
    return torch.tensor(ids[:n * seq]).view(n, seq)


def logits_of(model: torch.nn.Module, rows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=rows[i:i + batch]).logits.float() for i in range(0, len(rows), batch)])


def perplexity(logits: torch.Tensor, rows: torch.Tensor) -> float:
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    return math.exp(loss.item())


ACTIVATIONS = {"int8a8": ("int8", "int8")}  # scheme name -> (quantize, Runtime.int8_activations)


def _rank(rank: int, world: int, port: int, path: str, scheme: str | None, group: int, rows: torch.Tensor,
          out: str, dtype: torch.dtype) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    autotp.init_distributed()
    runtime = autotp.Runtime.from_env()
    if scheme in ACTIVATIONS:
        scheme, activations = ACTIVATIONS[scheme]
        runtime = runtime.replace(int8_activations=activations)
    model = autotp.from_pretrained(path, dtype=dtype, quantize=scheme,
                                   quant_group_size=group if scheme else None, runtime=runtime)
    got = logits_of(model, rows)
    if rank == 0:
        torch.save(got, out)
    torch.distributed.destroy_process_group()


def run(path: Path, scheme: str | None, group: int, world: int, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rank 0's logits of ``rows`` with ``scheme`` (None: unquantized) on ``world`` ranks."""
    out = path / f".logits-{scheme}-{group}-{world}.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, str(path), scheme, group, rows, str(out), dtype), nprocs=world, join=True)
    got = torch.load(out)
    out.unlink()
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a directory written by tools/train_tiny.py")
    parser.add_argument("--schemes", nargs="+", default=["bf16", "int8:128", "int4:32", "int4:128"],
                        help="bf16, or SCHEME:GROUP with SCHEME int8, int8a8, int4, int4-asym (GROUP 0: per row)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="activations and reference")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens evaluated")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = windows(args.model, args.seq, args.eval_tokens)
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    ref = logits_of(plain, rows)
    del plain
    base = perplexity(ref, rows)
    print(f"{args.model}: {rows.numel()} held-out tokens in {len(rows)} windows of {args.seq}; {args.dtype} "
          f"activations; reference (transformers, 1 process) perplexity {base:.3f}, logits std {ref.std():.2f}")
    print(f"{'weights':>10} {'group':>6} {'ranks':>5} {'perplexity':>11} {'vs reference':>13} "
          f"{'max rel logits err':>19} {'top-1 agreement':>16}")
    for spec in args.schemes:
        scheme, _, group = spec.partition(":")
        scheme = None if scheme == "bf16" else scheme
        g = int(group or 128)
        for world in args.world_sizes:
            got = run(args.model, scheme, g, world, rows, dtype)
            ppl = perplexity(got, rows)
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{scheme or args.dtype.replace('bfloat16', 'bf16'):>10} {(g or 'row') if scheme else '-':>6} "
                  f"{world:>5} {ppl:>11.3f} {(ppl / base - 1) * 100:>+12.2f}% {rel * 100:>18.2f}% "
                  f"{agree * 100:>15.1f}%", flush=True)


if __name__ == "__main__":
    main()
