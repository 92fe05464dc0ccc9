"""The weight-only INT8 GEMM (autotp.kernels.linear_int8) against a float64 product with the
dequantised weight, its two paths (registers for few rows, an fp32 panel for many) against each
other, quantization against its definition, and the packed layouts against theirs."""
import pytest
import torch

from autotp import kernels
from test_kernels import bf16, native, paths


def deq_reference(x, q, s, g, b, offset=0):
    """x (Q S)^T + b in float64 with the fp32-rounded dequantised weight, and the fp32 error bound
    (the kernels scale fp32 sums of x * Q once per segment of a group: one more rounding)."""
    w = kernels.dequantize_int8(q, s, g, offset).double()
    x64 = x.double()
    y, mag = x64 @ w.T, x64.abs() @ w.abs().T
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    return y, mag * (x.shape[-1] + 4) * 2.0**-24 + 1e-30


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
    assert qp.shape == (2, 9, 64) and sp.shape == (2, 3, 64)
    for n in (0, 5, 63, 64, 69):
        assert torch.equal(qp[n // 64, :, n % 64], q[n]) and torch.equal(sp[n // 64, :, n % 64], s[n])
    assert (qp[1, :, 6:] == 0).all() and (sp[1, :, 6:] == 0).all()  # past N


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
