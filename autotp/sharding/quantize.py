"""Weight-only INT8 and INT4 of the parallel Linear layers, made from each rank's shard of the plan.

Scales belong to the whole weight: one per output row and group of G input columns of the
unsharded layer. A column-parallel shard keeps whole rows, so quantizing it is quantizing its
rows. A row-parallel shard keeps columns [k0, k1), which may start or end inside a group; it
quantizes the columns of every group it touches (at most G - 1 more on each side), keeps its
own, and records k0 % G as the group offset the kernels read. Either way the rank holds
exactly the slice of the quantized whole: quantize-then-shard equals shard-then-quantize.

INT8 (autotp.kernels.quantize_int8): "<module>.weight" int8 [N, K], "<module>.weight_scale"
fp32 [N, KG]. INT4 (autotp.kernels.int4; "int4" symmetric, "int4-asym" with zero points): the
weight as uint8 [N, ceil(K/2)], two values per byte, the scales, and for "int4-asym"
"<module>.weight_zero" uint8 [N, KG]. A row-parallel INT4 shard packs its own columns from its
first (an odd k0 does not shift the nibbles).

The same layout serves the online path (``autotp.shard``), the offline sharder (which reads
only the columns a rank's groups need) and the loaders (which set up empty quantized layers of the
right shapes before the stored values arrive).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from autotp import kernels
from autotp.plan import CUT_DIMS, CheckpointError, Entry, Plan, Ranges, ShardingError, Style

SCHEMES = ("int8", "int4", "int4-asym")
DEFAULT_GROUP_SIZE = 128
SCALE_SUFFIX = "_scale"  # a quantized layer's scales sit beside its weight: "<module>.weight_scale"
ZERO_SUFFIX = "_zero"    # and an asymmetric INT4 layer's zero points: "<module>.weight_zero"

# (dim, ranges) -> those blocks of the full weight, concatenated (dim None: all of it)
SliceReader = Callable[[int | None, Ranges | None], torch.Tensor]


@dataclass(frozen=True)
class QuantShard:
    """This rank's quantized weight, its scales [N_local, KG] (and INT4 zero points) and their
    grouping. ``q`` is int8 [N_local, K_local] (``bits`` 8) or uint8 [N_local, ceil(K_local/2)],
    two values per byte (``bits`` 4)."""
    q: torch.Tensor
    scales: torch.Tensor
    group_size: int
    group_offset: int
    zeros: torch.Tensor | None = None
    bits: int = 8

    def tensors(self) -> dict[str, torch.Tensor]:
        """Suffix ("" for the weight itself) -> tensor, as the layer and checkpoints hold them."""
        out = {"": self.q, SCALE_SUFFIX: self.scales}
        if self.zeros is not None:
            out[ZERO_SUFFIX] = self.zeros
        return out


Int8Shard = QuantShard  # the INT8 case


@dataclass(frozen=True)
class QuantLayout:
    """Where a rank's quantized shard comes from and what shapes it has.

    The rank quantizes the blocks ``read_ranges`` along ``read_dim`` of the full weight (None:
    all of it) and keeps columns ``keep`` of the result (None: all); it holds ``rows`` x
    ``columns`` weights in groups of ``group_size``."""
    group_size: int
    group_offset: int
    read_dim: int | None
    read_ranges: Ranges | None
    keep: tuple[int, int] | None
    rows: int
    columns: int
    groups: int
    bits: int = 8
    symmetric: bool = True

    @property
    def q_shape(self) -> tuple[int, int]:
        return (self.rows, self.columns if self.bits == 8 else -(-self.columns // 2))

    @property
    def scale_shape(self) -> tuple[int, int]:
        return (self.rows, self.groups)

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
        """(suffix, dtype, shape) of each tensor that stands for the weight (QuantShard.tensors)."""
        out = [("", torch.int8 if self.bits == 8 else torch.uint8, self.q_shape),
               (SCALE_SUFFIX, torch.float32, self.scale_shape)]
        if not self.symmetric:
            out.append((ZERO_SUFFIX, torch.uint8, self.scale_shape))
        return out

    def empty(self, device: str | torch.device = "meta") -> QuantShard:
        """A QuantShard of this layout whose values are still to be filled (on the meta device:
        no memory)."""
        t = {suffix: torch.empty(shape, dtype=dtype, device=device) for suffix, dtype, shape in self.specs()}
        return QuantShard(t[""], t[SCALE_SUFFIX], self.group_size, self.group_offset, t.get(ZERO_SUFFIX), self.bits)


Int8Layout = QuantLayout


@dataclass(frozen=True)
class QuantScheme:
    """How the column- and row-parallel weights are quantized: the scheme (``int8``: symmetric;
    ``int4``: symmetric, ``int4-asym``: with zero points; all weight-only) and ``group_size``, the
    input columns of the whole weight that share one scale (0: one scale per output row). The one value ``autotp.shard``, the checkpoint writer and both
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
                raise ValueError("autotp: quant_group_size was given without quantize; pass quantize='int8' (or "
                                 "'int4') too")
            return None
        return cls(quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size)

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    @property
    def symmetric(self) -> bool:
        return self.name != "int4-asym"

    # -- which layers, which shapes ------------------------------------------------------
    @staticmethod
    def entries(plan: Plan) -> dict[str, Entry]:
        """The plan entries whose Linear weights are quantized: the column- and row-parallel
        modules (the lm_head, embeddings and sharded norms keep their dtype, and so do expert
        tensors, which the model's own forward multiplies)."""
        return {name: e for name, e in plan.entries.items()
                if e.style in (Style.COLUMN, Style.ROW) and not e.is_param and e.norm_width is None}

    def layout(self, shape: tuple[int, ...], entry: Entry | None, ranges: Ranges) -> QuantLayout:
        """The layout of this rank's shard of a full weight of ``shape`` [N, K] as stored
        ([K, N] for a transposed entry) under the plan ``entry`` (None: the layer is not
        split), ``ranges`` the rank's blocks."""
        n, k = shape[::-1] if entry is not None and entry.transposed else shape
        g = self.group_size or max(k, 1)
        dim = CUT_DIMS[entry.style]["weight"] if entry is not None else None
        if dim == 1:
            if len(ranges) != 1:
                raise ShardingError(f"{self.name.upper()} quantization of '{entry.name}': this rank keeps "
                                    f"{len(ranges)} separate blocks of its input columns; the quantized kernels take "
                                    "one contiguous range. Leave this layer unquantized or shard on fewer ranks")
            (k0, k1), = ranges
            first, last = k0 // g, -(-k1 // g)
            start = first * g
            return QuantLayout(g, k0 % g, 1, [(start, min(k, last * g))], (k0 - start, k1 - start), n, k1 - k0,
                               last - first, self.bits, self.symmetric)
        if dim is None:
            return QuantLayout(g, 0, None, None, None, n, k, -(-k // g), self.bits, self.symmetric)
        rows = sum(b - a for a, b in ranges)
        return QuantLayout(g, 0, 0, ranges, None, rows, k, -(-k // g), self.bits, self.symmetric)

    # -- the maths (kernels.quantize_int8, kernels.quantize_int4 define them) ------------------
    def quantize_slice(self, read: SliceReader, shape: tuple[int, ...], entry: Entry | None,
                       ranges: Ranges) -> QuantShard:
        """This rank's quantized shard, reading from the full weight (stored ``shape``) only the
        blocks its layout needs; a transposed entry's blocks are read [in, out] and turned."""
        layout = self.layout(shape, entry, ranges)
        if entry is not None and entry.transposed:
            stored = read
            read = lambda dim, blocks: stored(None if dim is None else 1 - dim, blocks).t()
        weight = read(layout.read_dim, layout.read_ranges)
        out = layout.empty("cpu")
        a, b = layout.keep or (0, weight.shape[1])
        step = max(1, (4 << 20) // max(weight.shape[1], 1))  # rows are independent: bound the fp32 temporaries
        for start in range(0, weight.shape[0], step):
            rows = slice(start, start + step)
            if self.bits == 8:
                q, out.scales[rows] = kernels.quantize_int8(weight[rows], layout.group_size)
                out.q[rows] = q[:, a:b]
                continue
            u, out.scales[rows], zeros = kernels.quantize_int4(weight[rows], layout.group_size, 0, self.symmetric)
            out.q[rows] = kernels.pack_int4(u[:, a:b])
            if zeros is not None:
                out.zeros[rows] = zeros
        return out

    def quantize_shard(self, weight: torch.Tensor, entry: Entry | None, ranges: Ranges) -> QuantShard:
        """This rank's quantized shard of the full ``weight`` [N, K] as stored (see :meth:`layout`)."""
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
