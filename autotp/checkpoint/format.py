"""The pre-sharded checkpoint format: autotp.json beside one safetensors file per rank.

    OUT_DIR/autotp.json                 format version, world size, dtype, architecture, plan,
                                        per-rank files with size and sha256
    OUT_DIR/config.json, ...            copied from the source
    OUT_DIR/rank-00-of-02.safetensors   exactly the tensors rank 0 holds, sharded shapes

A quantized checkpoint (create_shard_model --quantize int8 | int4 | int4-asym) stores each
column- and row-parallel layer's "<module>.weight" as int8 (INT4: uint8, two values per byte),
its fp32 scales as "<module>.weight_scale" and, for int4-asym, its zero points as
"<module>.weight_zero", in the shapes autotp.sharding.quantize.QuantScheme.layout gives;
autotp.json's "quantization" names the scheme and group size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autotp.checkpoint.stfile import DTYPES, sha256_of
from autotp.plan import CheckpointError, Plan
from autotp.sharding.quantize import QuantScheme

FORMAT_VERSION = 1
MANIFEST = "autotp.json"
FLOAT_DTYPES = {str(d).removeprefix("torch.") for d in DTYPES.values() if d.is_floating_point} | {"mixed"}


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:02d}-of-{world_size:02d}.safetensors"


def param_slice(plan: Plan, key: str, rank: int) -> tuple[int | None, list[tuple[int, int]] | None]:
    """(dim, ranges) of state-dict ``key`` that ``rank`` holds (``Plan.cut``), (None, None) whole.
    The dim is the stored tensor's (a Conv1D weight is stored [in, out])."""
    entry, dim = plan.cut(key)
    return (dim, entry.ranges[rank]) if dim is not None else (None, None)


def tied_keys(plan: Plan) -> set[str]:
    """State-dict keys that are not stored because the parameter is tied to another."""
    return {f"{e.name}.weight" for e in plan.entries.values() if e.tied_to}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RankFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """autotp.json, checked: every field present and of its type, one plain file name per rank,
    a plan that parses and fits the world size."""

    format_version: int
    world_size: int
    dtype: str  # the floating dtype of the unquantized tensors, or "mixed"
    architecture: str
    quantization: QuantScheme | None
    files: list[RankFile]
    plan: Plan

    def to_json(self) -> str:
        return json.dumps({"format_version": self.format_version, "world_size": self.world_size, "dtype": self.dtype,
                           "architecture": self.architecture,
                           "quantization": None if self.quantization is None else self.quantization.to_manifest(),
                           "files": [vars(f) for f in self.files], "plan": self.plan.to_dict()}, indent=1)


def write_manifest(directory: Path, plan: Plan, dtype: str, files: list[dict[str, Any]],
                   quant: QuantScheme | None = None) -> None:
    """``dtype`` is the floating dtype of the unquantized tensors; ``quant`` (None: none) the
    scheme of the quantized layers (autotp.sharding.quantize)."""
    manifest = Manifest(FORMAT_VERSION, plan.world_size, dtype, plan.architecture, quant,
                        [RankFile(**f) for f in files], plan)
    (directory / MANIFEST).write_text(manifest.to_json())


def is_presharded(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def parse_manifest(raw: bytes | str, where: str) -> Manifest:
    """The manifest in ``raw`` (the bytes of autotp.json), or a CheckpointError naming ``where``,
    the field and the fix, whatever the bytes."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(where, f"is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise _bad(where, f"must hold a JSON object, not a {type(data).__name__}")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(f"{where} uses checkpoint format version {version!r}, this autotp reads version "
                              f"{FORMAT_VERSION}; upgrade autotp or re-create the checkpoint with create_shard_model")
    world_size = _field(data, "world_size", int, where)
    if world_size < 1:
        raise _bad(where, f"field 'world_size' must be a positive integer, got {world_size!r}")
    dtype = _field(data, "dtype", str, where)
    if dtype not in FLOAT_DTYPES:
        raise _bad(where, f"field 'dtype' must name a floating dtype ({', '.join(sorted(FLOAT_DTYPES))}), "
                          f"got {dtype!r}")
    architecture = _field(data, "architecture", str, where)
    quant = QuantScheme.from_manifest(data.get("quantization"), where)
    files = [_rank_file(f, i, where) for i, f in enumerate(_field(data, "files", list, where))]
    if len(files) != world_size:
        raise _bad(where, f"field 'files' lists {len(files)} rank files for world size {world_size}")
    plan = _plan(_field(data, "plan", dict, where), world_size, where)
    return Manifest(version, world_size, dtype, architecture, quant, files, plan)


def read_manifest(directory: Path, world_size: int, rank: int, check_sha: bool = True) -> Manifest:
    """The manifest, after checking it fits this job and this rank's file is intact."""
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); re-create the checkpoint with "
                              "create_shard_model") from None
    manifest = parse_manifest(raw, str(path))
    if manifest.world_size != world_size:
        raise CheckpointError(
            f"{directory} was sharded for world size {manifest.world_size} but this job has {world_size} "
            f"ranks; launch {manifest.world_size} ranks, or re-shard with create_shard_model --world-size {world_size}")
    entry = manifest.files[rank]
    file = directory / entry.name
    if not file.is_file():
        raise CheckpointError(f"rank file {file} is missing: the checkpoint is incomplete; re-create it "
                              "with create_shard_model")
    size = file.stat().st_size
    if size != entry.size:
        raise CheckpointError(f"rank file {file} has {size} bytes but the manifest records {entry.size}: "
                              "it is truncated or was replaced; re-create the checkpoint")
    if check_sha and sha256_of(file) != entry.sha256:
        raise CheckpointError(f"the sha256 of rank file {file} does not match the manifest: the file is "
                              "corrupt or was modified; re-create the checkpoint")
    return manifest


def _bad(where: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where} {why}; the checkpoint is damaged: re-create it with create_shard_model")


def _field(data: dict, key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise _bad(where, f"lacks field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _bad(where, f"field '{key}' must be {_KINDS[kind]}, got {json.dumps(value)[:40]}")
    return value


_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _rank_file(raw: Any, index: int, where: str) -> RankFile:
    field = f"files[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, f"field '{field}' must be an object with name, size and sha256")
    name, size, sha = raw.get("name"), raw.get("size"), raw.get("sha256")
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0") \
            or Path(name).name != name:
        raise _bad(where, f"field '{field}.name' must be a plain file name inside the checkpoint directory, got "
                          f"{name!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(where, f"field '{field}.size' must be a non-negative integer, got {size!r}")
    if not isinstance(sha, str):
        raise _bad(where, f"field '{field}.sha256' must be a string, got {type(sha).__name__}")
    return RankFile(name, size, sha)


def _plan(raw: dict, world_size: int, where: str) -> Plan:
    try:
        plan = Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise _bad(where, f"field 'plan' does not parse ({type(exc).__name__}: {str(exc)[:120]})") from None
    if plan.world_size != world_size:
        raise _bad(where, f"field 'plan' is for world size {plan.world_size}, the manifest for {world_size}")
    return plan
