"""autotp-generate: text from a checkpoint on one rank or N, from one command.

    autotp-generate -m MODEL_DIR --prompt "Once upon a time" [--max-new-tokens 32]
    autotp-run --nproc 2 --bind-cores -m autotp.generate -m MODEL_DIR --prompt "..." --streaming
    autotp-run --nproc 2 --bind-cores -m autotp.generate -m MODEL_DIR --input-tokens 32 \\
        --token-latency --num-iter 5 --num-warmup 1 --json

MODEL_DIR is a Hugging Face checkpoint directory (each rank reads its slice) or one written by
create_shard_model for this many ranks; its tokenizer files come with it. Rank 0 prints; the
other ranks print nothing. Every rank computes the same tokens: each step's scores are rank
0's (broadcast before a token is chosen), and sampling draws from the same seeded generator.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer, LogitsProcessor, LogitsProcessorList, TextStreamer

from autotp.bench.worker import StepClock, pad_id
from autotp.checkpoint.format import MANIFEST
from autotp.checkpoint.loader import from_pretrained
from autotp.comm.group import init_distributed
from autotp.plan import CheckpointError, ShardingError
from autotp.runtime import Runtime, launched_world
from autotp.sharding.quantize import SCHEMES

DTYPES = ["bfloat16", "float32", "float16"]
# the files a tokenizer can be built from (any one set): fast JSON, sentencepiece, BPE, WordPiece
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt"]


class UsageError(Exception):
    """A request autotp-generate refuses before loading anything (exit code 2)."""


class SameScores(LogitsProcessor):
    """Makes every rank choose from rank 0's scores. The sharded logits agree across ranks up
    to the order of sums; broadcasting them makes greedy, beam and sampled choices identical."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.contiguous()
        dist.broadcast(scores, src=0)
        return scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotp-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                   help="Hugging Face checkpoint directory, or one written by create_shard_model")
    p.add_argument("--dtype", choices=DTYPES, help="weights and activations (default: the checkpoint's; a "
                                                   "pre-sharded one only loads in the dtype it was written in)")
    p.add_argument("--quantize", choices=SCHEMES, help="weight-only quantization while loading a Hugging Face "
                                                      "directory (a pre-sharded one keeps what it was written with)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="one prompt per line: a batch")
    src.add_argument("--input-tokens", type=int, metavar="N", help="a synthetic prompt of N token ids")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    search = p.add_mutually_exclusive_group()
    search.add_argument("--greedy", action="store_true", help="greedy search (the default)")
    search.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam search of K beams")
    p.add_argument("--sample", action="store_true", help="sample instead of searching (implied by --temperature "
                                                         "and --top-p)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest set of tokens of this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator, the same on every rank")
    p.add_argument("--streaming", action="store_true", help="rank 0 prints tokens as they are generated "
                                                            "(one prompt, greedy or sampling)")
    p.add_argument("--token-latency", action="store_true", help="time first and next tokens over --num-iter runs, each exactly --max-new-tokens long "
                        "(the end-of-sequence token ignored)")
    p.add_argument("--num-iter", type=int, default=3, metavar="N", help="timed runs with --token-latency (default 3)")
    p.add_argument("--num-warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (the last line)")
    return p


def check_request(args: argparse.Namespace) -> None:
    """Refuse what cannot work, before any rank loads a weight (every rank refuses alike)."""
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.num_beams < 1 or (args.input_tokens is not None and args.input_tokens < 1):
        raise UsageError("--num-beams and --input-tokens must be at least 1")
    sampling = args.sample or args.temperature is not None or args.top_p is not None
    if sampling and args.num_beams > 1:
        raise UsageError("sampling (--sample, --temperature, --top-p) and --num-beams > 1 do not combine here")
    if args.streaming and args.num_beams > 1:
        raise UsageError("--streaming prints one sequence as it grows: use it with greedy search or sampling")
    if args.num_iter < 1 or args.num_warmup < 0:
        raise UsageError("--num-iter must be at least 1 and --num-warmup at least 0")
    args.sampling = sampling


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; pass a Hugging Face checkpoint directory or one written "
                         "by create_shard_model")
    if not (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        raise UsageError(f"{path} is not a model directory: it has no config.json (a Hugging Face checkpoint) "
                         f"and no {MANIFEST} (create_shard_model)")


def load_tokenizer(path: Path):
    present = [f for f in TOKENIZER_FILES if all((path / part).is_file() for part in f.split(" + "))]
    if not present:
        raise UsageError(f"{path} has no tokenizer: autotp-generate needs one of {', '.join(TOKENIZER_FILES)} "
                         "(with tokenizer_config.json) beside the weights; copy them from the original "
                         "checkpoint (create_shard_model copies them when the source has them)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # a batch decodes from its right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def prompt_texts(args: argparse.Namespace, tokenizer) -> list[str] | None:
    """The prompts as text (None for a synthetic prompt), the chat template applied if asked."""
    if args.input_tokens is not None:
        if args.chat:
            raise UsageError("--chat needs text: use it with --prompt or --prompt-file")
        return None
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        try:
            texts = [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise UsageError(f"--prompt-file {args.prompt_file} cannot be read ({exc.strerror})") from None
        if not texts:
            raise UsageError(f"--prompt-file {args.prompt_file} has no prompt (one per line)")
    if args.streaming and len(texts) > 1:
        raise UsageError("--streaming prints one sequence: give one prompt")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    return texts


def encode(args: argparse.Namespace, tokenizer, texts: list[str] | None, vocab: int) -> dict[str, torch.Tensor]:
    if texts is None:
        gen = torch.Generator().manual_seed(args.input_tokens)
        ids = torch.randint(min(100, vocab - 1), vocab, (1, args.input_tokens), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def check_length(config, inputs: dict[str, torch.Tensor], new_tokens: int) -> None:
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    length = inputs["input_ids"].shape[1]
    if limit is not None and length + new_tokens > limit:
        raise UsageError(f"the prompt has {length} tokens and {new_tokens} new ones were asked for, but the model "
                         f"has {limit} positions (max_position_embeddings); shorten the prompt or ask for fewer "
                         "tokens")


def generate_once(model, inputs, args, tokenizer, world: int, rank: int, stream: bool) -> tuple[torch.Tensor, list]:
    clock = StepClock()
    processors = LogitsProcessorList(([SameScores()] if world > 1 else []) + [clock])
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  do_sample=args.sampling, logits_processor=processors,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer else None)
    if args.token_latency:  # every run the same length: the end-of-sequence token ignored (as autotp-bench
        # does; min_new_tokens would scan the vocabulary every step)
        kwargs["eos_token_id"] = None
        if kwargs["pad_token_id"] is None:
            kwargs["pad_token_id"] = pad_id(model)
    if args.sampling:
        kwargs.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stream and rank == 0:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    stamps = [start, *clock.stamps]
    return out[:, inputs["input_ids"].shape[1]:], [b - a for a, b in zip(stamps, stamps[1:])]


def latency_report(runs: list[list[float]], batch: int) -> dict[str, Any]:
    first = [r[0] * 1e3 for r in runs]
    nexts = [statistics.fmean(r[1:]) * 1e3 for r in runs if len(r) > 1]
    total = [sum(r) for r in runs]
    tokens = batch * len(runs[0])
    return {"first_token_ms": {"median": statistics.median(first), "min": min(first), "max": max(first)},
            "next_token_ms": ({"median": statistics.median(nexts), "min": min(nexts), "max": max(nexts)}
                              if nexts else None),
            "tokens_per_s": tokens / statistics.median(total), "runs": len(runs)}


def run(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    path = Path(args.model)
    check_request(args)
    check_model_dir(path)
    tokenizer = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path)
    texts = prompt_texts(args, tokenizer)
    inputs = encode(args, tokenizer, texts, config.get_text_config().vocab_size)
    check_length(config, inputs, args.max_new_tokens)
    if world > 1:
        init_distributed()
    model = from_pretrained(path, dtype=args.dtype, world_size=world, quantize=args.quantize,
                            runtime=Runtime.from_env())
    for _ in range(args.num_warmup if args.token_latency else 0):
        generate_once(model, inputs, args, tokenizer, world, rank, stream=False)
    runs, new = [], None
    for i in range(args.num_iter if args.token_latency else 1):
        new, steps = generate_once(model, inputs, args, tokenizer, world, rank, stream=args.streaming and i == 0)
        runs.append(steps)
    if args.streaming and rank == 0:
        sys.stdout.flush()
    out_texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    every = [out_texts] * world
    if world > 1:
        dist.all_gather_object(every, out_texts)
    result: dict[str, Any] = {
        "model": str(path), "world_size": world, "dtype": args.dtype, "quantize": args.quantize,
        "num_beams": args.num_beams, "sampling": args.sampling, "seed": args.seed,
        "prompts": texts if texts is not None else [f"<{args.input_tokens} synthetic tokens>"],
        "texts": out_texts, "new_tokens": [int((row != tokenizer.pad_token_id).sum()) for row in new],
        "same_on_every_rank": all(t == out_texts for t in every),
    }
    if args.token_latency:
        result["latency"] = latency_report(runs, new.shape[0])
    return result


def print_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result), flush=True)
        return
    if not args.streaming:
        for prompt, text in zip(result["prompts"], result["texts"]):
            print(f"{prompt}{text}" if len(result["prompts"]) == 1 else f"[{prompt}] -> {text}")
    else:
        print()
    if "latency" in result:
        lat = result["latency"]
        nxt = lat["next_token_ms"]
        print(f"first token {lat['first_token_ms']['median']:.1f} ms (min {lat['first_token_ms']['min']:.1f}, "
              f"max {lat['first_token_ms']['max']:.1f}); next token "
              + (f"{nxt['median']:.1f} ms (min {nxt['min']:.1f}, max {nxt['max']:.1f})" if nxt else "-")
              + f"; {lat['tokens_per_s']:.1f} tokens/s over {lat['runs']} runs on {result['world_size']} rank(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = launched_world()
    try:
        result = run(args, rank, world)
    except (UsageError, CheckpointError, ShardingError) as exc:
        if rank == 0:
            print(f"autotp-generate: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print_result(args, result)
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
