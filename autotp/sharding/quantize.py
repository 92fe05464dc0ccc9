"""Weight-only INT8 of the parallel Linear layers, made from each rank's shard of the plan.

Scales belong to the whole weight: one per output row and group of G input columns of the
unsharded layer. A column-parallel shard keeps whole rows, so quantizing it is quantizing its
rows. A row-parallel shard keeps columns [k0, k1), which may start or end inside a group; it
quantizes the columns of every group it touches (at most G - 1 more on each side), keeps its
own, and records k0 % G as the group offset the INT8 kernel reads. Either way the rank holds
exactly the slice of the quantized whole: quantize-then-shard equals shard-then-quantize.

The same layout serves the online path (``autotp.shard``), the offline sharder (which reads
only the columns a rank's groups need) and the loaders (which set up empty INT8 layers of the
right shapes before the stored values arrive).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from autotp import kernels
from autotp.plan import Entry, Plan, Ranges, ShardingError, Style
from autotp.sharding.stfile import CheckpointError

SCHEMES = ("int8",)
DEFAULT_GROUP_SIZE = 128
SCALE_SUFFIX = "_scale"  # a quantized layer's scales sit beside its weight: "<module>.weight_scale"

# (dim, ranges) -> those blocks of the full weight, concatenated (dim None: all of it)
SliceReader = Callable[[int | None, Ranges | None], torch.Tensor]


@dataclass(frozen=True)
class Int8Shard:
    """This rank's INT8 weight [N_local, K_local], its scales [N_local, KG] and their grouping."""
    q: torch.Tensor
    scales: torch.Tensor
    group_size: int
    group_offset: int


@dataclass(frozen=True)
class Int8Layout:
    """Where a rank's INT8 shard comes from and what shapes it has.

    The rank quantizes the blocks ``read_ranges`` along ``read_dim`` of the full weight (None:
    all of it) and keeps columns ``keep`` of the result (None: all)."""
    group_size: int
    group_offset: int
    read_dim: int | None
    read_ranges: Ranges | None
    keep: tuple[int, int] | None
    q_shape: tuple[int, int]
    scale_shape: tuple[int, int]

    def empty(self, device: str | torch.device = "meta") -> Int8Shard:
        """An Int8Shard of this layout whose values are still to be filled (on the meta device:
        no memory)."""
        return Int8Shard(torch.empty(self.q_shape, dtype=torch.int8, device=device),
                         torch.empty(self.scale_shape, dtype=torch.float32, device=device),
                         self.group_size, self.group_offset)


def check_scheme(quantize: str | None, group_size: int) -> None:
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"autotp: quantize={quantize!r} is not a scheme autotp knows; pass one of {SCHEMES} "
                         "or None")
    if group_size < 0:
        raise ValueError(f"autotp: quant_group_size must be a number of input columns (0: one scale per "
                         f"output row), got {group_size}")


def quantized_entries(plan: Plan) -> dict[str, Entry]:
    """The plan entries whose Linear weights become INT8: the column- and row-parallel ones (the
    lm_head and embeddings keep their dtype)."""
    return {name: e for name, e in plan.entries.items() if e.style in (Style.COLUMN, Style.ROW)}


def int8_layout(shape: tuple[int, ...], entry: Entry | None, ranges: Ranges, group_size: int) -> Int8Layout:
    """The INT8 layout of this rank's shard of a full weight of ``shape`` [N, K] under the plan
    ``entry`` (None: the layer is not split) with ``ranges`` the rank's blocks; ``group_size``
    0 means one group per whole row."""
    n, k = shape
    g = group_size or max(k, 1)
    if entry is not None and entry.style == Style.ROW:
        if len(ranges) != 1:
            raise ShardingError(f"INT8 quantization of '{entry.name}': this rank keeps {len(ranges)} separate "
                                "blocks of its input columns; the INT8 kernel takes one contiguous range. "
                                "Leave this layer unquantized or shard on fewer ranks")
        (k0, k1), = ranges
        first, last = k0 // g, -(-k1 // g)
        start = first * g
        return Int8Layout(g, k0 % g, 1, [(start, min(k, last * g))], (k0 - start, k1 - start), (n, k1 - k0),
                          (n, last - first))
    if entry is None:
        return Int8Layout(g, 0, None, None, None, (n, k), (n, -(-k // g)))
    rows = sum(b - a for a, b in ranges)
    return Int8Layout(g, 0, 0, ranges, None, (rows, k), (rows, -(-k // g)))


def quantize_slice(read: SliceReader, shape: tuple[int, ...], entry: Entry | None, ranges: Ranges,
                   group_size: int) -> Int8Shard:
    """This rank's INT8 shard, reading from the full weight only the blocks its layout needs."""
    layout = int8_layout(shape, entry, ranges, group_size)
    weight = read(layout.read_dim, layout.read_ranges)
    q = torch.empty(layout.q_shape, dtype=torch.int8)
    scales = torch.empty(layout.scale_shape, dtype=torch.float32)
    a, b = layout.keep or (0, weight.shape[1])
    step = max(1, (4 << 20) // max(weight.shape[1], 1))  # rows are independent: bound the fp32 temporaries
    for start in range(0, weight.shape[0], step):
        rows_q, scales[start:start + step] = kernels.quantize_int8(weight[start:start + step], layout.group_size)
        q[start:start + step] = rows_q[:, a:b]
    return Int8Shard(q, scales, layout.group_size, layout.group_offset)


def quantize_shard(weight: torch.Tensor, entry: Entry | None, ranges: Ranges, group_size: int) -> Int8Shard:
    """This rank's INT8 shard of the full ``weight`` [N, K] (see :func:`int8_layout`)."""
    def read(dim: int | None, blocks: Ranges | None) -> torch.Tensor:
        if dim is None:
            return weight
        return torch.cat([weight.narrow(dim, a, b - a) for a, b in blocks], dim=dim)

    return quantize_slice(read, tuple(weight.shape), entry, ranges, group_size)


def manifest_entry(quantize: str | None, group_size: int) -> dict[str, Any] | None:
    """What autotp.json records of a checkpoint's quantization (None: not quantized)."""
    return None if quantize is None else {"scheme": quantize, "group_size": group_size}


def stored_scheme(manifest: Mapping[str, Any], directory: Any, quantize: str | None,
                  group_size: int | None) -> int | None:
    """The INT8 group size to load a pre-sharded checkpoint with (None: not quantized), after
    checking that what the caller asks for is what the checkpoint stores."""
    stored = manifest.get("quantization")
    if stored is not None and stored.get("scheme") not in SCHEMES:
        raise CheckpointError(f"{directory} stores weights quantized as {stored.get('scheme')!r}, which this "
                            f"autotp does not know (it knows {SCHEMES}); upgrade autotp")
    if quantize is None:
        return None if stored is None else stored["group_size"]
    if stored is None:
        raise CheckpointError(f"{directory} stores unquantized weights split for {manifest['world_size']} ranks; a "
                            "row-parallel rank's file lacks the columns its INT8 groups need, so it cannot be "
                            f"quantized at load time. Re-create it with create_shard_model --quantize {quantize}, "
                            "or load the Hugging Face checkpoint directory with quantize=")
    if group_size is not None and group_size != stored["group_size"]:
        raise CheckpointError(f"{directory} stores INT8 weights with group size {stored['group_size']}, not "
                            f"{group_size}; load it without quant_group_size, or re-create it with "
                            f"create_shard_model --quantize int8 --quant-group-size {group_size}")
    return stored["group_size"]
