"""The first-use self-check: each vector path this CPU selects is run once against the generic
path on small random shapes; a path whose results differ is switched off, with a warning
naming the ISA and the shape. So a path never exercised by this project's CI (an instruction
set no CI machine had) cannot give a user wrong answers silently.

Only torch and the extension's ops are used here (the check runs while the extension loads).
"""
from __future__ import annotations

from typing import Callable

import torch

# (M, N, K): odd sizes (ragged groups and K pairs), the register path (M <= 4), the panel one,
# enough rows for the prefill tiles (AMX serves from 16 rows), and K over one pass of a tile
# that walks K in passes (AVX512-BF16: 2048 K pairs)
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


def check_paths(isas: list[str], linear_bf16: Bf16Op | None = None, linear_int8: Bf16Op | None = None
                ) -> dict[str, str]:
    """ISA -> why it is switched off, for each of ``isas`` whose bf16 or INT8 GEMM differs from
    the generic path's beyond summation order. ``linear_bf16`` / ``linear_int8`` default to the
    extension's ops (a test passes wrong ones to see the check fail)."""
    bf16 = linear_bf16 or torch.ops.autotp.linear_bf16
    int8 = linear_int8 or torch.ops.autotp.linear_int8
    failed: dict[str, str] = {}
    for seed, (m, n, k) in enumerate(SHAPES):
        x, w, b = _inputs(m, n, k, seed)
        packed = torch.ops.autotp.prepack_bf16(w)
        q, s, wq = _int8(w, k)
        for isa in [i for i in isas if i != "generic" and i not in failed]:
            if _differs(bf16(x, packed, b, n, torch.float32, isa),
                        torch.ops.autotp.linear_bf16(x, packed, b, n, torch.float32, "generic"), x, w):
                failed[isa] = f"its bf16 GEMM differs from the generic one at M={m} N={n} K={k}"
            elif _differs(int8(x, q, s, b, n, INT8_GROUP, INT8_OFFSET, torch.float32, isa),
                          torch.ops.autotp.linear_int8(x, q, s, b, n, INT8_GROUP, INT8_OFFSET, torch.float32,
                                                       "generic"), x, wq):
                failed[isa] = f"its INT8 GEMM differs from the generic one at M={m} N={n} K={k}"
    return failed


def _int8(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed random INT8 values and scales for an [N, K] weight with the check's group and
    offset, and the dequantised weight (for the error bound)."""
    n = w.shape[0]
    groups = -(-(k + INT8_OFFSET) // INT8_GROUP)
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, groups, generator=gen) / 64
    per_column = s.repeat_interleave(INT8_GROUP, 1)[:, INT8_OFFSET:INT8_OFFSET + k]
    ng = -(-n // 64)

    def pack(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t, (0, 0, 0, ng * 64 - n))
        return t.view(ng, 64, t.shape[1]).transpose(1, 2).contiguous()

    return pack(q), pack(s), q.float() * per_column
