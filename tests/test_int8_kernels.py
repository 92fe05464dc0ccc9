"""The weight-only INT8 GEMM (autotp.kernels.linear_int8) against its definition (int16 or, with
activation_bits=8, int8 activations per segment, exact integer products, kernel_table.h)
computed in float64, its two paths (registers for few rows, a panel of interleaved weights for
many) against each other, AVX512-VNNI's byte tile against AVX-512, the activations against
their definition, quantization against its definition, and the packed layouts against theirs."""
import pytest
import torch

from autotp import kernels
from test_kernels import bf16, native, paths


def deq_reference(x, q, s, g, b, offset=0, bits=16):
    """The spec in float64: per segment the exact integer sum of X * Q (X, xs: int8_activations)
    times xs * S rounded to fp32 as the kernels round it, the terms summed, plus the bias; and
    the bound on the kernels' remaining fp32 roundings (each segment's sum converted once, its
    term added once, the bias and the output): (segments + 3) * 2^-24 of the terms' magnitude."""
    xq, xs = kernels.int8_activations(x, g, offset, bits)
    y = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    mag = torch.zeros_like(y)
    segments = kernels.int8_segments(x.shape[-1], g, offset)
    for e, (ks, ke, t) in enumerate(segments):
        sums = xq[:, ks:ke].double() @ q[:, ks:ke].double().T  # integers below 2^31: exact
        term = sums * (xs[:, e:e + 1] * s[:, t][None, :]).double()
        y, mag = y + term, mag + term.abs()
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    return y, mag * (len(segments) + 3) * 2.0**-24 + 1e-30


