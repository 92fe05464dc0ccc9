"""Check a plan numerically before trusting it: simulate every rank of one decoder layer in
threads, apply the plan to each copy, and compare the summed result with the unsharded layer.
This catches what the walker cannot see in labels alone, such as a norm taken across all
heads of a column-sharded activation. The layer copy gets random weights and a random input,
so the check needs only the model's structure (it works on a skeleton whose weights were never
loaded) and cannot pass by accident on zero weights."""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from autotp.comm.threads import ThreadWorld
from autotp.plan import AttrEdit, ExpertSlice, HeadSlice, Plan, ShardingError
from autotp.sharding.apply import apply_plan

# relative to the output's largest magnitude; a wrong plan errs by O(1), summation order by
# about the dtype's resolution
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def verify_plan(model: nn.Module, plan: Plan, layers_path: str, inputs: dict[str, torch.Tensor]) -> float:
    """Return the largest relative error over the simulated ranks of decoder layer 0; raise
    ShardingError when it exceeds the layer dtype's TOLERANCE. Memory: one random copy of the
    layer plus the ranks' slices of it (the rank copies share the reference's weights)."""
    layer = model.get_submodule(layers_path)[0]
    reference, args, kwargs, expected = _capture(model, layer, inputs)
    sub_plan = _sub_plan(plan, f"{layers_path}.0.")
    world = ThreadWorld(plan.world_size)
    shared = {id(p): p for p in reference.parameters()}  # cut from, never copied whole
    shards = [apply_plan(copy.deepcopy(reference, dict(shared)), sub_plan, world.group(rank), share_weights=True)
              for rank in range(plan.world_size)]

    def run(rank: int) -> Any:
        with torch.no_grad():
            return shards[rank](*args, **kwargs)

    where = f"decoder layer '{layers_path}.0' of {plan.architecture}"
    try:
        outputs = world.run(run)
    except Exception as exc:
        raise ShardingError(f"the plan fails on {where} with world_size={plan.world_size}: "
                            f"{type(exc).__name__}: {exc}. Some op reads a column-sharded "
                            "activation at its full width; replicate the affected layers with "
                            "overrides={'...': 'replicate'}") from exc
    worst = max(_rel_error(out, expected) for out in outputs)
    shards.clear()  # the rank copies go (the list itself stays: run() refers to it)
    del reference
    release_free_memory()
    tolerance = TOLERANCE.get(_first_tensor(expected).dtype, 1e-4)
    if worst > tolerance:
        raise ShardingError(
            f"the plan does not reproduce {where} on {plan.world_size} simulated ranks (relative error "
            f"{worst:.2e} > {tolerance:.0e}): some op needs the whole width of a column-sharded "
            "activation (a norm across all heads, say). Replicate the affected layers with "
            "overrides={'...': 'replicate'}, or pass verify=False at your own risk")
    return worst


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def _capture(model: nn.Module, layer: nn.Module, inputs: dict[str, torch.Tensor]):
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        keep = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t
        seen.update(args=tree_map(keep, args), kwargs=tree_map(keep, kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    gen = torch.Generator().manual_seed(0)
    args, kwargs = _randomize_hidden(seen["args"], seen["kwargs"], gen)
    reference = copy.deepcopy(layer).eval()  # a model fresh from from_config is in training mode: no dropout here
    with torch.no_grad():
        for p in reference.parameters():  # weights ~ N(0, 1/fan_in), vectors ~ 1 + N(0, 0.1)
            for rows in torch.split(torch.arange(p.shape[0]), 256):  # bounded temporary memory
                noise = torch.randn((len(rows), *p.shape[1:]), generator=gen)
                p[rows] = (noise / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.1 * noise).to(p.dtype)
        expected = reference(*args, **kwargs)
    return reference, args, kwargs, expected


def _randomize_hidden(args: tuple, kwargs: dict, gen: torch.Generator) -> tuple[tuple, dict]:
    """Replace the layer's hidden-state input (its first tensor) by N(0, 1) values."""
    if args and isinstance(args[0], torch.Tensor):
        return (torch.randn(args[0].shape, generator=gen).to(args[0].dtype), *args[1:]), kwargs
    hidden = kwargs["hidden_states"]
    return args, {**kwargs, "hidden_states": torch.randn(hidden.shape, generator=gen).to(hidden.dtype)}


def release_free_memory() -> None:
    """Hand memory freed by the simulation back to the OS (glibc keeps freed heap otherwise, and
    the weights are about to be loaded on top of it)."""
    gc.collect()  # tensors held by reference cycles (traced graphs) go first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _first_tensor(value: Any) -> torch.Tensor:
    while not isinstance(value, torch.Tensor):
        value = value[0]
    return value


def _rel_error(out: Any, expected: Any) -> float:
    got, want = _first_tensor(out), _first_tensor(expected)
    if got.shape != want.shape:
        return float("inf")
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def _sub_plan(plan: Plan, prefix: str) -> Plan:
    """The entries of one decoder layer, renamed relative to it."""
    cut = lambda name: "" if name == prefix[:-1] else name[len(prefix):]
    sub = Plan(plan.world_size, plan.architecture)
    for name, entry in plan.entries.items():
        if name.startswith(prefix) and entry.style.value in ("column", "row"):
            sub.entries[cut(name)] = dataclasses.replace(
                entry, name=cut(name), fuses=[cut(f) for f in entry.fuses],
                deferred_to=cut(entry.deferred_to) if entry.deferred_to else None)
    sub.attrs = [AttrEdit(cut(a.module), a.attr, a.values) for a in plan.attrs if a.module.startswith(prefix)]
    sub.head_slices = [HeadSlice(cut(h.module), h.kwarg, h.num_heads, h.ranges)
                       for h in plan.head_slices if h.module.startswith(prefix)]
    sub.expert_slices = [ExpertSlice(cut(x.module), x.num_experts, x.ranges)
                         for x in plan.expert_slices if x.module.startswith(prefix)]
    return sub
