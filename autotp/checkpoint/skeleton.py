"""A model skeleton: the architecture built from its config with no weights loaded.

Parameters are allocated but never written (so the pages are not resident) while buffers
computed at construction, such as rotary frequencies, are real; the walker can trace it like
the loaded model. Before weights are assigned, parameters move to the meta device so that
applying a plan allocates nothing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from autotp.checkpoint.stfile import TensorInfo, read_header, read_slice
from autotp.plan import CheckpointError


def load_config(directory: Path):
    """The model config of ``directory``; a config.json that is not JSON, or names no
    architecture transformers knows, is a CheckpointError saying so."""
    path = directory / "config.json"
    try:
        json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc)[:80]}); restore it from the original model "
                              "(or re-create the checkpoint)") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); every model directory needs its config.json") from None
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a config transformers can read ({type(exc).__name__}: "
                              f"{str(exc)[:160]}); restore it from the original model") from None


def build_skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    config = load_config(directory)
    with no_init_weights():  # also skips the tying that init_weights does: tie explicitly
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def parameters_to_meta(model: nn.Module) -> None:
    """Replace every parameter by a meta tensor of the same shape, keeping ties (shared objects)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved:
                moved[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            module._parameters[name] = moved[id(param)]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint (those its index names, if it has one)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) or sorted(p.name for p in directory.iterdir())[:5]
        raise CheckpointError(f"{directory} has no *.safetensors weights (found {others}); save the model with "
                              "save_pretrained(..., safe_serialization=True), or convert it, and try again")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            wanted = {v for v in weight_map.values() if isinstance(v, str)}
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of "
                                  "tensor name -> file name); restore it from the original model") from None
        files = [f for f in files if f.name in wanted]
    return files


def stored_dtype(directory: Path) -> torch.dtype:
    """The floating dtype the checkpoint's first weight file stores."""
    infos, _ = read_header(weight_files(directory)[0])
    return next((i.dtype for i in infos.values() if i.dtype.is_floating_point), torch.float32)


def source_tensors(directory: Path, model: nn.Module) -> dict[str, tuple[Path | None, Any]]:
    """Every tensor of a Hugging Face checkpoint directory, under the name it has in ``model``
    (transformers renames some checkpoint keys on load, e.g. GPT-NeoX's embed_out -> lm_head):
    model key -> (file, TensorInfo). A parameter transformers assembles from several stored
    tensors (Mixtral's experts.N.w1 / w3 -> experts.gate_up_proj) is (None, MergedTensor)."""
    rename = _key_renamer(model)
    found: dict[str, tuple[Path | None, Any]] = {}
    merged: dict[str, tuple[Any, dict[int, list[tuple[int, Path, TensorInfo]]]]] = {}
    for path in weight_files(directory):
        infos, _ = read_header(path)
        for key, info in infos.items():
            new, converter, which, index = rename(key)
            if converter is None:
                found[new] = (path, info)
            else:
                merged.setdefault(new, (converter, {}))[1].setdefault(which, []).append((index, path, info))
    for target, (converter, groups) in merged.items():
        found[target] = (None, MergedTensor.build(target, converter, groups))
    return found


