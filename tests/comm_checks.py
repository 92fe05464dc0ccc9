"""Rank-side checks of the shared-memory collectives (tests/test_comm.py): all-reduce against
gloo and the exact sum, all-gather against the concatenation, a peer that dies or stalls."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import autotp


def shm_against_gloo(rank: int, world_size: int, sizes: list[int], repeats: int, portable: bool = False) -> dict:
    """SHM all-reduce on two groups used alternately, against gloo and the exact sum. Values are
    multiples of 1/8 below 16 in magnitude: exact in bf16, and their fp32 sums are exact."""
    from pathlib import Path

    from autotp.comm import TPGroup

    runtime = autotp.Runtime.from_env().replace(comm="shm", comm_portable=portable)
    groups = [TPGroup.from_torch(world_size, runtime=runtime), TPGroup.from_torch(world_size, runtime=runtime)]
    names = [g.shm.name() for g in groups]
    left_in_dev_shm = [n for n in names if (Path("/dev/shm") / n.lstrip("/")).exists()]
    gen = torch.Generator().manual_seed(rank)
    cases = []
    for i, n in enumerate(sizes):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randint(-127, 128, (n,), generator=gen) / 8).to(dtype)
            exact = x.double()
            dist.all_reduce(exact)
            gloo = x.clone()
            dist.all_reduce(gloo)
            got = groups[i % 2].all_reduce(x.clone())
            kept = x.clone()  # the op (what a compiled step calls) sums into a new tensor, x only read
            op = torch.ops.autotp.shm_all_reduce(x, groups[(i + 1) % 2].shm_key)
            cases.append({"n": n, "dtype": str(dtype), "exact": torch.equal(got, exact.to(dtype)),
                          "op_exact": torch.equal(op, exact.to(dtype)), "op_input_kept": torch.equal(x, kept),
                          "gloo_equal": torch.equal(got, gloo),
                          "gloo_max_rel": ((got.double() - gloo.double()).abs().max()
                                           / exact.abs().max().clamp_min(1)).item()})
    in_a_row = True
    autotp.kernels.op_clock(True)  # the op clock counts each of these calls as a collective
    for i in range(repeats):  # many small calls in a row, alternating groups
        x = torch.full((33 + i,), float(rank + i % 50), dtype=torch.bfloat16 if i % 3 else torch.float32)
        want = sum(r + i % 50 for r in range(world_size))  # integers below 256: exact in bf16
        in_a_row &= bool((groups[i % 2].all_reduce(x) == want).all())
    clock = autotp.kernels.op_clock(False)
    return {"backends": [g.backend for g in groups], "cases": cases, "in_a_row": in_a_row,
            "left_in_dev_shm": left_in_dev_shm, "clock": clock}


def shm_all_gather(rank: int, world_size: int) -> dict:
    """The shared-memory all-gather along the last dim against the concatenation of every rank's
    part (each rank rebuilds all parts from their seeds), bit for bit (negative zeros included),
    for uneven and empty parts, leading dims, rows spread over several 4 MiB slot chunks, a row
    wider than a slot (the summed fallback), interleaved with all-reduces; and the parts
    concatenated in another order, which must differ (negative control)."""
    from autotp.comm import TPGroup

    group = TPGroup.from_torch(world_size, runtime=autotp.Runtime.from_env().replace(comm="shm"))

    def part(r: int, lead: tuple, width: int, dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * r + width)
        x = torch.randn(*lead, width, generator=gen).to(dtype)
        x[..., ::7] = -0.0  # a sum would make these +0.0
        return x

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    cases = []
    shapes = [((3,), [5, 3, 0, 7]), ((2, 1), [16000, 16000, 15999, 16001]), ((1100,), [1000, 999, 1000, 3]),
              ((2,), [(4 << 20) // 4 + 5] * 4)]
    for lead, widths in shapes:
        sizes = widths[:world_size]
        for dtype in (torch.float32, torch.bfloat16):
            parts = [part(r, lead, sizes[r], dtype) for r in range(world_size)]
            got = group.all_gather_last_dim(parts[rank], sizes)
            group.all_reduce(torch.ones(9))  # the slots' sequence stays shared with the all-reduce
            want = torch.cat(parts, dim=-1)
            other = torch.cat(parts[::-1], dim=-1)
            fallback = max(sizes) * parts[0].element_size() > (4 << 20)
            cases.append({"lead": lead, "sizes": sizes, "dtype": str(dtype), "fallback": fallback,
                          "shape_ok": got.shape == want.shape,
                          "equal": torch.equal(got, want),
                          "bits_equal": got.shape == want.shape and torch.equal(bits(got), bits(want)),
                          "other_differs": not torch.equal(got, other) if got.shape == other.shape else True})
    return {"backend": group.backend, "cases": cases}


def shm_peer_fails(rank: int, world_size: int, victim: int, how: str) -> dict | None:
    """One rank exits (or stalls) after 20 all-reduces; the others must raise, not hang."""
    import time

    from autotp.comm import TPGroup

    runtime = autotp.Runtime.from_env().replace(comm="shm", comm_timeout_s=3)
    group = TPGroup.from_torch(world_size, runtime=runtime)
    x = torch.ones(1000)
    for _ in range(20):
        group.all_reduce(x.fill_(1.0))
    if rank == victim:
        if how == "exit":
            os.kill(os.getpid(), 9)  # killed: no cleanup, no exit handlers
        time.sleep(8)
        return None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 60:
            group.all_reduce(x.fill_(1.0))
    except RuntimeError as exc:
        error = str(exc)
    else:
        error = None
    return {"error": error, "seconds": time.monotonic() - start}
