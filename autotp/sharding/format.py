"""The pre-sharded checkpoint format: autotp.json beside one safetensors file per rank.

    OUT_DIR/autotp.json                 format version, world size, dtype, architecture, plan,
                                        per-rank files with size and sha256
    OUT_DIR/config.json, ...            copied from the source
    OUT_DIR/rank-00-of-02.safetensors   exactly the tensors rank 0 holds, sharded shapes

A quantized checkpoint (create_shard_model --quantize int8) stores each column- and
row-parallel layer's "<module>.weight" as int8 and its fp32 scales as "<module>.weight_scale",
in the shapes autotp.sharding.quantize.int8_layout gives; autotp.json's "quantization" names
the scheme and group size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autotp.plan import Entry, Plan, Style
from autotp.sharding.stfile import CheckpointError, sha256_of

FORMAT_VERSION = 1
MANIFEST = "autotp.json"


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:02d}-of-{world_size:02d}.safetensors"


def split_dim(entry: Entry | None, param: str) -> int | None:
    """Which dim of parameter ``param`` ('weight', 'bias') a plan entry cuts, None for whole.
    The same rule the parallel layers apply (sharding/layers.py)."""
    if entry is None or entry.style == Style.REPLICATE:
        return None
    if entry.style == Style.ROW:
        return 1 if param == "weight" else None
    return 0


def param_slice(plan: Plan, key: str, rank: int) -> tuple[int | None, list[tuple[int, int]] | None]:
    """(dim, ranges) of state-dict ``key`` that ``rank`` holds."""
    module, _, param = key.rpartition(".")
    entry = plan.entries.get(module)
    dim = split_dim(entry, param)
    return (dim, entry.ranges[rank]) if dim is not None else (None, None)


def tied_keys(plan: Plan) -> set[str]:
    """State-dict keys that are not stored because the parameter is tied to another."""
    return {f"{e.name}.weight" for e in plan.entries.values() if e.tied_to}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_manifest(directory: Path, plan: Plan, dtype: str, files: list[dict[str, Any]],
                   quantization: dict[str, Any] | None = None) -> None:
    """``dtype`` is the floating dtype of the unquantized tensors; ``quantization`` (None: none)
    is the scheme and group size of the INT8 layers (autotp.sharding.quantize)."""
    manifest = {"format_version": FORMAT_VERSION, "world_size": plan.world_size, "dtype": dtype,
                "architecture": plan.architecture, "quantization": quantization, "files": files,
                "plan": plan.to_dict()}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_presharded(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: Path, world_size: int, rank: int, check_sha: bool = True) -> dict[str, Any]:
    """The manifest, after checking it fits this job and this rank's file is intact."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{directory / MANIFEST} is not valid JSON ({exc}); re-create the checkpoint "
                              "with create_shard_model") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format version {version!r}, this autotp reads "
                              f"version {FORMAT_VERSION}; upgrade autotp or re-create the checkpoint with "
                              "create_shard_model")
    if manifest["world_size"] != world_size:
        raise CheckpointError(
            f"{directory} was sharded for world size {manifest['world_size']} but this job has {world_size} "
            f"ranks; launch {manifest['world_size']} ranks, or re-shard with create_shard_model "
            f"--world-size {world_size}")
    entry = manifest["files"][rank]
    path = directory / entry["name"]
    if not path.is_file():
        raise CheckpointError(f"rank file {path} is missing: the checkpoint is incomplete; re-create it "
                              "with create_shard_model")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"rank file {path} has {size} bytes but the manifest records {entry['size']}: "
                              "it is truncated or was replaced; re-create the checkpoint")
    if check_sha and sha256_of(path) != entry["sha256"]:
        raise CheckpointError(f"the sha256 of rank file {path} does not match the manifest: the file is "
                              "corrupt or was modified; re-create the checkpoint")
    return manifest
