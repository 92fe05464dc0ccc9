"""Choosing the all-reduce: shared memory between the ranks of one host, else torch.distributed.

``Runtime.comm`` (``AUTOTP_COMM``) picks the side:
  ``auto`` (default)  shared memory when every rank of the group is on this host and has the
                      C++ extension loaded, else torch.distributed (gloo on CPU);
  ``shm``             shared memory, and an error naming the cause where it cannot be used;
  ``torch``           always torch.distributed.

``Runtime.comm_timeout_s`` (``AUTOTP_COMM_TIMEOUT``, default 300 s, the same as
``init_distributed``'s) bounds how
long a rank waits in a shared-memory all-reduce for the others; a rank whose process exits is
noticed within 0.1 s whatever the timeout. Either way the waiting ranks raise instead of hanging.

Each group gets its own segment, named ``/autotp-<pid of rank 0>-<random>``: two jobs on one
machine never collide. Rank 0 creates it, every rank maps it, and rank 0 removes the name as
soon as all have it mapped, so nothing is left in /dev/shm when the job ends, however it ends.
Segments left by a run killed between those two steps (their creator pid gone) are removed the
next time a group is made.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any

import torch.distributed as dist

from autotp import kernels
from autotp.runtime import ENV_NAMES, Runtime
from autotp.util import pid_alive

ENV = ENV_NAMES["comm"]
SLOT_BYTES = 4 << 20  # per rank and buffer: larger tensors go in chunks of this size
PREFIX = "autotp-"


def host_id(runtime: Runtime) -> str:
    """Identifies this machine (boot) so that ranks can tell they share memory.
    ``Runtime.host_id`` (``AUTOTP_HOST_ID``) overrides it: ranks given different ids never use
    shared memory together (containers that share a kernel but not /dev/shm; tests that play
    several machines on one)."""
    if runtime.host_id:
        return runtime.host_id
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def remove_stale_segments(shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink autotp segments whose creating process no longer exists; returns their names."""
    removed = []
    for path in shm_dir.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def open_segment(name: str, rank: int, size: int, create: bool, runtime: Runtime) -> Any:
    """The extension's ShmComm handle for segment ``name`` (created by the one rank passing
    ``create``); the reduction is portable code when ``runtime`` asks for it
    (``comm_portable``, or ``isa="generic"``)."""
    import torch

    isa = "generic" if runtime.comm_portable else kernels.isa(runtime)
    return torch.classes.autotp.ShmComm(name, rank, size, SLOT_BYTES, create, float(runtime.comm_timeout_s), isa)


def connect(process_group: Any, rank: int, size: int, runtime: Runtime) -> Any | None:
    """A shared-memory all-reduce for the group, or None for torch.distributed. Collective:
    every rank of the group calls it at the same point."""
    chosen = runtime.comm
    if chosen == "torch" or size == 1:
        return None
    facts = [None] * size
    dist.all_gather_object(facts, (host_id(runtime), kernels.extension_loaded(runtime)), group=process_group)
    hosts = {h for h, _ in facts}
    without = [r for r, (_, ok) in enumerate(facts) if not ok]
    if len(hosts) > 1 or without:
        if chosen == "shm":
            why = (f"the ranks run on {len(hosts)} hosts" if len(hosts) > 1 else
                   f"ranks {without} could not load the C++ extension")
            raise RuntimeError(f"autotp: {ENV}=shm but {why}; unset {ENV} to use torch.distributed")
        return None
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    handle, error = None, ""
    offer: list[Any] = [None]
    if rank == 0:
        remove_stale_segments()
        name = f"/{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            handle = open_segment(name, 0, size, True, runtime)
        except Exception as exc:
            error = str(exc)
        offer = [(name, error)]
    dist.broadcast_object_list(offer, src=src, group=process_group)
    name, error = offer[0]
    if rank != 0 and not error:
        try:
            handle = open_segment(name, rank, size, False, runtime)
        except Exception as exc:
            error = str(exc)
    errors = [None] * size
    dist.all_gather_object(errors, error, group=process_group)
    if rank == 0 and handle is not None:
        handle.unlink()  # every rank has it mapped (or failed): the name is no longer needed
    dist.barrier(group=process_group)  # so no rank returns while the name still exists
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        if chosen == "shm":
            raise RuntimeError(f"autotp: {ENV}=shm but rank {failed[0][0]} could not map the "
                               f"shared-memory segment: {failed[0][1]}")
        return None
    return handle
