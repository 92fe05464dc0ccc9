"""Shard math: uneven splits on whole units, head assignment with grouped-query attention.

Everything here is pure Python on integers, so it is tested without processes.
"""
from __future__ import annotations

from dataclasses import dataclass

from autotp.plan import Ranges


def split_sizes(total: int, world_size: int) -> list[int]:
    """Split ``total`` whole units over ``world_size`` ranks, earlier ranks taking the extra
    (8 on 3 -> [3, 3, 2])."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def contiguous(sizes: list[int]) -> list[tuple[int, int]]:
    """[3, 3, 2] -> [(0, 3), (3, 6), (6, 8)]."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def unit_ranges(units: list[int], unit: int) -> Ranges:
    """Indices of whole units (heads) -> merged element ranges of ``unit`` elements each."""
    ranges: Ranges = []
    for u in units:
        start, stop = u * unit, (u + 1) * unit
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def merge_ranges(ranges: Ranges) -> Ranges:
    """Join blocks that touch, keeping their order: [(0, 4), (4, 8), (16, 20)] -> [(0, 8), (16, 20)]."""
    merged: Ranges = []
    for start, stop in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


@dataclass(frozen=True)
class HeadAssignment:
    """Which query heads and which key/value heads each rank computes.

    ``kv_heads[r]`` may repeat a head (replication when KV heads are fewer than ranks or a
    rank's query heads straddle KV groups unevenly); ``groups[r]`` is how many local query
    heads share one local KV head, the value ``num_key_value_groups`` takes on rank r.
    """

    q_heads: list[list[int]]
    kv_heads: list[list[int]]
    groups: list[int]


def assign_heads(num_heads: int, num_kv_heads: int, world_size: int) -> HeadAssignment:
    """Split attention heads on whole heads over ranks, keeping each query head with its KV head."""
    if world_size > num_heads:
        raise ValueError(
            f"world_size {world_size} is larger than the number of attention heads ({num_heads}): "
            f"heads are split whole, so use a world size of at most {num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} key/value heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:
        # whole KV groups per rank: each rank's query heads share its own KV heads
        kv_spans = contiguous(split_sizes(num_kv_heads, world_size))
        kv = [list(range(a, b)) for a, b in kv_spans]
        q = [list(range(a * group, b * group)) for a, b in kv_spans]
        return HeadAssignment(q, kv, [group] * world_size)
    q_spans = contiguous(split_sizes(num_heads, world_size))
    q_heads, kv_heads, groups = [], [], []
    for a, b in q_spans:
        needed = [h // group for h in range(a, b)]
        runs = _run_lengths(needed)
        if len(set(runs)) == 1:
            kv_heads.append(sorted(set(needed)))
            groups.append(runs[0])
        else:  # uneven straddle: one KV copy per query head
            kv_heads.append(needed)
            groups.append(1)
        q_heads.append(list(range(a, b)))
    return HeadAssignment(q_heads, kv_heads, groups)


def _run_lengths(values: list[int]) -> list[int]:
    runs: list[int] = []
    for i, v in enumerate(values):
        if i and values[i - 1] == v:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs
