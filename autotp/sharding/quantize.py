"""Weight-only INT8 of the parallel Linear layers, made from each rank's shard of the plan.

Scales belong to the whole weight: one per output row and group of G input columns of the
unsharded layer. A column-parallel shard keeps whole rows, so quantizing it is quantizing its
rows. A row-parallel shard keeps columns [k0, k1), which may start or end inside a group; it
quantizes the columns of every group it touches (at most G - 1 more on each side), keeps its
own, and records k0 % G as the group offset the INT8 kernel reads. Either way the rank holds
exactly the slice of the quantized whole: quantize-then-shard equals shard-then-quantize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from autotp import kernels
from autotp.plan import Entry, Ranges, ShardingError, Style

SCHEMES = ("int8",)
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class Int8Shard:
    """This rank's INT8 weight [N_local, K_local], its scales [N_local, KG] and their grouping."""
    q: torch.Tensor
    scales: torch.Tensor
    group_size: int
    group_offset: int


def check_scheme(quantize: str | None, group_size: int) -> None:
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"autotp: quantize={quantize!r} is not a scheme autotp knows; pass one of {SCHEMES} "
                         "or None")
    if group_size < 0:
        raise ValueError(f"autotp: quant_group_size must be a number of input columns (0: one scale per "
                         f"output row), got {group_size}")


def quantize_shard(weight: torch.Tensor, entry: Entry | None, ranges: Ranges, group_size: int) -> Int8Shard:
    """This rank's INT8 shard of the full ``weight`` [N, K] under the plan ``entry`` (None: the
    layer is not split) with ``ranges`` the rank's blocks; ``group_size`` 0 means whole rows."""
    n, k = weight.shape
    g = group_size or max(k, 1)
    style = entry.style if entry is not None else None
    if style == Style.ROW:
        if len(ranges) != 1:
            raise ShardingError(f"INT8 quantization of '{entry.name}': this rank keeps {len(ranges)} separate "
                                "blocks of its input columns; the INT8 kernel takes one contiguous range. "
                                "Leave this layer unquantized or shard on fewer ranks")
        (k0, k1), = ranges
        first, last = k0 // g, -(-k1 // g)
        q, s = kernels.quantize_int8(weight[:, first * g:min(k, last * g)], g)
        return Int8Shard(q[:, k0 - first * g:k1 - first * g].contiguous(), s, g, k0 % g)
    rows = weight if style is None else torch.cat([weight[a:b] for a, b in ranges])
    q, s = kernels.quantize_int8(rows, g)
    return Int8Shard(q, s, g, 0)