def identity_gemm(k, g, offset):
    """Packed Q = I, S = 1 for K inputs: linear_int8 then returns each X * xs itself."""
    q = torch.eye(k, dtype=torch.int8)
    return kernels.prepack_int8(q, torch.ones(k, -(-(k + offset) // g)))


def per_column(xs, k, g, offset):
    """xs [M, segments] spread to the columns of each segment: [M, K]."""
    index = torch.zeros(k, dtype=torch.long)
    for e, (ks, ke, _) in enumerate(kernels.int8_segments(k, g, offset)):
        index[ks:ke] = e
    return xs[:, index]


def test_int8_segments_follow_their_definition():
    assert kernels.int8_segments(600, 128) == [(0, 128, 0), (128, 256, 1), (256, 384, 2), (384, 512, 3),
                                               (512, 600, 4)]
    assert kernels.int8_segments(600) == [(0, 256, 0), (256, 512, 0), (512, 600, 0)]  # one group: 256-K cuts
    assert kernels.int8_segments(20, 7, 3) == [(0, 4, 0), (4, 11, 1), (11, 18, 2), (18, 20, 3)]
    assert kernels.int8_segments(0, 7) == []


@pytest.mark.parametrize("bits,x_max", [(16, 32767), (8, 127)])
def test_int8_activations_follow_their_definition(bits, x_max):
    x = bf16(4, 40, seed=20).float()
    xq, xs = kernels.int8_activations(x, 16, 5, bits)
    assert xq.dtype == torch.int16 and xs.shape == (4, 3)
    for m in range(4):
        for e, (ks, ke, _) in enumerate(kernels.int8_segments(40, 16, 5)):
            a = x[m, ks:ke].abs().max().item()
            scale = torch.tensor(a / x_max, dtype=torch.float32)  # one rounding of the quotient
            assert xs[m, e] == scale and xq[m, ks:ke].abs().max() == x_max
            for k in range(ks, ke):
                assert xq[m, k] == round(x[m, k].item() / scale.item())  # Python rounds half to even
            error = (xq[m, ks:ke].double() * scale.item() - x[m, ks:ke].double()).abs().max().item()
            assert error <= a / (2 * x_max) * (1 + 1e-6)
    with pytest.raises(ValueError, match="activation_bits must be 16 or 8"):
        kernels.int8_activations(x, 16, 5, 4)


@paths
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("g,offset", [(7, 3), (300, 0), (64, 0)])
def test_int8_gemm_takes_the_activations_the_definition_gives(g, offset, bits, isa):
    # Q = I and S = 1: each output is one X * xs, so the kernel's own activations show exactly,
    # rows of zeros, of values too small for a scale (xs underflows), NaN and infinity included
    k = 300
    x = bf16(9, k, seed=21).float() * 3
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 10] = float("inf")
    x[4] = 1e-44  # a denormal whose scale underflows with either x_max
    x[5, :20] = 1e-39
    x[6, 100:] *= 1e4
    x[7] = 0
    x[7, 50] = float("nan")  # a NaN among zeros: the segment's scale is NaN too, not 0
    qp, sp = identity_gemm(k, g, offset)
    xq, xs = kernels.int8_activations(x, g, offset, bits)
    expect = xq.float() * per_column(xs, k, g, offset)
    for rows in (slice(0, 9), slice(6, 7), slice(4, 6)):  # the panel path and the direct one
        y = kernels.linear_int8(x[rows], qp, sp, None, k, g, offset, torch.float32, isa, bits)
        finite = torch.arange(9)[rows][x[rows].isfinite().all(1)]
        assert torch.equal(y[finite - rows.start], expect[finite]), f"{isa} rows {rows}"
        # a NaN or an infinity anywhere in a row makes the row NaN, as 0 * inf does in a matmul
        assert y[~x[rows].isfinite().all(1)].isnan().all()
    assert (expect[4] == 0).all() and (expect[1] == 0).all()  # under the least scale: zero, as zero is
    if g == 7:  # segments [0, 4), [4, 11), [11, 18) hold only 1e-39: it still has a (denormal) scale
        assert (expect[5, :18] != 0).all()


@paths
def test_int8_gemm_is_not_the_fp32_product_of_unquantized_activations(isa):
    # the negative control of the shape sweep below: the bound there is tight enough to tell the
    # spec's int16 activations from the fp32 product of x as it is
    w, x = bf16(64, 256, seed=22), bf16(3, 256, seed=23)
    q, s = kernels.quantize_int8(w, 64)
    qp, sp = kernels.prepack_int8(q, s)
    y = kernels.linear_int8(x, qp, sp, None, 64, 64, out_dtype=torch.float32, isa=isa).double()
    expect, bound = deq_reference(x, q, s, 64, None)
    assert ((y - expect).abs() <= bound).all()
    plain = x.double() @ kernels.dequantize_int8(q, s, 64).double().T
    assert ((y - plain).abs() > bound).any()
    assert ((y - plain).abs() <= plain.abs().max() * 1e-4).all()  # yet near it: an int16 step is 1/32767


@pytest.mark.skipif(not {"avx512", "avx512_vnni"} <= set(kernels.available_isas()),
                    reason="this CPU lacks AVX512-VNNI (or the extension is not built)")
@pytest.mark.parametrize("m", [1, 3, 4, 5, 13])
def test_vnni_int8_equals_avx512_bit_for_bit(m):
    """vpdpwssd adds the same exact int32 products that vpmaddwd + vpaddd do (no saturation:
    |sum| < 2^31 by the spec), so AVX512-VNNI's results are AVX-512's, every bit, on the
    register path (up to 4 rows) and the panel one, with ragged groups and an offset; the
    negative control: a weight one step different changes them."""
    w, x = bf16(200, 1000, seed=40), bf16(m, 1000, seed=41) * 30
    q, s = kernels.quantize_int8(w, 96, 17)
    qp, sp = kernels.prepack_int8(q, s)
    b = torch.randn(200)
    got, want = (kernels.linear_int8(x, qp, sp, b, 200, 96, 17, out_dtype=torch.float32, isa=i)
                 for i in ("avx512_vnni", "avx512"))
    assert torch.equal(got, want)
    q[7, 500] = q[7, 500] + (1 if q[7, 500] < 127 else -1)
    other = kernels.linear_int8(x, *kernels.prepack_int8(q, s), b, 200, 96, 17, out_dtype=torch.float32,
                                isa="avx512_vnni")
    assert not torch.equal(other, want) and torch.equal(other[:, :7], want[:, :7])


@pytest.mark.skipif(not {"avx512", "avx512_vnni"} <= set(kernels.available_isas()),
                    reason="this CPU lacks AVX512-VNNI (or the extension is not built)")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 13])
@pytest.mark.parametrize("k,g,offset", [(1000, 96, 17), (999, 96, 17), (517, 517, 0), (301, 7, 3), (3, 2, 1)])
def test_vnni_byte_tile_equals_avx512_bit_for_bit(m, k, g, offset):
    """With 8-bit activations AVX512-VNNI multiplies bytes (vpdpbusd over quads of K, the weights'
    sign bits flipped, 128 * the activations' sums taken off): the same exact integers as
    AVX-512's int16 pairs, so the same bits, on segments that start and end inside a quad
    (group 96 at offset 17, group 7), K odd (the last quad lacks its second pair row) and units
    of few and many rows; the negative controls: a weight one step different, and the 16-bit
    activations, change them."""
    w, x = bf16(200, k, seed=42), bf16(m, k, seed=43) * 30
    q, s = kernels.quantize_int8(w, g, offset)
    qp, sp = kernels.prepack_int8(q, s)
    b = torch.randn(200)
    got, want = (kernels.linear_int8(x, qp, sp, b, 200, g, offset, torch.float32, i, 8)
                 for i in ("avx512_vnni", "avx512"))
    assert torch.equal(got, want)
    assert not torch.equal(got, kernels.linear_int8(x, qp, sp, b, 200, g, offset, torch.float32, "avx512_vnni"))
    col = k // 2
    q[7, col] = q[7, col] + (1 if q[7, col] < 127 else -1)
    other = kernels.linear_int8(x, *kernels.prepack_int8(q, s), b, 200, g, offset, torch.float32, "avx512_vnni", 8)
    assert not torch.equal(other, want) and torch.equal(other[:, :7], want[:, :7])


