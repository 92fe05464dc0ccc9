"""apply_plan: the one function that turns a model into this rank's shard of it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotp.comm import TPGroup
from autotp.plan import HeadSlice, Plan, ShardingError, Style
from autotp.sharding.layers import (ColumnParallelLinear, DeferredRowParallelLinear, FusedRowParallelLinear,
                                    ParallelLayer, PartialSums, RowParallelLinear, VocabParallelLMHead,
                                    make_vocab_parallel_embedding)
from autotp.sharding.quantize import QuantScheme


def check_not_sharded(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, ParallelLayer):
            raise ShardingError(f"this model is already sharded ('{name}' is a {type(module).__name__}); "
                                "autotp.shard must be called once, on the unsharded model")


def apply_plan(model: nn.Module, plan: Plan, group: TPGroup, share_weights: bool = False,
               quant: QuantScheme | None = None) -> nn.Module:
    """Replace every planned module of ``model`` by this rank's shard, in place. With
    ``share_weights`` the shards of Linear layers may be views of the original weights (for
    simulations that keep the original alive anyway). With ``quant`` the column- and
    row-parallel layers hold weight-only INT8 made from the full weights (autotp.sharding.quantize);
    the lm_head and embeddings keep their dtype. On a model whose parameters are on the meta
    device (the loaders'), the INT8 layers get empty meta weights and scales of their shard's
    shapes, to be assigned from a checkpoint."""
    check_not_sharded(model)
    if group.tp_size != plan.world_size:
        raise ShardingError(f"the plan is for world_size={plan.world_size} but the group has "
                            f"{group.tp_size} ranks; make the plan with world_size={group.tp_size}")
    rank = group.tp_rank
    modules = dict(model.named_modules())
    fused = {name: PartialSums() for name, e in plan.entries.items() if e.fuses}
    for entry in plan.entries.values():
        source = modules.get(entry.name)
        if source is None:
            raise ShardingError(f"the plan names '{entry.name}', which this model does not have; "
                                "was the plan made for another architecture?")
        ranges = entry.ranges[rank] if entry.ranges else []
        if entry.style in (Style.COLUMN, Style.ROW):
            layer = _linear_shard(source, entry, ranges, group, fused, not share_weights)
            if quant is not None and source.weight.is_meta:  # a loader fills it in later
                layer.set_int8(quant.layout(tuple(source.weight.shape), entry, ranges).empty())
            elif quant is not None:
                layer.set_int8(quant.quantize_shard(source.weight.data, entry, ranges))
            model.set_submodule(entry.name, layer)
        elif entry.style == Style.VOCAB and isinstance(source, nn.Embedding):
            make_vocab_parallel_embedding(source, ranges[0][0], ranges[0][1], group)
        elif entry.style == Style.VOCAB:
            sizes = [entry.local_size(r) for r in range(plan.world_size)]
            tied = model.get_submodule(entry.tied_to).weight if entry.tied_to else None
            model.set_submodule(entry.name, VocabParallelLMHead(source, ranges, sizes, group, tied))
    for edit in plan.attrs:
        setattr(model.get_submodule(edit.module), edit.attr, edit.values[rank])
    for head_slice in plan.head_slices:
        hook = _HeadSliceHook(head_slice, rank)
        model.get_submodule(head_slice.module).register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _linear_shard(source: nn.Linear, entry, ranges, group: TPGroup, fused: dict[str, PartialSums],
                  copy: bool) -> ColumnParallelLinear | RowParallelLinear:
    """The parallel layer an entry of style COLUMN or ROW makes: a row layer of a fused block
    hands its partial sum on (deferred) or reduces everyone's (the one the others defer to)."""
    if entry.style == Style.COLUMN:
        return ColumnParallelLinear(source, ranges, group, copy)
    if entry.deferred_to is not None:
        if entry.deferred_to not in fused:
            raise ShardingError(f"the plan defers '{entry.name}' to '{entry.deferred_to}', which fuses no "
                                "all-reduce in this plan; re-plan, or pass fuse_allreduce=False")
        return DeferredRowParallelLinear(source, ranges, group, fused[entry.deferred_to], copy)
    if entry.name in fused:
        return FusedRowParallelLinear(source, ranges, group, fused[entry.name], copy)
    return RowParallelLinear(source, ranges, group, copy)


class _HeadSliceHook:
    """Forward pre-hook: keep this rank's heads of a [batch * heads, ...] position bias."""

    def __init__(self, spec: HeadSlice, rank: int) -> None:
        self.kwarg, self.num_heads = spec.kwarg, spec.num_heads
        self.index = torch.tensor([h for a, b in spec.ranges[rank] for h in range(a, b)])

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        bias = kwargs.get(self.kwarg)
        if bias is None:
            raise ShardingError(f"{type(module).__name__} was called without the keyword argument "
                                f"'{self.kwarg}' that autotp slices per rank")
        rest = bias.shape[1:]
        per_head = bias.reshape(-1, self.num_heads, *rest)
        local = per_head.index_select(1, self.index.to(bias.device))
        return args, {**kwargs, self.kwarg: local.reshape(-1, *rest)}
