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
from typing import Any, Callable

import torch

from autotp import kernels
from autotp.plan import CUT_DIMS, CheckpointError, Entry, Plan, Ranges, ShardingError, Style

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


@dataclass(frozen=True)
class QuantScheme:
    """How the column- and row-parallel weights are quantized: the scheme (``int8``: symmetric,
    weight-only) and ``group_size``, the input columns of the whole weight that share one scale
    (0: one scale per output row). The one value ``autotp.shard``, the checkpoint writer and both
    loaders use: it gives each rank's layout, makes its shard, and is what autotp.json records."""

    name: str = "int8"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"autotp: quantize={self.name!r} is not a scheme autotp knows; pass one of {SCHEMES} "
                             "or None")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 0:
            raise ValueError(f"autotp: quant_group_size must be a number of input columns (0: one scale per "
                             f"output row), got {self.group_size!r}")

    @classmethod
    def parse(cls, quantize: str | None, group_size: int | None = None) -> "QuantScheme | None":
        """The scheme the public arguments ``quantize`` / ``quant_group_size`` ask for (None:
        unquantized; ``group_size`` None takes the default). A group size without a scheme is
        an error."""
        if quantize is None:
            if group_size is not None:
                raise ValueError("autotp: quant_group_size was given without quantize; pass quantize='int8' too")
            return None
        return cls(quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size)

    # -- which layers, which shapes ------------------------------------------------------
    @staticmethod
    def entries(plan: Plan) -> dict[str, Entry]:
        """The plan entries whose Linear weights are quantized: the column- and row-parallel
        modules (the lm_head, embeddings and sharded norms keep their dtype, and so do expert
        tensors, which the model's own forward multiplies)."""
        return {name: e for name, e in plan.entries.items()
                if e.style in (Style.COLUMN, Style.ROW) and not e.is_param and e.norm_width is None}

    def layout(self, shape: tuple[int, ...], entry: Entry | None, ranges: Ranges) -> Int8Layout:
        """The layout of this rank's shard of a full weight of ``shape`` [N, K] as stored
        ([K, N] for a transposed entry) under the plan ``entry`` (None: the layer is not
        split), ``ranges`` the rank's blocks."""
        n, k = shape[::-1] if entry is not None and entry.transposed else shape
        g = self.group_size or max(k, 1)
        dim = CUT_DIMS[entry.style]["weight"] if entry is not None else None
        if dim == 1:
            if len(ranges) != 1:
                raise ShardingError(f"INT8 quantization of '{entry.name}': this rank keeps {len(ranges)} separate "
                                    "blocks of its input columns; the INT8 kernel takes one contiguous range. "
                                    "Leave this layer unquantized or shard on fewer ranks")
            (k0, k1), = ranges
            first, last = k0 // g, -(-k1 // g)
            start = first * g
            return Int8Layout(g, k0 % g, 1, [(start, min(k, last * g))], (k0 - start, k1 - start), (n, k1 - k0),
                              (n, last - first))
        if dim is None:
            return Int8Layout(g, 0, None, None, None, (n, k), (n, -(-k // g)))
        rows = sum(b - a for a, b in ranges)
        return Int8Layout(g, 0, 0, ranges, None, (rows, k), (rows, -(-k // g)))

    # -- the maths -------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, group_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, scales) of an [N, K] weight by this scheme's definition (kernels.quantize_int8)."""
        return kernels.quantize_int8(weight, self.group_size or None, group_offset)

    def dequantize(self, q: torch.Tensor, scales: torch.Tensor, group_offset: int = 0) -> torch.Tensor:
        """float32 Q * S: the weight the INT8 GEMM multiplies by."""
        return kernels.dequantize_int8(q, scales, self.group_size or None, group_offset)

    def quantize_slice(self, read: SliceReader, shape: tuple[int, ...], entry: Entry | None,
                       ranges: Ranges) -> Int8Shard:
        """This rank's INT8 shard, reading from the full weight (stored ``shape``) only the
        blocks its layout needs; a transposed entry's blocks are read [in, out] and turned."""
        layout = self.layout(shape, entry, ranges)
        if entry is not None and entry.transposed:
            stored = read
            read = lambda dim, blocks: stored(None if dim is None else 1 - dim, blocks).t()
        weight = read(layout.read_dim, layout.read_ranges)
        q = torch.empty(layout.q_shape, dtype=torch.int8)
        scales = torch.empty(layout.scale_shape, dtype=torch.float32)
        a, b = layout.keep or (0, weight.shape[1])
        step = max(1, (4 << 20) // max(weight.shape[1], 1))  # rows are independent: bound the fp32 temporaries
        for start in range(0, weight.shape[0], step):
            rows_q, scales[start:start + step] = kernels.quantize_int8(weight[start:start + step], layout.group_size)
            q[start:start + step] = rows_q[:, a:b]
        return Int8Shard(q, scales, layout.group_size, layout.group_offset)

    def quantize_shard(self, weight: torch.Tensor, entry: Entry | None, ranges: Ranges) -> Int8Shard:
        """This rank's INT8 shard of the full ``weight`` [N, K] as stored (see :meth:`layout`)."""
        def read(dim: int | None, blocks: Ranges | None) -> torch.Tensor:
            if dim is None:
                return weight
            return torch.cat([weight.narrow(dim, a, b - a) for a, b in blocks], dim=dim)

        return self.quantize_slice(read, tuple(weight.shape), entry, ranges)

    # -- what a checkpoint records -------------------------------------------------------------
    def to_manifest(self) -> dict[str, Any]:
        return {"scheme": self.name, "group_size": self.group_size}

    @classmethod
    def from_manifest(cls, raw: Any, where: str) -> "QuantScheme | None":
        """The scheme autotp.json's "quantization" field records (None: unquantized); anything
        malformed is a CheckpointError naming the field."""
        if raw is None:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("scheme"), str) \
                or not isinstance(raw.get("group_size"), int) or isinstance(raw.get("group_size"), bool) \
                or raw["group_size"] < 0:
            raise CheckpointError(f"{where}: field 'quantization' must be null or {{\"scheme\": str, \"group_size\": "
                                  f"int >= 0}}, got {raw!r}; re-create the checkpoint with create_shard_model")
        if raw["scheme"] not in SCHEMES:
            raise CheckpointError(f"{where} stores weights quantized as {raw['scheme']!r}, which this autotp does "
                                  f"not know (it knows {SCHEMES}); upgrade autotp")
        return cls(raw["scheme"], raw["group_size"])
