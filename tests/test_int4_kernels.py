"""Weight-only INT4: quantization against its definition (autotp.kernels.int4, written out here
group by group), two values per byte and the kernels' packed layout against theirs, slices of
the quantized whole, and the INT4 GEMM of every path this CPU runs against a float64 product
with the dequantised weight."""
import pytest
import torch

from autotp import kernels
from test_kernels import bf16, native, paths


def by_definition(w: torch.Tensor, g: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Z of an [N, K] weight (K a multiple of g), one group at a time, as the module
    docstring states them."""
    n, k = w.shape
    u = torch.empty(n, k, dtype=torch.uint8)
    s = torch.empty(n, k // g)
    z = torch.empty(n, k // g, dtype=torch.uint8)
    for row in range(n):
        for t in range(k // g):
            block = w[row, t * g:(t + 1) * g].float()
            if symmetric:
                amax = block.abs().max()
                scale = amax / 7 if amax > 0 else torch.tensor(1.0)
                zero = torch.tensor(8.0)
                vals = torch.round(block / scale).clamp(-8, 7) + 8
            else:
                lo, hi = min(block.min(), torch.tensor(0.0)), max(block.max(), torch.tensor(0.0))
                scale = (hi - lo) / 15 if hi > lo else torch.tensor(1.0)
                zero = torch.round(-lo / scale).clamp(0, 15)
                vals = (torch.round(block / scale) + zero).clamp(0, 15)
            u[row, t * g:(t + 1) * g], s[row, t], z[row, t] = vals.to(torch.uint8), scale, zero.to(torch.uint8)
    return u, s, z


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_follows_its_definition(symmetric):
    w = bf16(6, 24, seed=0)
    w[1] = 0  # an all-zero row: scale 1, every value the zero point
    w[2, :8] = 0.5  # a constant positive group: exact under the asymmetric scheme
    u, s, z = kernels.quantize_int4(w, 8, symmetric=symmetric)
    eu, es, ez = by_definition(w, 8, symmetric)
    assert u.dtype == torch.uint8 and u.shape == (6, 24) and s.shape == (6, 3)
    assert torch.equal(u, eu) and torch.equal(s, es)
    assert (z is None) if symmetric else torch.equal(z, ez)
    assert u.max() <= 15 and (symmetric or u.max() == 15)
    deq = kernels.dequantize_int4(u, s, z, 8)
    assert torch.equal(deq[1], torch.zeros(24))
    step = s.repeat_interleave(8, 1)
    assert ((deq - w.float()).abs() <= step / 2 + 1e-7).all()  # half a step at most
    if not symmetric:
        assert torch.equal(deq[2, :8], torch.full((8,), 0.5))


def test_two_values_per_byte():
    u = torch.tensor([[1, 2, 3, 4, 5], [15, 0, 14, 1, 9]], dtype=torch.uint8)
    packed = kernels.pack_int4(u)
    assert packed.tolist() == [[1 | 2 << 4, 3 | 4 << 4, 5], [15, 14 | 1 << 4, 9]]  # zero past K
    assert torch.equal(kernels.unpack_int4(packed, 5), u)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_a_slice_with_its_offset_equals_slicing_the_quantized_whole(symmetric):
    w = bf16(40, 96, seed=1)
    whole_u, whole_s, whole_z = kernels.quantize_int4(w, 16, symmetric=symmetric)
    for k0, k1 in [(0, 96), (16, 64), (5, 37), (33, 96), (1, 2)]:
        first, last = k0 // 16, -(-k1 // 16)
        # a rank reads its groups whole, quantizes them, keeps its columns (autotp.sharding.quantize)
        u, s, z = kernels.quantize_int4(w[:, first * 16:last * 16], 16, symmetric=symmetric)
        assert torch.equal(u[:, k0 - first * 16:k1 - first * 16], whole_u[:, k0:k1])
        assert torch.equal(s, whole_s[:, first:last])
        assert symmetric or torch.equal(z, whole_z[:, first:last])
        # and the offset form of the same slice, where its end groups are complete in it
        if k0 % 16 == 0 and (k1 % 16 == 0 or k1 == 96):
            uo, so, _ = kernels.quantize_int4(w[:, k0:k1], 16, k0 % 16, symmetric)
            assert torch.equal(uo, whole_u[:, k0:k1]) and torch.equal(so, whole_s[:, first:last])


def test_packed_layout_follows_its_definition():
    n, k = 70, 9
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    s, z = torch.rand(n, 3), torch.randint(0, 16, (n, 3), dtype=torch.uint8)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    assert qp.shape == (2, 5, 64) and sp.shape == (2, 3, 64) and zp.shape == (2, 3, 64)
    for row in range(n):
        for col in range(k):
            g, c = divmod(row, 64)
            h, i, high = c // 32, c % 16, c % 32 // 16
            p, r = divmod(col, 2)
            byte = int(qp[g, p, 32 * h + 2 * i + r])
            assert (byte >> 4 if high else byte & 15) == u[row, col], (row, col)
        assert torch.equal(sp[row // 64, :, row % 64], s[row]) and torch.equal(zp[row // 64, :, row % 64], z[row])
    assert (qp[:, 4, 1::2] == 0).all()  # past K (9 is odd): zero
    assert (qp[1, :, 12:] == 0).all() and (qp[1, :, :12] >> 4 == 0).all()  # past N (70): zero
    back = kernels.unprepack_int4(qp, sp, zp, n, k)
    assert torch.equal(back[0], u) and torch.equal(back[1], s) and torch.equal(back[2], z)


def deq_reference(x, u, s, z, g, b, offset=0):
    """x ((U - Z) S)^T + b in float64 with the fp32-rounded dequantised weight, and the fp32
    error bound (the vector paths scale fp32 sums once per group: one more rounding)."""
    w = kernels.dequantize_int4(u, s, z, g, offset).double()
    x64 = x.double()
    y, mag = x64 @ w.T, x64.abs() @ w.abs().T
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    return y, mag * (x.shape[-1] + 4) * 2.0**-24 + 1e-30


@paths
@pytest.mark.parametrize("n,k,g", [(1, 1, None), (15, 3, 2), (64, 64, 16), (100, 129, 32), (257, 1000, 128),
                                   (48, 4096, None), (130, 300, 7)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_gemm_shape_sweep_against_float64(n, k, g, symmetric, isa):
    w = bf16(n, k, seed=n * 5 + k)
    b = bf16(n, seed=k) if symmetric else None
    u, s, z = kernels.quantize_int4(w, g, symmetric=symmetric)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    group = k if g is None else g
    for m in (1, 2, 3, 4, 5, 7, 13, 97, 300):
        x = bf16(m, k, seed=m)
        expect, bound = deq_reference(x, u, s, z, group, b)
        y32 = kernels.linear_int4(x, qp, sp, zp, b, n, group, out_dtype=torch.float32, isa=isa)
        err = (y32.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m} N={n} K={k} G={g}: max err {err.max():.3g}, bound {bound.max():.3g}"
        assert torch.equal(kernels.linear_int4(x, qp, sp, zp, b, n, group, isa=isa), y32.bfloat16())
        # one row alone (the few-rows path) against the same reference
        one = kernels.linear_int4(x[:1], qp, sp, zp, b, n, group, out_dtype=torch.float32, isa=isa)
        assert ((one.double() - expect[:1]).abs() <= bound[:1]).all()
        # fp32 activations (a path of their own where bf16 ones take dot products of bf16 pairs)
        yf = kernels.linear_int4(x.float(), qp, sp, zp, b, n, group, isa=isa)
        assert yf.dtype == torch.float32 and ((yf.double() - expect).abs() <= bound).all(), f"{isa} fp32 x M={m}"


@paths
@pytest.mark.parametrize("k0,k1", [(0, 40), (5, 37), (13, 14), (31, 200)])
def test_int4_gemm_with_a_group_offset_against_float64(k0, k1, isa):
    """A row-parallel shard: columns [k0, k1) of the whole, groups of the whole (offset k0 % G)."""
    w = bf16(90, 200, seed=k0 + k1)
    u, s, z = kernels.quantize_int4(w, 16, symmetric=False)
    first, last = k0 // 16, -(-k1 // 16)
    us, ss, zs = u[:, k0:k1], s[:, first:last], z[:, first:last]
    qp, sp, zp = kernels.prepack_int4(us, ss, zs)
    for m in (1, 2, 3, 8):
        x = bf16(m, k1 - k0, seed=m)
        expect, bound = deq_reference(x, us, ss, zs, 16, None, k0 % 16)
        y = kernels.linear_int4(x, qp, sp, zp, None, 90, 16, k0 % 16, out_dtype=torch.float32, isa=isa)
        assert ((y.double() - expect).abs() <= bound).all(), f"M={m} [{k0}, {k1})"


@paths
def test_negative_control_a_wrong_nibble_order_is_caught(isa):
    """The comparison can fail: the same values packed with the two nibbles of every byte
    swapped give products far outside the bound."""
    w = bf16(64, 64, seed=11)
    u, s, z = kernels.quantize_int4(w, 16)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    swapped = ((qp & 15) << 4) | (qp >> 4)
    x = bf16(1, 64, seed=12)
    expect, bound = deq_reference(x, u, s, z, 16, None)
    y = kernels.linear_int4(x, swapped, sp, zp, None, 64, 16, out_dtype=torch.float32, isa=isa)
    assert ((y.double() - expect).abs() > bound).any()


@paths
def test_int4_gemm_is_the_same_on_any_number_of_threads(isa):
    u, s, z = kernels.quantize_int4(bf16(300, 512, seed=3), 64, symmetric=False)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    before = torch.get_num_threads()
    try:
        for x in (bf16(37, 512, seed=4), bf16(1, 512, seed=5)):
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(kernels.linear_int4(x, qp, sp, zp, None, 300, 64, out_dtype=torch.float32, isa=isa))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    finally:
        torch.set_num_threads(before)


@native
def test_int4_gemm_errors_name_the_fix():
    u, s, z = kernels.quantize_int4(bf16(64, 32, seed=5), 8, symmetric=False)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    x = bf16(2, 32, seed=6)
    with pytest.raises(RuntimeError, match="prepack_int4"):
        kernels.linear_int4(x, kernels.pack_int4(u), sp, zp, None, 64, 8)
    with pytest.raises(RuntimeError, match="group size 16"):
        kernels.linear_int4(x, qp, sp, zp, None, 64, 16)
    with pytest.raises(RuntimeError, match="group_offset must be in"):
        kernels.linear_int4(x, qp, sp, zp, None, 64, 8, 8)
    with pytest.raises(RuntimeError, match="zero points must be contiguous uint8"):
        kernels.linear_int4(x, qp, sp, zp.float(), None, 64, 8)
    with pytest.raises(RuntimeError, match="x must be a bfloat16 or float32"):
        kernels.linear_int4(x.half(), qp, sp, zp, None, 64, 8)


@paths
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_ops_pass_opcheck(isa, symmetric):
    u, s, z = kernels.quantize_int4(bf16(70, 40, seed=7), 8, 3, symmetric)  # offset 3: a first group of 5
    assert s.shape == (70, 6)
    qp, sp, zp = kernels.prepack_int4(u, s, z)
    torch.library.opcheck(torch.ops.autotp.linear_int4.default,
                          (bf16(3, 40, seed=8), qp, sp, zp, bf16(70, seed=9), 70, 8, 3, torch.float32, isa))
