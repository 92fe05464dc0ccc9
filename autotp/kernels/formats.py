"""Weight formats: how a Linear layer's weight is stored, multiplied and given back.

A layer holds its tensors as parameters (``weight``, and ``weight_scale`` for INT8 and INT4,
``weight_zero`` for asymmetric INT4) so that state dicts and checkpoint assignment see them; its
format is a small immutable object that knows what those tensors mean:

    format          weight                          weight_scale (weight_zero)  matmul
    PlainWeight     [N, K] any float dtype          -                        F.linear
    PackedBf16      [ceil(N/64), ceil(K/2), 128]    -                        native linear_bf16
    Int8Weight      [N, K] int8                     [N, groups] fp32         dequantise, fp32 F.linear
    PackedInt8      [ceil(N/64), K, 64] int8        [ceil(N/64), groups, 64] native linear_int8 (x as int16 or int8 per segment)
    Int4Weight      [N, ceil(K/2)] uint8            [N, groups] fp32 (uint8) dequantise, fp32 F.linear (the spec)
    PackedInt4      [ceil(N/64), ceil(K/2), 64]     [ceil(N/64), groups, 64] native linear_int4

``pack`` turns a plain format into its packed one where ``autotp.kernels`` says the native
GEMM runs under the runtime, replacing the layer's tensors (one copy: the plain one is dropped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from autotp import kernels
from autotp.runtime import Runtime

Release = Callable[[torch.Tensor], None]  # given a plain tensor once it has been copied


class Holder(Protocol):
    """What a format reads and writes: a module with these attributes."""

    weight: nn.Parameter
    in_features: int
    out_features: int


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


@dataclass(frozen=True)
class PlainWeight:
    """``weight`` is the [out_features, in_features] matrix itself."""

    packed = False
    quantized = False

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def unpacked(self, layer: Holder) -> torch.Tensor:
        return layer.weight

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "PlainWeight | PackedBf16":
        """Pack a bf16 weight for the native GEMM where it runs (else stay plain). With
        ``release``, groups of 64 rows pack a few MiB at a time, each handed back at once."""
        if not kernels.native_enabled(layer.weight.dtype, runtime):
            return self
        plain = layer.weight.data
        if release is None:
            packed = kernels.prepack(plain)
        else:
            packed = torch.empty(kernels.packed_shape(*plain.shape), dtype=plain.dtype)
            step = kernels.GROUP_N * max(1, (8 << 20) // (kernels.GROUP_N * plain[0].nbytes))
            for start in range(0, plain.shape[0], step):
                rows = plain[start:start + step]
                packed[start // kernels.GROUP_N:][:kernels.packed_shape(*rows.shape)[0]] = kernels.prepack(rows)
                release(rows)
        layer.weight = _param(packed)
        return PackedBf16(kernels.isa(runtime))


@dataclass(frozen=True)
class PackedBf16:
    """``weight`` is the bf16 matrix in the native GEMM's packed layout (kernels.prepack),
    multiplied by the kernels of ``isa`` (chosen when packing)."""

    isa: str = ""
    packed = True
    quantized = False

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear(x, layer.weight, bias, layer.out_features, isa=self.isa)

    def unpacked(self, layer: Holder) -> torch.Tensor:
        return kernels.unpack(layer.weight, layer.out_features, layer.in_features)

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "PackedBf16":
        return self


@dataclass(frozen=True)
class Int8Weight:
    """``weight`` is Q [N, K] int8 and ``weight_scale`` S [N, groups] fp32: W = Q * S per group of
    ``group_size`` input columns, the first local column at ``group_offset`` in its group
    (row-parallel shards cut inside a group; kernels.quantize_int8 defines the maths)."""

    group_size: int
    group_offset: int = 0
    packed = False
    quantized = True

    def parts(self, layer: Holder) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.weight, layer.weight_scale  # type: ignore[attr-defined]

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x.float(), self.unpacked(layer), None if bias is None else bias.float())
        return y.to(x.dtype)

    def unpacked(self, layer: Holder) -> torch.Tensor:
        """The dequantised weight in float32, each product rounded once (what the kernel multiplies by)."""
        return kernels.dequantize_int8(*self.parts(layer), self.group_size, self.group_offset)

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "Int8Weight":
        if not kernels.native_enabled(torch.int8, runtime):
            return self
        q, scales = self.parts(layer)
        packed_q, packed_s = kernels.prepack_int8(q.data, scales.data)
        layer.weight, layer.weight_scale = _param(packed_q), _param(packed_s)  # type: ignore[attr-defined]
        if release is not None:
            release(q.data)
            release(scales.data)
        return PackedInt8(self.group_size, self.group_offset, kernels.isa(runtime),
                          kernels.ACTIVATION_BITS[runtime.int8_activations])


@dataclass(frozen=True)
class PackedInt8(Int8Weight):
    """Q and S in the INT8 GEMM's packed layouts (kernels.prepack_int8), multiplied by the
    kernels of ``isa`` with activations of ``activation_bits`` (16 or 8: the runtime's
    ``int8_activations``), both chosen when packing."""

    isa: str = ""
    activation_bits: int = 16
    packed = True

    def parts(self, layer: Holder) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.unpack_int8(layer.weight, layer.weight_scale, layer.out_features,  # type: ignore[attr-defined]
                                   layer.in_features)  # type: ignore[attr-defined]

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear_int8(x, layer.weight, layer.weight_scale, bias,  # type: ignore[attr-defined]
                                   layer.out_features, self.group_size, self.group_offset, isa=self.isa,
                                   activation_bits=self.activation_bits)

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "PackedInt8":
        return self


@dataclass(frozen=True)
class Int4Weight:
    """``weight`` is U [N, ceil(K/2)] uint8, two 4-bit values per byte (autotp.kernels.int4),
    ``weight_scale`` S [N, groups] fp32 and, unless ``symmetric``, ``weight_zero`` Z [N, groups]
    uint8: W = (U - Z) * S per group (Z = 8 when symmetric), grouped as Int8Weight's."""

    group_size: int
    group_offset: int = 0
    symmetric: bool = True
    packed = False
    quantized = True

    def parts(self, layer: Holder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(U [N, K] unpacked, S, Z or None)."""
        return (kernels.unpack_int4(layer.weight, layer.in_features), layer.weight_scale,  # type: ignore[attr-defined]
                None if self.symmetric else layer.weight_zero)  # type: ignore[attr-defined]

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x.float(), self.unpacked(layer), None if bias is None else bias.float())
        return y.to(x.dtype)

    def unpacked(self, layer: Holder) -> torch.Tensor:
        """The dequantised weight in float32, each product rounded once (what the kernel multiplies by)."""
        return kernels.dequantize_int4(*self.parts(layer), self.group_size, self.group_offset)

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "Int4Weight":
        if not kernels.native_enabled(torch.uint8, runtime):
            return self
        plain = [layer.weight.data, layer.weight_scale.data]  # type: ignore[attr-defined]
        q, s, z = kernels.prepack_int4(*self.parts(layer))
        layer.weight, layer.weight_scale = _param(q), _param(s)  # type: ignore[attr-defined]
        if z is not None:
            plain.append(layer.weight_zero.data)  # type: ignore[attr-defined]
            layer.weight_zero = _param(z)  # type: ignore[attr-defined]
        if release is not None:
            for tensor in plain:
                release(tensor)
        return PackedInt4(self.group_size, self.group_offset, self.symmetric, kernels.isa(runtime))


@dataclass(frozen=True)
class PackedInt4(Int4Weight):
    """U, S and Z in the INT4 GEMM's packed layouts (kernels.prepack_int4), multiplied by the
    kernels of ``isa`` (chosen when packing)."""

    isa: str = ""
    packed = True

    def _zeros(self, layer: Holder) -> torch.Tensor | None:
        return None if self.symmetric else layer.weight_zero  # type: ignore[attr-defined]

    def parts(self, layer: Holder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return kernels.unprepack_int4(layer.weight, layer.weight_scale, self._zeros(layer),  # type: ignore[attr-defined]
                                      layer.out_features, layer.in_features)

    def matmul(self, layer: Holder, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear_int4(x, layer.weight, layer.weight_scale, self._zeros(layer),  # type: ignore[attr-defined]
                                   bias, layer.out_features, self.group_size, self.group_offset, isa=self.isa)

    def pack(self, layer: Holder, runtime: Runtime, release: Release | None = None) -> "PackedInt4":
        return self


WeightFormat = PlainWeight | PackedBf16 | Int8Weight | PackedInt8 | Int4Weight | PackedInt4