@dataclass(frozen=True)
class MergedTensor:
    """A parameter stored as one 2-D tensor per expert (and per source pattern): the experts
    stacked on a new dim 0, then, if ``concat_dim`` is set, the patterns' stacks concatenated
    along it (transformers' MergeModulelist(dim=0) and Concatenate). It reads any slice of the
    whole by reading only the matching parts of the stored tensors."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: tuple[tuple[tuple[Path, TensorInfo], ...], ...]  # [pattern][expert]
    concat_dim: int | None

    @classmethod
    def build(cls, target: str, converter: Any, groups: dict[int, list[tuple[int, Path, TensorInfo]]]) -> "MergedTensor":
        ops = [type(op).__name__ for op in converter.operations]
        concat = converter.operations[1].dim if ops == ["MergeModulelist", "Concatenate"] else None
        if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) \
                or converter.operations[0].dim != 0 or concat not in (None, 1, 2):
            raise CheckpointError(f"checkpoint tensors for '{target}' must be converted ({ops}) before this model "
                                  "can use them, which autotp cannot do while streaming; load the model with "
                                  "transformers and call autotp.save_sharded(model, ...) instead")
        parts = []
        for which in sorted(groups):
            experts = sorted(groups[which], key=lambda item: item[0])
            if [i for i, _, _ in experts] != list(range(len(experts))):
                raise CheckpointError(f"the experts stored for '{target}' are numbered {[i for i, _, _ in experts]}, "
                                      "not 0 .. n-1; is the checkpoint complete?")
            parts.append(tuple((path, info) for _, path, info in experts))
        first = parts[0][0][1]
        if len({len(p) for p in parts}) != 1 or any(info.dtype != first.dtype or len(info.shape) != 2
                                                    for p in parts for _, info in p):
            raise CheckpointError(f"the tensors stored for '{target}' differ in expert count, dtype or rank; "
                                  "is the checkpoint complete?")
        shape = [len(parts[0]), *first.shape]
        if concat is not None:
            shape[concat] = sum(p[0][1].shape[concat - 1] for p in parts)
        return cls(target, first.dtype, tuple(shape), tuple(parts), concat)

    def read(self, dim: int | None, ranges: list[tuple[int, int]] | None) -> torch.Tensor:
        """The [start, stop) blocks of the whole along ``dim`` (all of it when None)."""
        experts = range(self.shape[0]) if dim != 0 else [e for a, b in ranges for e in range(a, b)]
        inner = None if dim in (None, 0) else dim - 1  # the dim of each stored 2-D tensor
        stacked = []
        for e in experts:
            pieces = []
            if self.concat_dim is not None and dim == self.concat_dim:  # cut across the concatenated parts
                bounds, at = [], 0
                for part in self.parts:
                    size = part[e][1].shape[inner]
                    bounds.append((at, at + size, part[e]))
                    at += size
                for a, b in ranges:
                    for lo, hi, (path, info) in bounds:
                        if max(a, lo) < min(b, hi):
                            pieces.append(_read(path, info, inner, [(max(a, lo) - lo, min(b, hi) - lo)]))
            else:
                pieces = [_read(path, info, inner, ranges if inner is not None else None)
                          for path, info in (part[e] for part in self.parts)]
            axis = 0 if self.concat_dim is None else self.concat_dim - 1
            stacked.append(torch.cat(pieces, dim=axis) if len(pieces) > 1 else pieces[0])
        return torch.stack(stacked)


def _read(path: Path, info: TensorInfo, dim: int | None, ranges) -> torch.Tensor:
    with open(path, "rb") as handle:
        return read_slice(handle, info, dim, ranges)


def read_source(handles: dict, path: Path | None, info: Any, dim: int | None, ranges) -> torch.Tensor:
    """This rank's slice of a source tensor: a stored one (``handles`` holds open files by
    path) or a MergedTensor."""
    if isinstance(info, MergedTensor):
        return info.read(dim, ranges)
    return read_slice(handles[path], info, dim, ranges)


def _key_renamer(model: nn.Module):
    """checkpoint key -> (model key, converter or None, which of its source patterns, expert
    index), with transformers' own renaming rules for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()

    def rename(key: str):
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if pattern is None:
            return new, None, 0, 0
        converter = next(c for c in converters if pattern in c.source_patterns)
        which = converter.source_patterns.index(pattern)
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        if match is None or not match.groups():
            raise CheckpointError(f"checkpoint tensor '{key}' must be converted ({converter}) before this model can "
                                  "use it, which autotp cannot do while streaming; load the model with "
                                  "transformers and call autotp.save_sharded(model, ...) instead")
        return new, converter, which, int(match.group(1))

    return rename


def check_keys(model_keys: set[str], source_keys: set[str], directory: Path) -> None:
    missing = sorted(model_keys - source_keys)
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}; "
                              "is this the checkpoint of this config's architecture?")