@pytest.mark.skipif(not {"amx", "avx512_vnni"} <= set(kernels.available_isas()),
                    reason="this CPU lacks AMX (or the extension is not built)")
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("m", [17, 23, 40, 100])
@pytest.mark.parametrize("k,g,offset", [(1000, 96, 17), (999, 96, 17), (2048, 128, 0), (301, 7, 3), (33, 2, 1),
                                        (7, 7, 0)])
def test_amx_int8_equals_vnni_bit_for_bit(m, k, g, offset, bits):
    """From 17 rows AMX multiplies INT8 (tdpbssd on the high bytes of the int16 activations, tdpbusd
    on the low ones, 256 H + L; with 8-bit activations tdpbssd alone), each tile row taking the
    even or the odd columns of the packed pair rows: the same exact integers as AVX512-VNNI's,
    so the same bits, on segments that start and end inside a 32-K step (group 96 at offset
    17, group 7, group 2), K odd and below one step (the last step zero-padded, not the next
    group's weights), passes of 8 rows and a ragged last one (17, 23, 100: two units); the
    negative controls: one weight a step different changes its column and no other, and the
    other activation bits change the result."""
    assert kernels.serving_isa("amx", "int8", rows=m) == "amx"
    w, x = bf16(200, k, seed=44), bf16(m, k, seed=45) * 30
    q, s = kernels.quantize_int8(w, g, offset)
    qp, sp = kernels.prepack_int8(q, s)
    b = torch.randn(200)
    got, want = (kernels.linear_int8(x, qp, sp, b, 200, g, offset, torch.float32, i, bits)
                 for i in ("amx", "avx512_vnni"))
    assert torch.equal(got, want)
    assert not torch.equal(got, kernels.linear_int8(x, qp, sp, b, 200, g, offset, torch.float32, "amx", 24 - bits))
    col = k // 2
    q[70, col] = q[70, col] + (1 if q[70, col] < 127 else -1)
    other = kernels.linear_int8(x, *kernels.prepack_int8(q, s), b, 200, g, offset, torch.float32, "amx", bits)
    changed = (other != want).any(0)
    assert changed[70] and changed.sum() == 1


@paths
@pytest.mark.parametrize("n,k,g,offset", [(15, 3, 2, 0), (100, 129, 32, 0), (257, 1000, 128, 0), (130, 300, 7, 3),
                                          (48, 4096, 4096, 0), (70, 100, 16, 5)])
def test_int8_gemm_with_8bit_activations_against_float64(n, k, g, offset, isa):
    """activation_bits=8: the spec with X in [-127, 127] (the same definition, float64), on
    every path, few rows and many, bf16 output its fp32 one rounded; and coarser than 16 bits:
    further from the product of x as it is (the negative control of the bound: 8-bit outputs are
    not the 16-bit ones)."""
    w, b = bf16(n, k, seed=n + k), bf16(n, seed=k)
    q, s = kernels.quantize_int8(w, g, offset)
    qp, sp = kernels.prepack_int8(q, s)
    for m in (1, 2, 3, 4, 5, 13, 97):
        x = bf16(m, k, seed=m + 50)
        expect, bound = deq_reference(x, q, s, g, b, offset, bits=8)
        y = kernels.linear_int8(x, qp, sp, b, n, g, offset, torch.float32, isa, 8)
        err = (y.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m} N={n} K={k}: max err {err.max():.3g}, bound {bound.max():.3g}"
        assert torch.equal(kernels.linear_int8(x, qp, sp, b, n, g, offset, None, isa, 8), y.bfloat16())
        y16 = kernels.linear_int8(x, qp, sp, b, n, g, offset, torch.float32, isa, 16)
        plain = x.double() @ kernels.dequantize_int8(q, s, g, offset).double().T + b.double()
        if k >= 100:
            assert (y16.double() - plain).abs().max() < (y.double() - plain).abs().max()


