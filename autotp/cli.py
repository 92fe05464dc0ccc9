"""Command-line entry points: create_shard_model (also ``python -m autotp.cli``)."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from autotp.checkpoint.writer import save_sharded
from autotp.plan import CheckpointError, ShardingError
from autotp.runtime import Runtime
from autotp.sharding.quantize import DEFAULT_GROUP_SIZE, SCHEMES

DTYPES = ["float32", "bfloat16", "float16"]


def create_shard_model(argv: list[str] | None = None, runtime: Runtime | None = None) -> int:
    """Write a pre-sharded checkpoint: one safetensors file per rank plus autotp.json. ``runtime``
    defaults to the environment's (``Runtime.from_env()``)."""
    parser = argparse.ArgumentParser(
        prog="create_shard_model",
        description="Shard a Hugging Face causal LM checkpoint for N tensor-parallel ranks, offline, in one "
                    "process. Reads the source tensor by tensor (peak memory about one tensor) and writes "
                    "OUT_DIR/rank-RR-of-NN.safetensors for each rank, the plan and checksums in "
                    "OUT_DIR/autotp.json, and copies config, generation config and tokenizer files. Load it "
                    "in each rank with autotp.from_pretrained(OUT_DIR).")
    parser.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                        help="Hugging Face checkpoint directory (config.json and *.safetensors)")
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks")
    parser.add_argument("--save-path", required=True, metavar="OUT_DIR", help="directory to create")
    parser.add_argument("--dtype", choices=DTYPES, help="convert floating weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-fuse-allreduce", action="store_true",
                        help="give every row-parallel layer its own all-reduce (for comparison)")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="store the column- and row-parallel Linear weights weight-only quantized: int8, "
                             "int4 (symmetric, two values per byte) or int4-asym (with zero points), with fp32 "
                             "scales per group (each rank's file holds its slice of the quantized whole; the "
                             "lm_head and embeddings keep --dtype)")
    parser.add_argument("--quant-group-size", type=int, default=DEFAULT_GROUP_SIZE, metavar="G",
                        help="input columns per scale (default %(default)s; 0: one scale per output row)")
    parser.add_argument("--experts", choices=("tensor", "expert"), default="tensor",
                        help="mixture-of-experts blocks: split every expert like an MLP (tensor, the default) or "
                             "give each rank whole experts (expert; the experts must divide evenly)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        rt = Runtime.from_env() if runtime is None else runtime
        out = save_sharded(args.model, args.save_path, args.world_size,
                           dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.overwrite,
                           fuse_allreduce=not args.no_fuse_allreduce, progress=not args.quiet,
                           quantize=args.quantize, quant_group_size=args.quant_group_size, runtime=rt,
                           experts=args.experts)
    except (CheckpointError, ShardingError, ValueError) as exc:
        print(f"create_shard_model: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} for {args.world_size} ranks in {time.perf_counter() - start:.1f} s")
    return 0


def main() -> None:
    raise SystemExit(create_shard_model())


if __name__ == "__main__":
    main()
