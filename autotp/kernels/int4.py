"""Weight-only INT4: the definition (quantize, dequantize, two values per byte) and the native GEMM's
packed layout and door.

Per output row and group of G input columns (column k of a slice with group offset O is in
group (k + O) // G), each weight becomes a 4-bit value U in 0..15 with a scale S (fp32) and a
zero point Z (0..15), and stands for W = (U - Z) * S:

  symmetric   S = absmax / 7 (1 for an all-zero group), Z = 8, U = clamp(round(W / S), -8, 7) + 8
  asymmetric  lo = min(min W, 0), hi = max(max W, 0), S = (hi - lo) / 15 (1 when hi = lo),
              Z = clamp(round(-lo / S), 0, 15), U = clamp(round(W / S) + Z, 0, 15)

(rounding half to even, as torch.round). Taking 0 into the asymmetric range keeps Z in 0..15,
makes 0 exact, and makes the zero padding of a partial group harmless, so that quantizing a
slice with O = its start % G gives the slice of the quantized whole.

Stored form (a layer's parameters, a checkpoint's tensors): ``weight`` uint8 [N, ceil(K/2)],
byte j holding column 2j in its low nibble and 2j + 1 in its high one (zero past K);
``weight_scale`` fp32 [N, KG]; ``weight_zero`` uint8 [N, KG] for the asymmetric scheme only.
Packed form (what ``linear_int4`` reads; csrc/kernel_table.h): U as [ceil(N/64), ceil(K/2), 64]
bytes: per group g of 64 columns and pair p of K rows, two blocks h of 32 bytes, byte
32 h + 2 i + r = U[64 g + 32 h + i, 2 p + r] | U[64 g + 32 h + 16 + i, 2 p + r] << 4 (i < 16,
r < 2); scales and zero points as [ceil(N/64), KG, 64]; zero past N or K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP_N = 64  # output columns per packed group (csrc/kernel_table.h)
SYMMETRIC_ZERO = 8


def group_view(weight: torch.Tensor, group_size: int | None, group_offset: int) -> tuple[torch.Tensor, int]:
    """An [N, K] weight as float32 [N, groups, G] (column k in group (k + O) // G, zeros padding
    the first and last groups) and G; ``group_size`` None is one group per row. INT8 and INT4
    quantize over these groups."""
    n, k = weight.shape
    g = max(k, 1) if group_size is None else group_size
    if g < 1 or not 0 <= group_offset < g:
        raise ValueError(f"autotp: group_size must be >= 1 and 0 <= group_offset < group_size, got "
                         f"{group_size} and {group_offset}")
    groups = -(-(k + group_offset) // g)
    return F.pad(weight.float(), (group_offset, groups * g - k - group_offset)).view(n, groups, g), g


def quantize_int4(weight: torch.Tensor, group_size: int | None = None, group_offset: int = 0,
                  symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U [N, K] uint8 in 0..15, scales [N, KG] fp32, zero points [N, KG] uint8 or None when
    ``symmetric``) of an [N, K] weight by the definition in this module's docstring; ``group_size``
    None is one group per row, ``group_offset`` as for INT8."""
    n, k = weight.shape
    w, g = group_view(weight, group_size, group_offset)
    if symmetric:
        absmax = w.abs().amax(-1)
        scales = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        u = torch.round(w / scales[..., None]).clamp_(-8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        z = torch.round(-lo / scales).clamp_(0, 15)
        u = (torch.round(w / scales[..., None]) + z[..., None]).clamp_(0, 15)
        zeros = z.to(torch.uint8)
    u = u.to(torch.uint8).view(n, -1)[:, group_offset:group_offset + k].contiguous()
    return u, scales, zeros


def dequantize_int4(u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int | None = None, group_offset: int = 0) -> torch.Tensor:
    """float32 (U - Z) * S of unpacked values U [N, K], each product rounded once: the weight the
    INT4 GEMM multiplies by (Z = 8 where ``zeros`` is None)."""
    k = u.shape[1]
    g = max(k, 1) if group_size is None else group_size

    def per_column(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(g, dim=1)[:, group_offset:group_offset + k]

    z = per_column(zeros.float()) if zeros is not None else float(SYMMETRIC_ZERO)
    return (u.float() - z) * per_column(scales.float())


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, ceil(K/2)], column 2j in byte j's low nibble, 2j + 1 in
    its high one (zero past K)."""
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The [N, in_features] values back from :func:`pack_int4`."""
    both = torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)
    return both[:, :in_features].contiguous()