@native
def test_activation_bits_other_than_16_or_8_are_refused():
    q, s = kernels.quantize_int8(bf16(64, 32, seed=5), 8)
    qp, sp = kernels.prepack_int8(q, s)
    with pytest.raises(RuntimeError, match="activation_bits must be 16 or 8"):
        kernels.linear_int8(bf16(2, 32, seed=6), qp, sp, None, 64, 8, activation_bits=4)


def test_quantize_follows_its_definition():
    w = bf16(5, 10, seed=0)
    w[1] = 0  # an all-zero row gets scale 1, not a division by zero
    q, s = kernels.quantize_int8(w, 4)
    assert q.dtype == torch.int8 and q.shape == (5, 10) and s.shape == (5, 3)
    for n in range(5):
        for t in range(3):
            block = w[n, 4 * t:4 * t + 4].float()
            scale = block.abs().max() / 127 if block.abs().max() > 0 else torch.tensor(1.0)
            assert s[n, t] == scale
            assert torch.equal(q[n, 4 * t:4 * t + 4], torch.round(block / scale).to(torch.int8))
    assert q.abs().max() == 127
    err = (kernels.dequantize_int8(q, s, 4) - w.float()).abs()
    assert (err <= s.repeat_interleave(4, 1)[:, :10] / 2 + 1e-9).all()  # half a step at most


def test_quantizing_a_slice_on_group_boundaries_equals_slicing_the_quantized_whole():
    w = bf16(70, 96, seed=1)
    q, s = kernels.quantize_int8(w, 32)
    q2, s2 = kernels.quantize_int8(w[10:50, 32:96], 32)
    assert torch.equal(q2, q[10:50, 32:96]) and torch.equal(s2, s[10:50, 1:3])
    qc, sc = kernels.quantize_int8(w[10:50])  # per row: slicing rows only
    assert torch.equal(qc, kernels.quantize_int8(w)[0][10:50]) and torch.equal(sc, kernels.quantize_int8(w)[1][10:50])


