"""The first-use self-check: each vector path this CPU selects is run once against the generic
path on small random shapes; a path whose results differ is switched off, with a warning
naming the ISA and the shape. So a path never exercised by this project's CI (an instruction
set no CI machine had) cannot give a user wrong answers silently.

Only torch and the extension's ops are used here (the check runs while the extension loads).
"""
from __future__ import annotations

from typing import Callable

import torch

from autotp.kernels.int4 import group_major, pair_major, prepack_int4  # torch only, as this module

# (M, N, K): odd sizes (ragged groups and K pairs), the register path (M <= 4), the panel one,
# AMX's streaming tile (2-16 rows), its prefill tile and its INT8 tile (17 rows and more), and K over
# one pass of a tile that walks K in passes (AVX512-BF16: 2048 K pairs)
SHAPES = [(1, 70, 33), (3, 130, 64), (13, 64, 257), (40, 100, 130), (7, 20, 4200)]
INT8_GROUP, INT8_OFFSET = 16, 5
# fp32 sums in another association order differ by about K ulps of the magnitudes summed
RELATIVE = 1e-5

Bf16Op = Callable[..., torch.Tensor]


def _inputs(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16(),
            torch.randn(n, generator=gen))


def _differs(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    bound = RELATIVE * (x.double().abs() @ w.double().abs().T) + 1e-6
    return bool(((got.double() - want.double()).abs() > bound).any()) or got.shape != want.shape


def check_paths(isas: list[str], linear_bf16: Bf16Op | None = None, linear_int8: Bf16Op | None = None,
                linear_int4: Bf16Op | None = None, decode_attention: Bf16Op | None = None) -> dict[str, str]:
    """ISA -> why it is switched off, for each of ``isas`` whose bf16, INT8 or INT4 GEMM or decode
    attention differs from the generic path's beyond summation order. ``linear_bf16`` /
    ``linear_int8`` / ``linear_int4`` / ``decode_attention`` default to the extension's ops (a
    test passes wrong ones to see the check fail)."""
    attend = decode_attention or torch.ops.autotp.decode_attention
    bf16 = linear_bf16 or torch.ops.autotp.linear_bf16
    int8 = linear_int8 or torch.ops.autotp.linear_int8
    int4 = linear_int4 or torch.ops.autotp.linear_int4
    failed: dict[str, str] = {}
    for seed, (m, n, k) in enumerate(SHAPES):
        x, w, b = _inputs(m, n, k, seed)
        packed = torch.ops.autotp.prepack_bf16(w)
        q, s, wq = _int8(w, k)
        q4, s4, z4, w4 = _int4(n, k, symmetric=seed % 2 == 0)
        for isa in [i for i in isas if i != "generic" and i not in failed]:
            if _differs(bf16(x, packed, b, n, torch.float32, isa),
                        torch.ops.autotp.linear_bf16(x, packed, b, n, torch.float32, "generic"), x, w):
                failed[isa] = f"its bf16 GEMM differs from the generic one at M={m} N={n} K={k}"
            elif bits := next((bits for bits in (16, 8) if _differs(
                    int8(x, q, s, b, n, INT8_GROUP, INT8_OFFSET, torch.float32, isa, bits),
                    torch.ops.autotp.linear_int8(x, q, s, b, n, INT8_GROUP, INT8_OFFSET, torch.float32, "generic",
                                                 bits), x, wq)), None):
                failed[isa] = f"its INT8 GEMM ({bits}-bit activations) differs from the generic one at M={m} N={n} K={k}"
            elif _differs(int4(x, q4, s4, z4, b, n, INT8_GROUP, INT8_OFFSET, torch.float32, isa),
                          torch.ops.autotp.linear_int4(x, q4, s4, z4, b, n, INT8_GROUP, INT8_OFFSET, torch.float32,
                                                       "generic"), x, w4):
                failed[isa] = f"its INT4 GEMM differs from the generic one at M={m} N={n} K={k}"
    for heads, length in ATTENTION_CASES:
        q, k, v, bias = _attention_inputs(heads, length)
        want = torch.ops.autotp.decode_attention(q, k, v, bias, 0.3, "generic")
        for isa in [i for i in isas if i != "generic" and i not in failed]:
            got = attend(q, k, v, bias, 0.3, isa)
            if got.shape != want.shape or bool(((got - want).abs() > RELATIVE * v.float().abs().max() + 1e-6).any()):
                failed[isa] = (f"its decode attention differs from the generic one ({heads} heads per KV head, "
                               f"dim 40, {length} positions)")
    return failed


# (query heads per KV head, positions): few heads, and many (9: a block of 8 and one more, as
# Llama-style models with grouped KV heads have), both with whole blocks of positions and a
# tail. The many heads' query is exactly bf16 (a bf16 model's), which AVX512-BF16 scores with
# the keys across lanes (attention_tiles.h, score_block_across); every other path scores it as
# any query.
ATTENTION_CASES = ((3, 21), (9, 37))


def _attention_inputs(heads: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode attention case: 2 rows, 2 KV heads of ``heads`` query heads, head dim 40 (vector
    lanes and a tail), ``length`` positions, a mask per head with left padding and an unfilled
    end."""
    gen = torch.Generator().manual_seed(40 + heads)
    q = torch.randn(2, 2, heads, 40, generator=gen)
    if heads >= 4:
        q = q.bfloat16().float()
    k, v = (torch.randn(2, 2, length, 40, generator=gen).bfloat16() for _ in range(2))
    bias = torch.randn(2, 2 * heads, length, generator=gen)
    bias[..., length - 4:] = float("-inf")
    bias[1, :, :2] = float("-inf")
    return q, k, v, bias


def _int8(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed random INT8 values and scales for an [N, K] weight with the check's group and
    offset, and the dequantised weight (for the error bound)."""
    n = w.shape[0]
    groups = -(-(k + INT8_OFFSET) // INT8_GROUP)
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, groups, generator=gen) / 64
    per_column = s.repeat_interleave(INT8_GROUP, 1)[:, INT8_OFFSET:INT8_OFFSET + k]
    return pair_major(q), group_major(s), q.float() * per_column


def _int4(n: int, k: int, symmetric: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Packed random INT4 values, scales and (asymmetric) zero points for an [N, K] weight with the
    check's group and offset, and the dequantised weight (the layouts of autotp.kernels.int4)."""
    groups = -(-(k + INT8_OFFSET) // INT8_GROUP)
    gen = torch.Generator().manual_seed(k + 1)
    u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, groups, generator=gen) / 8
    z = None if symmetric else torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)

    def per_column(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(INT8_GROUP, 1)[:, INT8_OFFSET:INT8_OFFSET + k]

    q4, sp, zp = prepack_int4(u, s, z)
    w = (u.float() - (8.0 if z is None else per_column(z))) * per_column(s)
    return q4, sp, zp, w
