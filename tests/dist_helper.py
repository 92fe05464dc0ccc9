"""The one helper for multi-rank tests: spawn ranks, gloo on a free loopback port, one thread
each; every rank's result or traceback comes back to the parent, and a rank that hangs or
dies fails the test instead of hanging it."""
from __future__ import annotations

import functools
import gc
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preloaded() -> list[str]:
    """What the fork server imports once, so that each rank starts without seconds of imports:
    torch, transformers, autotp, the checks and the modeling code of every family in the zoo.
    Nothing here starts a thread or loads the C++ extension (forking after OpenMP started is
    unsafe): each rank loads the extension itself."""
    import zoo

    types = sorted({c["model_type"] for c in zoo.CONFIGS.values()})
    return ["rank_checks", "comm_checks", *[f"transformers.models.{t}.modeling_{t}" for t in types]]


@functools.cache
def _context() -> Any:
    """Ranks fork from a server that preloaded the heavy imports where the platform has one;
    a plain spawn elsewhere. Either way a rank is a fresh process with the parent's environment
    as it is at the call (passed along, since the server's own is that of its start)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preloaded())
    return ctx


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any,
           environ: dict[str, str]) -> None:
    gc.freeze()  # the imported modules are never garbage: full collections (shard() runs one) skip them
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        import autotp
        autotp.init_distributed(timeout_s=TIMEOUT_S)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # sent to the parent, which fails the test with it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, may_exit: tuple[int, ...] = ()) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return results by rank.

    ``fn`` must be importable (a module-level function) and return picklable values. Ranks in
    ``may_exit`` may end without a report (fault tests); their result is None."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results, environ), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    try:
        _collect(procs, results, collected, errors, may_exit)
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[r] for r in range(world_size)]


def _collect(procs: list, results: Any, collected: dict[int, Any], errors: list[str],
             may_exit: tuple[int, ...] = ()) -> None:
    """Wait for every rank's report; a rank that died without one, or a run past the timeout,
    is an error. Once one rank failed the others may be stuck in a collective: stop soon."""
    deadline = time.monotonic() + TIMEOUT_S
    while len(collected) + len(errors) < len(procs):
        if errors:
            deadline = min(deadline, time.monotonic() + 10)
        try:
            rank, status, value = results.get(timeout=1)
        except queue.Empty:
            reported = set(collected) | {int(e.split()[1].rstrip(":")) for e in errors}
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in reported]
            for r in [r for r in dead if r in may_exit]:
                collected[r] = None
            dead = [r for r in dead if r not in may_exit]
            if dead:
                time.sleep(0.5)  # a report sent just before exit may still be in flight
                if results.empty():
                    errors.append(f"rank {dead[0]}: died with exit code {procs[dead[0]].exitcode}")
            elif time.monotonic() > deadline:
                errors.append(f"rank {len(collected)}: timed out after {TIMEOUT_S}s")
                return
            continue
        if status == "ok":
            collected[rank] = value
        else:
            errors.append(f"rank {rank}:\n{value}")


def run_calls(rank: int, world_size: int, calls: list[tuple[str, str, tuple]]) -> dict[str, Any]:
    """Inside a rank: each (name, function of rank_checks, args) in turn, each with the
    environment as it found it; results by name. A failure names its check."""
    import rank_checks

    out = {}
    for name, function, args in calls:
        saved = dict(os.environ)
        try:
            out[name] = getattr(rank_checks, function)(rank, world_size, *args)
        except BaseException as exc:
            raise RuntimeError(f"check '{name}' ({function}{args}) failed on rank {rank}") from exc
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return out


class RankChecks:
    """Named checks run together: for each world size, one spawn of that many ranks runs all of
    ``table[world_size]`` ({name: (function of rank_checks, args)}) on first use, and the
    results are kept for the rest of the session. Starting ranks costs seconds of imports
    each time; the checks themselves take a fraction of that."""

    def __init__(self, table: dict[int, dict[str, tuple[str, tuple]]]) -> None:
        self.table = table
        self.runs: dict[int, list[dict[str, Any]] | BaseException] = {}

    def __call__(self, world_size: int, name: str) -> list[Any]:
        """Check ``name``'s result on each rank of the ``world_size`` run."""
        if world_size not in self.runs:
            calls = [(n, fn, args) for n, (fn, args) in self.table[world_size].items()]
            try:
                self.runs[world_size] = run_ranks(run_calls, world_size, calls)
            except AssertionError as exc:  # every check of this run fails with the same report
                self.runs[world_size] = exc
        run = self.runs[world_size]
        if isinstance(run, BaseException):
            raise AssertionError(f"the {world_size}-rank run of {sorted(self.table[world_size])} failed:\n{run}")
        return [per_rank[name] for per_rank in run]