def test_packed_layouts_follow_their_definition():
    q, s = kernels.quantize_int8(bf16(70, 9, seed=2), 4)
    qp, sp = kernels.prepack_int8(q, s)
    assert qp.shape == (2, 5, 128) and sp.shape == (2, 3, 64)
    for n in (0, 5, 63, 64, 69):
        for k in range(9):  # element (g, p, 2 c + r) = Q[64 g + c, 2 p + r]
            assert qp[n // 64, k // 2, 2 * (n % 64) + k % 2] == q[n, k]
        assert torch.equal(sp[n // 64, :, n % 64], s[n])
    assert (qp[:, 4, 1::2] == 0).all()  # past K (9 columns: the last pair's second)
    assert (qp[1, :, 12:] == 0).all() and (sp[1, :, 6:] == 0).all()  # past N
    back = kernels.unpack_int8(qp, sp, 70, 9)
    assert torch.equal(back[0], q) and torch.equal(back[1], s)


@paths
@pytest.mark.parametrize("n,k,g", [(1, 1, None), (15, 3, 2), (64, 64, 16), (100, 129, 32), (257, 1000, 128),
                                   (48, 4096, None), (130, 300, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_shape_sweep_against_float64(n, k, g, bias, isa):
    w = bf16(n, k, seed=n * 5 + k)
    b = bf16(n, seed=k) if bias else None
    q, s = kernels.quantize_int8(w, g)
    qp, sp = kernels.prepack_int8(q, s)
    group = k if g is None else g
    for m in (1, 2, 3, 4, 5, 6, 7, 13, 97, 300):
        x = bf16(m, k, seed=m)
        expect, bound = deq_reference(x, q, s, group, b)
        y32 = kernels.linear_int8(x, qp, sp, b, n, group, out_dtype=torch.float32, isa=isa)
        err = (y32.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m} N={n} K={k} G={g}: max err {err.max():.3g}, bound {bound.max():.3g}"
        assert torch.equal(kernels.linear_int8(x, qp, sp, b, n, group, isa=isa), y32.bfloat16())
        # few rows take the in-register path, many the fp32 panel: the same sums in the same order
        assert torch.equal(kernels.linear_int8(x[:1], qp, sp, b, n, group, out_dtype=torch.float32, isa=isa), y32[:1])


def test_quantizing_a_shard_that_cuts_groups_with_an_offset_equals_slicing_the_whole():
    w = bf16(20, 100, seed=10)
    q, s = kernels.quantize_int8(w, 16)
    for k0, k1 in ((0, 48), (40, 80), (37, 100), (5, 9)):
        first, last = k0 // 16, -(-k1 // 16)
        # what a rank does: quantize the columns of the groups it touches, keep its own
        qe, se = kernels.quantize_int8(w[:, first * 16:min(100, last * 16)], 16)
        assert torch.equal(se, s[:, first:last]) and torch.equal(qe[:, k0 - first * 16:k1 - first * 16], q[:, k0:k1])
        deq = kernels.dequantize_int8(q[:, k0:k1], s[:, first:last], 16, k0 % 16)
        assert torch.equal(deq, kernels.dequantize_int8(q, s, 16)[:, k0:k1])


@paths
@pytest.mark.parametrize("k0,k1", [(40, 80), (37, 100), (5, 9), (0, 100)])
def test_int8_gemm_with_a_group_offset_against_float64(k0, k1, isa):
    w, b = bf16(130, 100, seed=11), bf16(130, seed=12)
    q, s = kernels.quantize_int8(w, 16)
    first, last = k0 // 16, -(-k1 // 16)
    ql, sl = q[:, k0:k1].contiguous(), s[:, first:last].contiguous()
    qp, sp = kernels.prepack_int8(ql, sl)
    for m in (1, 3, 7, 40):
        x = bf16(m, k1 - k0, seed=m)
        expect, bound = deq_reference(x, ql, sl, 16, b, k0 % 16)
        y = kernels.linear_int8(x, qp, sp, b, 130, 16, k0 % 16, torch.float32, isa)
        assert ((y.double() - expect).abs() <= bound).all(), f"M={m} [{k0}, {k1})"


@paths
def test_int8_gemm_is_the_same_on_any_number_of_threads(isa):
    q, s = kernels.quantize_int8(bf16(300, 512, seed=3), 64)
    qp, sp = kernels.prepack_int8(q, s)
    x = bf16(37, 512, seed=4)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(kernels.linear_int8(x, qp, sp, None, 300, 64, out_dtype=torch.float32, isa=isa))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@native
def test_int8_gemm_errors_name_the_fix():
    q, s = kernels.quantize_int8(bf16(64, 32, seed=5), 8)
    qp, sp = kernels.prepack_int8(q, s)
    x = bf16(2, 32, seed=6)
    with pytest.raises(RuntimeError, match="prepack_int8"):
        kernels.linear_int8(x, q, sp, None, 64, 8)
    with pytest.raises(RuntimeError, match="group size 16"):
        kernels.linear_int8(x, qp, sp, None, 64, 16)
    with pytest.raises(RuntimeError, match="group_offset must be in"):
        kernels.linear_int8(x, qp, sp, None, 64, 8, 8)
    with pytest.raises(RuntimeError, match="x must be a bfloat16 or float32"):
        kernels.linear_int8(x.half(), qp, sp, None, 64, 8)


@paths
def test_int8_ops_pass_opcheck(isa):
    q, s = kernels.quantize_int8(bf16(70, 40, seed=7), 8, 3)  # offset 3: the first group holds 5 columns
    assert s.shape == (70, 6)
    qp, sp = kernels.prepack_int8(q, s)
    torch.library.opcheck(torch.ops.autotp.linear_int8.default,
                          (bf16(3, 40, seed=8), qp, sp, bf16(70, seed=9), 70, 8, 3, torch.float32, isa))


@paths
@pytest.mark.parametrize("bits", [16, 8])
def test_int8_gemm_reuses_its_scratch_across_sizes(bits, isa):
    """linear_int8 keeps its activations' buffers on the calling thread from call to call (up to
    1 MB; a larger call gets its own): calls that grow and shrink, an odd K after a longer even
    one (stale values past the new rows' ends), a call over 1 MB between small ones, each against
    the spec. Negative control: one changed input moves a result past the bound."""
    for m, n, k in [(2, 70, 1001), (3, 70, 301), (130, 70, 4100), (1, 70, 9), (4, 70, 4099), (3, 70, 301)]:
        w = bf16(n, k, seed=k)
        q, s = kernels.quantize_int8(w, 128)
        qp, sp = kernels.prepack_int8(q, s)
        x = bf16(m, k, seed=m + k)
        expect, bound = deq_reference(x, q, s, 128, None, bits=bits)
        y = kernels.linear_int8(x, qp, sp, None, n, 128, out_dtype=torch.float32, isa=isa, activation_bits=bits)
        err = (y.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m} K={k}: max err {err.max():.3g}, bound {bound.max():.3g}"
    x[-1, 0] += 8
    moved = kernels.linear_int8(x, qp, sp, None, n, 128, out_dtype=torch.float32, isa=isa, activation_bits=bits)
    assert ((moved.double() - expect).abs() > bound).any()
