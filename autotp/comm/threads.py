"""An in-process group for simulated ranks running as threads (used to verify a plan
without processes). Sums are taken in rank order, so every thread gets the same result."""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from autotp.comm.group import TPGroup


class ThreadWorld:
    """Shared state of ``size`` simulated ranks: one slot per rank and a barrier."""

    def __init__(self, size: int, timeout_s: float = 60.0) -> None:
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout_s)

    def group(self, rank: int) -> "ThreadGroup":
        return ThreadGroup(tp_rank=rank, tp_size=self.size, world=self)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """Run ``fn(rank)`` for every rank in its own thread; return the results by rank. The
        first real error is raised after all threads end (a failing rank aborts the barrier,
        so the others stop waiting for it)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as exc:
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real or errors:
            raise (real or errors)[0]
        return results


class ThreadGroup(TPGroup):
    """A TPGroup whose collectives meet the other threads of the same ThreadWorld."""

    def __init__(self, tp_rank: int, tp_size: int, world: ThreadWorld) -> None:
        super().__init__(tp_rank, tp_size, None)
        self.world = world

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        world = self.world
        world.slots[self.tp_rank] = tensor.clone()
        world.barrier.wait()
        parts = list(world.slots)  # type: ignore[arg-type]
        world.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return parts  # type: ignore[return-value]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat(self._exchange(tensor), dim=-1)
