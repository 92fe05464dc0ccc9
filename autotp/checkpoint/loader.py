"""from_pretrained: build this rank's shard of a model without ever holding the whole model.

A pre-sharded directory (autotp.json): the plan comes from the manifest and the weights are
views of a memory map of this rank's file only. A Hugging Face directory: the walker plans on
a skeleton of the model, and each weight is read as this rank's slice with positioned reads.
Either way the skeleton's parameters are moved to the meta device before the plan is applied,
so only this rank's tensors ever take memory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig

from autotp.checkpoint.format import Manifest, is_presharded, param_slice, read_manifest
from autotp.checkpoint.prequantized import PrequantizedFormat
from autotp.checkpoint.skeleton import MergedTensor, build_skeleton, load_config, parameters_to_meta, stored_dtype
from autotp.checkpoint.source import HFSource
from autotp.checkpoint.stfile import MappedRegions, map_tensors, read_slice
from autotp.comm import TPGroup
from autotp.plan import CheckpointError, Plan, Style
from autotp.policies.verify import release_free_memory
from autotp.runtime import Runtime, resolve
from autotp.sharding.apply import apply_plan
from autotp.sharding.decode import prepare_decoding
from autotp.sharding.layers import pack_layers
from autotp.sharding.quantize import SCALE_SUFFIX, ZERO_SUFFIX, QuantScheme


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    world_size: int | None = None, process_group: Any = None,
                    overrides: Mapping[str, str | Style] | None = None, fuse_allreduce: bool = True,
                    check_sha: bool = True, quantize: str | None = None,
                    quant_group_size: int | None = None, runtime: Runtime | None = None,
                    experts: str | None = None) -> nn.Module:
    """Load this rank's shard of a model, ready for ``generate()``.

    ``path`` is a pre-sharded directory written by create_shard_model / save_sharded (only this
    rank's file is read) or a Hugging Face checkpoint directory with safetensors (only this
    rank's slice of each tensor is read). ``world_size`` defaults to the process group's size;
    ``dtype`` defaults to the stored one. ``check_sha`` verifies this rank's file against the
    manifest before use. bf16 Linear shards are packed for the native kernels where they run;
    ``runtime`` (default ``Runtime.from_env()``) holds those settings and the all-reduce's.

    A pre-sharded checkpoint written with ``--quantize int8`` (``int4``, ``int4-asym``) loads
    quantized as it is stored. ``quantize="int8"`` (or ``"int4"``, ``"int4-asym"``) on a Hugging
    Face directory quantizes while loading (each rank reads its slice plus, for row-parallel
    layers, the columns of the groups its cut touches; ``quant_group_size`` defaults to 128, 0
    is one scale per row), giving exactly the shards ``autotp.shard(model, n, quantize=...)``
    gives. An unquantized pre-sharded checkpoint
    cannot be quantized at load time (its row-parallel files lack those columns): that raises.

    A Hugging Face directory of a 4-bit GPTQ or AWQ checkpoint (``quantization_config`` in its
    config.json; autotp.checkpoint.prequantized) loads as INT4 with zero points: each rank
    reads its slice of the packed tensors and repacks it for the INT4 kernels. Its other
    tensors load in ``dtype``, by default bfloat16 where the checkpoint stores float16 (the
    kernels take bf16 or fp32 activations).

    ``experts`` ("tensor", the default, or "expert") splits mixture-of-experts blocks of a
    Hugging Face directory as in ``autotp.plan``; a pre-sharded directory was split when it
    was written, and asking for the other split raises."""
    rt = resolve(runtime)
    asked = QuantScheme.parse(quantize, quant_group_size)
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass a Hugging Face checkpoint directory or one "
                              "written by create_shard_model")
    if world_size is None:
        world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    mapped = MappedRegions()
    if is_presharded(directory):
        manifest = read_manifest(directory, world_size, _rank(world_size, process_group), check_sha)
        stored = "expert" if manifest.plan.expert_slices else "tensor"
        if experts is not None and experts != stored:
            raise CheckpointError(f"{directory} was written with experts={stored!r}; load it without experts=, or "
                                  f"re-create it with create_shard_model --experts {experts}")
        quant = _stored_scheme(manifest, directory, quantize, quant_group_size)
        _check_dtype(manifest, directory, want)
        group = TPGroup.from_torch(world_size, process_group, rt)  # the plan is known valid: meet the others
        model, plan, tensors = _presharded(directory, manifest, group, mapped, quant)
    else:
        fmt = PrequantizedFormat.from_config(load_config(directory), str(directory / "config.json")) \
            if (directory / "config.json").is_file() else None
        if fmt is not None and asked is not None:
            raise CheckpointError(f"{directory} is already quantized ({fmt.method}, 4 bits); load it without "
                                  "quantize= / quant_group_size=")
        if fmt is not None and want is None and stored_dtype(directory) == torch.float16:
            want = torch.bfloat16
        source = HFSource.open(directory, world_size, want, overrides, fuse_allreduce, experts or "tensor")
        release_free_memory()  # what the trace freed, before the weights arrive
        group = TPGroup.from_torch(world_size, process_group, rt)
        model, plan, tensors = _from_hf(source, group, want, mapped, fmt.scheme() if fmt else asked, fmt)
    _assign(model, plan, tensors, directory)
    del tensors
    if pack_layers(model, rt, mapped.release):  # the mapped pages of each packed weight go back at once
        release_free_memory()  # and the heap the plain copies (column cuts) held
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return prepare_decoding(model, rt)


def _rank(world_size: int, process_group: Any) -> int:
    """This process's rank (0 without a process group, where only world size 1 can run)."""
    return dist.get_rank(process_group) if dist.is_initialized() and world_size > 1 else 0


def _check_dtype(manifest: Manifest, directory: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None and manifest.dtype != str(dtype).removeprefix("torch."):
        raise CheckpointError(f"{directory} stores {manifest.dtype} weights but dtype={dtype} was asked; load it "
                              f"without dtype, or re-shard with create_shard_model --dtype {dtype}")


def _stored_scheme(manifest: Manifest, directory: Path, quantize: str | None,
                   group_size: int | None) -> QuantScheme | None:
    """The scheme to load a pre-sharded checkpoint with (None: unquantized), after checking
    that what the caller asks for is what the checkpoint stores."""
    stored = manifest.quantization
    if quantize is None:
        return stored
    if stored is None:
        raise CheckpointError(f"{directory} stores unquantized weights split for {manifest.world_size} ranks; a "
                              "row-parallel rank's file lacks the columns its quantization groups need, so it cannot be "
                              f"quantized at load time. Re-create it with create_shard_model --quantize {quantize}, "
                              "or load the Hugging Face checkpoint directory with quantize=")
    if quantize != stored.name:
        raise CheckpointError(f"{directory} stores {stored.name} weights, not {quantize}; load it without quantize, "
                              f"or re-create it with create_shard_model --quantize {quantize}")
    if group_size is not None and group_size != stored.group_size:
        raise CheckpointError(f"{directory} stores {stored.name} weights with group size {stored.group_size}, not "
                              f"{group_size}; load it without quant_group_size, or re-create it with "
                              f"create_shard_model --quantize {quantize} --quant-group-size {group_size}")
    return stored


def _presharded(directory: Path, manifest: Manifest, group: TPGroup, mapped: MappedRegions,
                quant: QuantScheme | None):
    stored = manifest.dtype
    model = build_skeleton(directory, getattr(torch, stored) if stored != "mixed" else torch.float32)
    plan = manifest.plan
    parameters_to_meta(model)
    apply_plan(model, plan, group, quant=quant)
    tensors = map_tensors(directory / manifest.files[group.tp_rank].name)
    mapped.add(tensors)
    return model, plan, tensors


def _from_hf(source: HFSource, group: TPGroup, dtype: torch.dtype | None, mapped: MappedRegions,
             quant: QuantScheme | None, fmt: PrequantizedFormat | None = None):
    model, plan, sources = source.model, source.plan, source.tensors
    parameters_to_meta(model)
    apply_plan(model, plan, group, quant=quant)
    quantized = quant.entries(plan) if quant is not None else {}
    wanted = [k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"]
    tensors = {}
    with _SourceReader(mapped) as reader:
        for key in wanted:
            module, _, param = key.rpartition(".")
            if module in quantized and param in ("weight" + SCALE_SUFFIX, "weight" + ZERO_SUFFIX):  # made with it
                continue
            if fmt is not None and module in quantized and param == "weight":
                tensors.update(_prequantized_shard(source, fmt, reader, quant, quantized[module], group.tp_rank))
                reader.release()
                continue
            found = source.find(key)
            if found is None:  # left on meta: _assign reports it
                continue
            path, info = sources[found]
            convert = dtype is not None and info.dtype.is_floating_point and info.dtype != dtype
            to = dtype if convert else info.dtype

            def read(dim: int | None, ranges: list | None) -> torch.Tensor:
                return reader.read(path, info, dim, ranges, convert).to(to)

            if module in quantized and param == "weight":
                entry = quantized[module]
                shard = quant.quantize_slice(read, info.shape, entry, entry.ranges[group.tp_rank])
                tensors.update({key + suffix: t for suffix, t in shard.tensors().items()})
                reader.release()
            else:
                tensors[key] = read(*param_slice(plan, key, group.tp_rank))
    return model, plan, tensors


def _prequantized_shard(source: HFSource, fmt: PrequantizedFormat, reader: "_SourceReader", quant: QuantScheme,
                        entry, rank: int) -> dict[str, torch.Tensor]:
    """This rank's INT4 tensors of plan entry ``entry``, read from a GPTQ / AWQ layer's stored
    tensors ("<module>.weight" and its "_scale" / "_zero" companions)."""
    module = entry.name

    def read(suffix: str, dim: int | None, ranges: list | None) -> torch.Tensor:
        found = source.tensors.get(f"{module}.{suffix}")
        if found is None:
            raise KeyError(suffix)
        path, info = found
        return reader.read(path, info, dim, ranges, False)

    if f"{module}.qweight" not in source.tensors:
        stored = "an unquantized weight" if source.find(f"{module}.weight") else "neither qweight nor weight"
        raise CheckpointError(f"{source.directory} stores {stored} for '{module}', which autotp splits; autotp "
                              f"reads {fmt.method} checkpoints whose every column- and row-parallel Linear is "
                              "quantized")
    try:
        n = source.tensors[f"{module}.scales"][1].shape[1]
        rows = source.tensors[f"{module}.qweight"][1].shape[0]
        source.tensors[f"{module}.qzeros"]
    except (KeyError, IndexError):
        raise CheckpointError(f"{source.directory}: '{module}' lacks its {fmt.method} scales or qzeros (or they are "
                              "not 2-D); the checkpoint is incomplete") from None
    k = 8 * rows if fmt.method == "gptq" else rows
    fmt.check_groups(module, read, k)
    layout = quant.layout((k, n) if entry.transposed else (n, k), entry, entry.ranges[rank] if entry.ranges else [])
    try:
        shard = fmt.shard(read, layout, n, k)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{source.directory}: the {fmt.method} tensors of '{module}' do not have the shapes "
                              f"of an [{n}, {k}] weight in groups of {quant.group_size or k} ({exc})") from None
    return {f"{module}.weight{suffix}": t for suffix, t in shard.tensors().items()}


class _SourceReader:
    """This rank's slices of source tensors. Whole tensors and single row ranges are views of a
    private memory map of the source file (no copy, pages read when first used); column cuts and
    tensors to convert are read with positioned reads, which leave nothing mapped."""

    def __init__(self, mapped: MappedRegions) -> None:
        self.mapped = mapped
        self.maps: dict[Path, dict[str, torch.Tensor]] = {}
        self.files: dict[Path, Any] = {}
        self.last: torch.Tensor | None = None

    def __enter__(self) -> "_SourceReader":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.files.values():
            handle.close()

    def read(self, path: Path | None, info, dim: int | None, ranges: list | None, convert: bool) -> torch.Tensor:
        if isinstance(info, MergedTensor):  # assembled from several stored tensors: read, not mapped
            self.last = None
            return info.read(dim, ranges)
        if not convert and (dim is None or (dim == 0 and len(ranges) == 1)):
            if path not in self.maps:
                self.maps[path] = map_tensors(path)
                self.mapped.add(self.maps[path])
            tensor = self.maps[path][info.name]
            self.last = tensor if dim is None else tensor[ranges[0][0]:ranges[0][1]]
            return self.last
        self.last = None
        handle = self.files.setdefault(path, open(path, "rb"))
        return read_slice(handle, info, dim, ranges)

    def release(self) -> None:
        """Hand back the mapped pages of the last tensor read, once it has been copied (quantized)."""
        if self.last is not None:
            self.mapped.release(self.last)
            self.last = None


def _assign(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{directory} holds tensors this model does not have, e.g. "
                              f"{result.unexpected_keys[:3]}; was it written for another architecture?")
    for entry in plan.entries.values():
        if entry.tied_to:
            model.get_submodule(entry.name).weight = model.get_submodule(entry.tied_to).weight
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{directory} lacks {len(still_meta)} weights the model needs, e.g. "
                              f"{still_meta[:3]}; is this the checkpoint of this config's architecture?")
    model.eval()
