"""save_sharded: write one safetensors file per rank, reading the source tensor by tensor.

The plan comes from the same walker as autotp.shard, run on a skeleton of the model (no
weights loaded). Each source tensor is read once per rank as only that rank's slice, converted
if asked, and appended to that rank's file, so the peak memory is about one tensor. Everything
is written into a temporary sibling directory that is renamed into place at the end: an
interrupted run never leaves a directory that looks finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from autotp.checkpoint.format import dtype_name, param_slice, rank_file, tied_keys, write_manifest
from autotp.checkpoint.prequantized import PrequantizedFormat
from autotp.checkpoint.skeleton import check_keys, load_config, read_source
from autotp.checkpoint.source import HFSource
from autotp.checkpoint.stfile import ShardFileWriter
from autotp.plan import CheckpointError, Plan, Style
from autotp.policies import build_plan
from autotp.runtime import Runtime, resolve
from autotp.sharding.layers import take
from autotp.sharding.quantize import DEFAULT_GROUP_SIZE, SCALE_SUFFIX, ZERO_SUFFIX, QuantScheme
from autotp.util import pid_alive

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
Reader = Callable[[str, int | None, list | None], torch.Tensor]


def save_sharded(model_or_path: nn.Module | str | os.PathLike, save_dir: str | os.PathLike, world_size: int,
                 dtype: torch.dtype | str | None = None, overwrite: bool = False,
                 overrides: Mapping[str, str | Style] | None = None, fuse_allreduce: bool = True,
                 progress: bool = True, quantize: str | None = None,
                 quant_group_size: int = DEFAULT_GROUP_SIZE, runtime: Runtime | None = None,
                 experts: str = "tensor") -> Path:
    """Write a pre-sharded checkpoint of ``model_or_path`` (a model in memory, or a Hugging Face
    checkpoint directory with safetensors) for ``world_size`` ranks into ``save_dir``.

    ``quantize="int8"`` (or ``"int4"``, ``"int4-asym"``) stores the column- and row-parallel
    layers as weight-only INT8 (INT4) (each rank's file holds exactly its slice of the quantized
    whole, as ``autotp.shard(..., quantize=...)`` would make it; ``quant_group_size`` as there).
    The source weights are converted to ``dtype`` (if given) before quantizing; a rank's values,
    scales (and zero points) are written apart (the file keeps larger elements first), so each
    quantized weight is read once per tensor that stands for it.
    ``experts`` splits mixture-of-experts blocks as in ``autotp.plan``. ``runtime`` (default
    ``Runtime.from_env()``) holds autotp's settings."""
    resolve(runtime)  # checked now: a bad setting fails before any work
    quant = QuantScheme.parse(quantize, quant_group_size if quantize else None)
    target = Path(save_dir)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; choose another --save-path or pass overwrite=True "
                              "(--overwrite)")
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(model_or_path, nn.Module):
        plan, specs, reader, copy_files = _from_model(model_or_path, world_size, want, overrides, fuse_allreduce,
                                                      experts)
    else:
        plan, specs, reader, copy_files = _from_directory(Path(model_or_path), world_size, want, overrides,
                                                          fuse_allreduce, experts)
    stored = {dtype_name(d) for _, d in specs.values() if d.is_floating_point}
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    _remove_stale_partials(target)
    partial.mkdir(parents=True)
    quantized = _QuantWriter(plan, specs, reader, quant) if quant is not None else None
    try:
        files = _write_ranks(partial, plan, specs, reader, progress, quantized)
        copy_files(partial)
        write_manifest(partial, plan, stored.pop() if len(stored) == 1 else "mixed", files, quant)
        _move_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


