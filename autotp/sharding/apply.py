"""apply_plan: the one function that turns a model into this rank's shard of it."""
from __future__ import annotations

from copy import copy as shallow_copy
from typing import Any

import torch
from torch import nn

from autotp.comm import TPGroup
from autotp.plan import HeadSlice, Plan, ShardingError, Style
from autotp.sharding.layers import (ColumnParallelLinear, DeferredRowParallelLinear, FusedRowParallelLinear,
                                    ParallelLayer, PartialSums, RowParallelLinear, VocabParallelLMHead,
                                    make_vocab_parallel_embedding, shard_norm, take)
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
    reduced: set[str] = set()  # modules whose output is all-reduced for their parameter entries
    for entry in plan.entries.values():
        ranges = entry.ranges[rank] if entry.ranges else []
        if entry.is_param:
            _shard_parameter(model, entry, ranges, group, reduced, not share_weights)
            continue
        source = modules.get(entry.name)
        if source is None:
            raise ShardingError(f"the plan names '{entry.name}', which this model does not have; "
                                "was the plan made for another architecture?")
        if entry.norm_width is not None:
            shard_norm(source, ranges, entry.norm_width, group)
        elif entry.style in (Style.COLUMN, Style.ROW):
            layer = _linear_shard(_as_linear(source, entry), entry, ranges, group, fused, not share_weights)
            if quant is not None and source.weight.is_meta:  # a loader fills it in later
                layer.set_quantized(quant.layout(tuple(source.weight.shape), entry, ranges).empty())
            elif quant is not None:
                layer.set_quantized(quant.quantize_shard(source.weight.data, entry, ranges))
            if entry.transposed:  # checkpoints store this weight [in, out]: turned as it is loaded
                layer.register_load_state_dict_pre_hook(_turn_stored_weight)
            model.set_submodule(entry.name, layer)
        elif entry.style == Style.VOCAB and isinstance(source, nn.Embedding):
            make_vocab_parallel_embedding(source, ranges[0][0], ranges[0][1], group)
        elif entry.style == Style.VOCAB:
            sizes = [entry.local_size(r) for r in range(plan.world_size)]
            tied = model.get_submodule(entry.tied_to).weight if entry.tied_to else None
            model.set_submodule(entry.name, VocabParallelLMHead(source, ranges, sizes, group, tied))
    for edit in plan.attrs:
        _set_attr(model.get_submodule(edit.module), edit.attr, edit.values[rank])
    for experts in plan.expert_slices:
        module = model.get_submodule(experts.module)
        (start, stop), = experts.ranges[rank]
        module.num_experts = stop - start
        module._is_expert_parallel = True  # transformers' experts forwards mask "not here" rows then
        module.register_forward_pre_hook(_LocalExperts(start, stop), with_kwargs=True)
    for head_slice in plan.head_slices:
        hook = _HeadSliceHook(head_slice, rank)
        model.get_submodule(head_slice.module).register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _as_linear(source: nn.Module, entry) -> nn.Module:
    """The module as nn.Linear sees it: weight [out, in] (GPT-2's Conv1D stores it [in, out])."""
    if not entry.transposed:
        return source
    view = nn.Module()
    view.weight = nn.Parameter(source.weight.data.t(), requires_grad=False)
    view.bias = source.bias
    view.in_features, view.out_features = view.weight.shape[1], view.weight.shape[0]
    return view


def _turn_stored_weight(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a layer made from a transposed entry: a floating weight
    read from a checkpoint arrives [in, out]; INT8 values are stored as the layer holds them."""
    key = prefix + "weight"
    weight = state_dict.get(key)
    if weight is not None and weight.is_floating_point():
        state_dict[key] = weight.t()


def _shard_parameter(model: nn.Module, entry, ranges, group: TPGroup, reduced: set[str], copy: bool) -> None:
    """A parameter entry (an expert tensor): the parameter becomes this rank's slice of it; a
    ROW parameter's owner module all-reduces its output (once, whatever number it owns)."""
    owner_name, _, pname = entry.name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
        param = getattr(owner, pname)
    except AttributeError:
        raise ShardingError(f"the plan names parameter '{entry.name}', which this model does not have; "
                            "was the plan made for another architecture?") from None
    if entry.style not in (Style.COLUMN, Style.ROW):
        return
    local = take(param.data, entry.param_dim, ranges, copy)
    setattr(owner, pname, nn.Parameter(local, requires_grad=False))
    if entry.style == Style.ROW and entry.all_reduce and owner_name not in reduced:
        owner.register_forward_hook(_AllReduceOutput(group))
        reduced.add(owner_name)


class _AllReduceOutput:
    """Forward hook: the module returns partial sums of its sharded parameters; sum them."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.group.all_reduce(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.group.all_reduce(output[0]), *output[1:])
        raise ShardingError(f"autotp: {type(module).__name__} returned {type(output).__name__}, not the tensor "
                            "of partial sums its sharded parameters make; re-plan with overrides replicating them")


def _set_attr(module: nn.Module, attr: str, value: int) -> None:
    """``attr`` may be ``config.<name>``: the module then gets its own copy of its config (the
    model's config object is shared by every module and must keep the global values)."""
    if "." not in attr:
        setattr(module, attr, value)
        return
    holder, _, name = attr.partition(".")
    if not getattr(module, f"_autotp_own_{holder}", False):
        setattr(module, holder, shallow_copy(getattr(module, holder)))
        setattr(module, f"_autotp_own_{holder}", True)
    setattr(getattr(module, holder), name, value)


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


class _LocalExperts:
    """Forward pre-hook of an experts block under expert parallelism: routing indices of this
    rank's experts [start, stop) become local, the others ``stop - start`` ("not here"); the
    block then adds only its experts' share, and its output's all-reduce sums every rank's."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if len(args) > 1:
            index, put = args[1], lambda new: ((args[0], new, *args[2:]), kwargs)
        elif "top_k_index" in kwargs:
            index, put = kwargs["top_k_index"], lambda new: (args, {**kwargs, "top_k_index": new})
        else:
            raise ShardingError(f"{type(module).__name__} was called without routing indices (top_k_index), "
                                "which expert parallelism remaps per rank")
        here = (index >= self.start) & (index < self.stop)
        return put(torch.where(here, index - self.start, torch.full_like(index, self.stop - self.start)))


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