def group_major(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N/64), C, 64], element (g, c, j) = t[64 g + j, c], zero past N."""
    n = t.shape[0]
    ng = -(-n // GROUP_N)
    t = F.pad(t, (0, 0, 0, ng * GROUP_N - n))
    return t.view(ng, GROUP_N, t.shape[1]).transpose(1, 2).contiguous()


def ungroup_major(t: torch.Tensor, n: int) -> torch.Tensor:
    """The [n, C] tensor back from :func:`group_major`."""
    return t.transpose(1, 2).reshape(t.shape[0] * GROUP_N, t.shape[1])[:n].contiguous()


def pair_major(t: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/64), ceil(K/2), 128], element (g, p, 2 j + r) = t[64 g + j, 2 p + r], zero
    past N or K: the INT8 GEMM's packed weight (each column's pair of K side by side)."""
    n, k = t.shape
    ng, pairs = -(-n // GROUP_N), -(-k // 2)
    t = F.pad(t, (0, 2 * pairs - k, 0, ng * GROUP_N - n))
    return t.view(ng, GROUP_N, pairs, 2).permute(0, 2, 1, 3).reshape(ng, pairs, 2 * GROUP_N).contiguous()


def unpair_major(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [out_features, in_features] tensor back from :func:`pair_major`."""
    ng, pairs = packed.shape[:2]
    t = packed.view(ng, pairs, GROUP_N, 2).permute(0, 2, 1, 3).reshape(ng * GROUP_N, 2 * pairs)
    return t[:out_features, :in_features].contiguous()


def prepack_int4(u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U [N, K], S [N, KG], Z [N, KG] or None) -> the layouts ``linear_int4`` reads (module
    docstring)."""
    n, k = u.shape
    ng, pairs = -(-n // GROUP_N), -(-k // 2)
    u = F.pad(u, (0, 2 * pairs - k, 0, ng * GROUP_N - n))
    # [g, h, nibble, i, p, r] -> [g, p, h, i, r, nibble]
    parts = u.view(ng, 2, 2, 16, pairs, 2).permute(0, 4, 1, 3, 5, 2)
    q = (parts[..., 0] | (parts[..., 1] << 4)).reshape(ng, pairs, GROUP_N)
    return q.contiguous(), group_major(scales.float()), None if zeros is None else group_major(zeros)


def unprepack_int4(qpacked: torch.Tensor, spacked: torch.Tensor, zpacked: torch.Tensor | None, out_features: int,
                   in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U [N, K], S [N, KG], Z or None) back from the layouts of :func:`prepack_int4`."""
    ng, pairs = qpacked.shape[:2]
    b = qpacked.view(ng, pairs, 2, 16, 2)  # [g, p, h, i, r]
    parts = torch.stack((b & 15, b >> 4), dim=-1)  # [g, p, h, i, r, nibble]
    u = parts.permute(0, 2, 5, 3, 1, 4).reshape(ng * GROUP_N, 2 * pairs)[:out_features, :in_features]
    zeros = None if zpacked is None else ungroup_major(zpacked, out_features)
    return u.contiguous(), ungroup_major(spacked, out_features), zeros


def linear_int4(x: torch.Tensor, qpacked: torch.Tensor, spacked: torch.Tensor, zpacked: torch.Tensor | None,
                bias: torch.Tensor | None, out_features: int, group_size: int, group_offset: int = 0,
                out_dtype: torch.dtype | None = None, isa: str = "") -> torch.Tensor:
    """x @ ((U - Z) S)^T + bias with U, S, Z packed by :func:`prepack_int4`; fp32 accumulation,
    output in ``out_dtype`` (default: x's dtype), on the kernels of ``isa`` ("" the best this CPU
    runs). Needs the extension built (``autotp.kernels.extension_loaded``)."""
    return torch.ops.autotp.linear_int4(x, qpacked, spacked, zpacked, bias, out_features, group_size, group_offset,
                                        out_dtype, isa)
