"""The tensor-parallel group: rank, size and the collectives the parallel layers need.

One TPGroup is made at the entry point (``autotp.shard``) and handed to every parallel
layer. Its all-reduce runs through shared memory when the ranks share a host, else
torch.distributed (``autotp.comm.shm`` decides, once, when the group is made).
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from autotp.comm import shm
from autotp.runtime import Runtime, missing_launch_variables, resolve


def _settle_at_exit(ref: "weakref.ref[TPGroup]") -> None:
    """At exit, before the interpreter shuts down: let the group's latest collective settle."""
    group = ref()
    if group is not None:
        group.settle()


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> None:
    """Bring up torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); gloo on CPU. A no-op when a process group already exists."""
    if dist.is_initialized():
        return
    missing = missing_launch_variables()
    if missing:
        raise RuntimeError(
            f"autotp.init_distributed: environment variables {missing} are not set; start the "
            "script with torchrun (or autotp-run), or call torch.distributed.init_process_group yourself")
    dist.init_process_group(backend=backend or "gloo", timeout=datetime.timedelta(seconds=timeout_s))


_KEYS = itertools.count()
_GROUPS: "weakref.WeakValueDictionary[int, TPGroup]" = weakref.WeakValueDictionary()


@torch.library.custom_op("autotp::all_reduce", mutates_args=())
def _all_reduce_op(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """The group's all-reduce as one opaque op for torch.compile: a compiled graph calls it
    without breaking (its eager body is the group's own, on a copy)."""
    return _GROUPS[group]._all_reduce(tensor.contiguous().clone())


@_all_reduce_op.register_fake
def _(tensor: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


@torch.library.custom_op("autotp::all_gather_last_dim", mutates_args=())
def _all_gather_op(tensor: torch.Tensor, group: int, sizes: list[int]) -> torch.Tensor:
    """The group's all-gather along the last dim, opaque to torch.compile like ``all_reduce``."""
    return _GROUPS[group]._all_gather_last_dim(tensor, sizes)


@_all_gather_op.register_fake
def _(tensor: torch.Tensor, group: int, sizes: list[int]) -> torch.Tensor:
    return tensor.new_empty((*tensor.shape[:-1], sum(sizes)))


@dataclass
class TPGroup:
    """Rank and size of one tensor-parallel group, and its collectives."""

    tp_rank: int
    tp_size: int
    process_group: Any = None
    shm: Any = None  # the extension's ShmComm when the ranks share a host (autotp.comm.shm)
    # the tensors of the latest torch.distributed collective, referenced until the next one
    # (and, at exit, until the backend lets go of them: see settle)
    in_flight: tuple = field(default=(), repr=False, compare=False)
    # how a compiled graph names this group to the collectives' custom ops
    key: int = field(default=-1, repr=False, compare=False)
    shm_key: int = field(default=-1, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = next(_KEYS)
        _GROUPS[self.key] = self
        self.shm_key = self.shm.id() if self.shm is not None else -1

    def settle(self, timeout_s: float = 1.0) -> None:
        """Wait until torch.distributed's worker threads hold no reference to the tensors of
        this group's latest collective, then drop ours. gloo's worker lets go of a finished
        collective's tensors a moment after the caller resumes; if Python had already freed
        them, that last release must take the GIL to free their Python objects, and a worker
        doing so while the interpreter shuts down aborts the process ("terminate called
        without an active exception") after all its work is done. Holding the tensors (the
        in_flight field) and settling at exit (registered by ``from_torch``, which makes groups
        over torch.distributed) keeps the last release Python's."""
        deadline = time.monotonic() + timeout_s
        while any(t._use_count() > 1 for t in self.in_flight) and time.monotonic() < deadline:
            time.sleep(0.001)  # releases the GIL
        self.in_flight = ()

    @property
    def backend(self) -> str:
        """"shm" or "torch": what ``all_reduce`` runs on."""
        return "shm" if self.shm is not None else "torch"

    @classmethod
    def from_torch(cls, world_size: int, process_group: Any = None, runtime: Runtime | None = None) -> "TPGroup":
        """The group of the running process, checked against the world size the caller expects;
        its all-reduce is chosen by ``runtime`` (``Runtime.comm``, see autotp.comm.shm)."""
        if world_size == 1 and not dist.is_initialized():
            return cls(0, 1, None)
        if not dist.is_initialized():
            raise RuntimeError(
                f"autotp.shard(world_size={world_size}) needs a torch.distributed process group; "
                "call autotp.init_distributed() first (under torchrun or autotp-run)")
        size = dist.get_world_size(process_group)
        if size != world_size:
            raise ValueError(
                f"autotp.shard was asked for world_size={world_size} but the process group has "
                f"{size} ranks; pass world_size={size} or launch {world_size} processes")
        rank = dist.get_rank(process_group)
        group = cls(rank, size, process_group, shm.connect(process_group, rank, size, resolve(runtime)))
        atexit.register(_settle_at_exit, weakref.ref(group))
        return group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group and return it: in place, except under torch.compile
        (there one custom op returns the sum in a new tensor)."""
        if self.tp_size == 1:
            return tensor
        if torch.compiler.is_compiling():  # one op each, so that the graph does not break
            if self.shm is not None and tensor.dtype in (torch.float32, torch.bfloat16):
                return torch.ops.autotp.shm_all_reduce(tensor, self.shm_key)
            return torch.ops.autotp.all_reduce(tensor, self.key)
        return self._all_reduce(tensor)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.shm is not None and tensor.dtype in (torch.float32, torch.bfloat16) and tensor.is_contiguous():
            return torch.ops.autotp.shm_all_reduce_(tensor, self.shm_key)  # an op: cheaper than the class's method
        dist.all_reduce(tensor, group=self.process_group)
        self.in_flight = (tensor,)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's ``tensor`` along the last dim; rank r holds ``sizes[r]``
        columns (uneven sizes are padded for the collective and trimmed after)."""
        if self.tp_size == 1:
            return tensor
        if self.shm is not None and tensor.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.autotp.shm_all_gather_last_dim(tensor, self.shm_key, list(sizes))
        if torch.compiler.is_compiling():
            return torch.ops.autotp.all_gather_last_dim(tensor, self.key, list(sizes))
        return self._all_gather_last_dim(tensor, sizes)

    def _all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        width = max(sizes)
        pad = width - tensor.shape[-1]
        send = torch.nn.functional.pad(tensor, (0, pad)) if pad else tensor.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.tp_size)]
        dist.all_gather(parts, send, group=self.process_group)
        self.in_flight = (send, *parts)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
