"""A Hugging Face checkpoint directory as autotp reads it: what the writer and the loader share.

Both start alike: check the directory holds a model, build the skeleton from its config in the
dtype asked for (or stored), list its safetensors tensors under the model's own names, plan on
the skeleton, and know which names are the same (tied) parameter. ``HFSource.open`` does that
once for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from autotp.checkpoint.skeleton import build_skeleton, source_tensors, stored_dtype
from autotp.checkpoint.stfile import TensorInfo
from autotp.plan import CheckpointError, Plan, Style
from autotp.policies import build_plan


@dataclass
class HFSource:
    """A Hugging Face directory: its skeleton model, its tensors (model key -> (file, info)),
    the plan for the world size asked, and the other names of each tied parameter."""

    directory: Path
    model: nn.Module
    tensors: dict[str, tuple[Path, TensorInfo]]
    plan: Plan
    aliases: dict[str, list[str]]

    @classmethod
    def open(cls, directory: Path, world_size: int, dtype: torch.dtype | None,
             overrides: Mapping[str, str | Style] | None, fuse_allreduce: bool,
             experts: str = "tensor") -> "HFSource":
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is not a model directory: it has neither autotp.json nor "
                                  "config.json; pass a Hugging Face checkpoint directory or one written by "
                                  "create_shard_model")
        model = build_skeleton(directory, dtype or stored_dtype(directory))
        tensors = source_tensors(directory, model)
        plan = build_plan(model, world_size, overrides, fuse_allreduce=fuse_allreduce, experts=experts)
        return cls(directory, model, tensors, plan, tie_aliases(model))

    def find(self, key: str) -> str | None:
        """The name under which the checkpoint stores model key ``key`` (itself, or a tied
        parameter's other name), None when it is not stored."""
        if key in self.tensors:
            return key
        return next((a for a in self.aliases.get(key, ()) if a in self.tensors), None)


def tie_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same (tied) parameter."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [m for m in group if m != n] for group in names.values() for n in group}