class _QuantWriter:
    """The tensors of the quantized layers: "<module>.weight" becomes the quantized values,
    "<module>.weight_scale" (and, asymmetric INT4, "<module>.weight_zero") join it, all in the
    shapes of each rank's QuantLayout."""

    def __init__(self, plan: Plan, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], reader: Reader,
                 quant: QuantScheme) -> None:
        self.specs, self.reader, self.quant = specs, reader, quant
        self.entries = quant.entries(plan)

    def source_key(self, key: str) -> str | None:
        """The source weight behind ``key`` if ``key`` is one of the quantized tensors, else None."""
        base = key.removesuffix(SCALE_SUFFIX).removesuffix(ZERO_SUFFIX)
        module, _, param = base.rpartition(".")
        return base if param == "weight" and module in self.entries and base in self.specs else None

    def rank_specs(self, key: str, rank: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The quantized tensors that stand for source weight ``key`` in ``rank``'s file."""
        entry = self.entries[key.rpartition(".")[0]]
        layout = self.quant.layout(self.specs[key][0], entry, entry.ranges[rank])
        return [(key + suffix, dtype, shape) for suffix, dtype, shape in layout.specs()]

    def tensor(self, key: str, rank: int) -> torch.Tensor:
        base = self.source_key(key)
        entry, (shape, dtype) = self.entries[base.rpartition(".")[0]], self.specs[base]
        shard = self.quant.quantize_slice(lambda dim, ranges: self.reader(base, dim, ranges).to(dtype), shape,
                                          entry, entry.ranges[rank])
        return shard.tensors()[key[len(base):]]


def _write_ranks(directory: Path, plan: Plan, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 reader: Reader, progress: bool, quantized: _QuantWriter | None = None) -> list[dict]:
    writers = []
    for rank in range(plan.world_size):  # every layout is checked before anything is written
        rank_specs = []
        for key, (shape, dtype) in specs.items():
            if quantized is not None and quantized.source_key(key):
                rank_specs += quantized.rank_specs(key, rank)
                continue
            dim, ranges = param_slice(plan, key, rank)
            local = list(shape)
            if dim is not None:
                local[dim] = sum(b - a for a, b in ranges)
            rank_specs.append((key, dtype, tuple(local)))
        writers.append(ShardFileWriter(directory / rank_file(rank, plan.world_size), rank_specs,
                                       {"format": "pt", "autotp_rank": str(rank)}))
    try:
        total = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in specs.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="sharding", disable=not progress) as bar:
            for key in writers[0].order:
                whole = None
                for rank, writer in enumerate(writers):
                    if quantized is not None and quantized.source_key(key):
                        writer.write(key, quantized.tensor(key, rank))
                        continue
                    dim, ranges = param_slice(plan, key, rank)
                    if dim is None:
                        whole = whole if whole is not None else reader(key, None, None)
                        tensor = whole
                    else:
                        tensor = reader(key, dim, ranges)
                    writer.write(key, tensor.to(specs[key][1]))
                    del tensor  # one slice alive at a time
                del whole
                if key in specs:  # a quantized layer's scales add nothing to read: its weight counts
                    shape, dtype = specs[key]
                    bar.update(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size())
        done = [w.close() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return [{"name": w.path.name, "size": size, "sha256": sha} for w, (size, sha) in zip(writers, done)]


def _stored_keys(model: nn.Module, plan: Plan) -> list[str]:
    """Parameters (under every name, minus the lm_head tied to a sharded embedding) and
    persistent buffers: the tensors a rank file holds."""
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    buffers = [n for n, _ in model.named_buffers(remove_duplicate=False) if n in model.state_dict()]
    return [k for k in params + buffers if k not in tied_keys(plan)]


def _from_model(model: nn.Module, world_size: int, dtype: torch.dtype | None, overrides, fuse_allreduce,
                experts: str = "tensor"):
    plan = build_plan(model, world_size, overrides, fuse_allreduce=fuse_allreduce, experts=experts)
    state = model.state_dict(keep_vars=True)
    specs = {}
    for key in _stored_keys(model, plan):
        t = state[key]
        specs[key] = (tuple(t.shape), dtype if dtype is not None and t.is_floating_point() else t.dtype)

    def reader(key: str, dim: int | None, ranges: list | None) -> torch.Tensor:
        t = state[key].detach()
        return t if dim is None else take(t, dim, ranges)

    def copy_files(directory: Path) -> None:
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)

    return plan, specs, reader, copy_files


def _from_directory(directory: Path, world_size: int, dtype: torch.dtype | None, overrides, fuse_allreduce,
                    experts: str = "tensor"):
    if (directory / "config.json").is_file():
        fmt = PrequantizedFormat.from_config(load_config(directory), str(directory / "config.json"))
        if fmt is not None:
            raise CheckpointError(f"{directory} is a {fmt.method} 4-bit checkpoint; create_shard_model does not "
                                  "re-shard pre-quantized checkpoints yet: load it with autotp.from_pretrained "
                                  "(each rank reads its slice), or shard the unquantized model with --quantize int4")
    source = HFSource.open(directory, world_size, dtype, overrides, fuse_allreduce, experts)
    skeleton, tensors, plan = source.model, source.tensors, source.plan
    keys = _stored_keys(skeleton, plan)
    lookup = {k: source.find(k) or k for k in keys}
    check_keys({k for k in keys if k in dict(skeleton.named_parameters(remove_duplicate=False))},
               {k for k in keys if lookup[k] in tensors}, directory)
    keys = [k for k in keys if lookup[k] in tensors]  # persistent buffers absent from the source stay computed
    specs = {}
    for key in keys:
        info = tensors[lookup[key]][1]
        specs[key] = (info.shape, dtype if dtype is not None and info.dtype.is_floating_point else info.dtype)
    handles = {path: open(path, "rb") for path in {tensors[lookup[k]][0] for k in keys} if path is not None}

    def reader(key: str, dim: int | None, ranges: list | None) -> torch.Tensor:
        path, info = tensors[lookup[key]]
        return read_source(handles, path, info, dim, ranges)

    def copy_files(target: Path) -> None:
        for handle in handles.values():
            handle.close()
        for item in directory.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_FILES) and item.name != "autotp.json":
                shutil.copy2(item, target / item.name)

    return plan, specs, reader, copy_files


def _remove_stale_partials(target: Path) -> None:
    """Temporary directories of earlier runs that were killed (their process is gone)."""
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(partial: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(target)
