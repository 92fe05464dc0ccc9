"""autotp's native decode attention op (``autotp.kernels.decode_attention``) on every ISA path
this CPU runs, against float64: fp32 and bf16 queries, masks and biases, the bf16 pair products,
strided inputs, the last position read, the read-ahead, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import autotp
from autotp import kernels

needs_extension = pytest.mark.skipif(not kernels.available_isas(autotp.Runtime.from_env()),
                                     reason=f"extension unavailable: {kernels.status()[1]}")


def attention_reference(q, k, v, bias, scale):
    """The native op's definition in float64: softmax(q k^T * scale + bias) v per KV head's group."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + (bias[:, :, None, :] if bias.shape[1] == 1 else bias.reshape(*q.shape[:3], -1)).double()
    return torch.matmul(torch.softmax(s, -1), v.double())


@needs_extension
@pytest.mark.parametrize("isa", kernels.available_isas(autotp.Runtime.from_env()) or ["generic"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 17, 8), (1, 2, 8, 40, 64), (3, 1, 4, 9, 50), (2, 2, 1, 33, 128),
                                   (1, 1, 1, 1, 2), (2, 2, 2, 5, 3), (1, 2, 5, 64, 64), (1, 1, 3, 20, 32),
                                   (1, 1, 12, 35, 72), (2, 2, 4, 50, 96), (1, 1, 8, 16, 32)])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per_head"])
def test_native_decode_attention_against_float64(isa, shape, bias_kind):
    """Each ISA path of autotp.kernels.decode_attention (head dims that fill the vector lanes and
    ones that leave a tail) against float64, with no mask, a mask shared by the heads (left
    padding, an unfilled end; NaN in the positions it hides stays unread) and one per head; the
    negative control, another scale, differs. Lengths and head counts cover every blocking of
    positions and heads (blocks of a vector's width, wholly masked ones, tails; up to 12 query
    heads per KV head, the value pass's blocks of 4 and the rest)."""
    batch, kv_heads, group, length, dim = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, kv_heads, group, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    bias = None
    if bias_kind != "none":
        bias = torch.zeros(batch, 1 if bias_kind == "shared" else kv_heads * group, length)
        bias[..., length - length // 3:] = float("-inf")
        if length > 2:
            bias[0, ..., :1] = float("-inf")
        if bias_kind == "per_head":
            bias[:, :1, length // 2] = -1.5
    want = attention_reference(q, k, v, bias, 0.3)
    got = kernels.decode_attention(q, k, v, bias, 0.3, isa)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max().item() < 1e-5
    if bias_kind == "shared":  # positions no head reads are not read: NaN there changes nothing
        unread = bias[0, 0] == float("-inf")
        k[0, :, unread], v[0, :, unread] = float("nan"), float("nan")
        assert torch.equal(kernels.decode_attention(q, k, v, bias, 0.3, isa), got)
    wrong = kernels.decode_attention(q, k, v, bias, 0.6, isa)
    assert length == 1 or (wrong.double() - want).abs().max().item() > 1e-3
    if bias is not None:  # a head masked everywhere: NaN, as softmax over nothing is in torch
        bias[:, :1] = float("-inf")
        nan = kernels.decode_attention(q, k, v, bias, 0.3, isa)
        assert nan[:, 0, 0].isnan().all() and torch.isnan(attention_reference(q, k, v, bias, 0.3)[:, 0, 0]).all()


@needs_extension
@pytest.mark.parametrize("isa", kernels.available_isas(autotp.Runtime.from_env()) or ["generic"])
@pytest.mark.parametrize("shape", [(2, 2, 8, 40, 64), (1, 1, 12, 50, 128), (2, 1, 4, 33, 72), (1, 2, 5, 64, 40),
                                   (1, 1, 16, 16, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_native_decode_attention_of_a_bf16_query_against_float64(isa, shape, masked):
    """A bf16 model's query (exactly bf16) with 4 to 16 query heads per KV head, which AVX512-BF16
    scores with the keys across lanes (vdpbf16ps on transposed key pairs, 8 heads at a time),
    against float64 on every ISA: head dims of whole vectors and with a tail, blocks of
    positions and a tail, with a per-head mask (left padding, an unfilled end; NaN in the
    positions it hides stays unread) and without; the query given as bf16 gives the same bits; the
    negative control, another scale, differs."""
    batch, kv_heads, group, length, dim = shape
    gen = torch.Generator().manual_seed(sum(shape) + masked)
    q = torch.randn(batch, kv_heads, group, dim, generator=gen).bfloat16().float()
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    bias = None
    if masked:
        bias = torch.randn(batch, kv_heads * group, length, generator=gen)
        bias[..., length - length // 4:] = float("-inf")
        bias[0, :, :3] = float("-inf")
    want = attention_reference(q, k, v, bias, 0.3)
    if masked:  # positions no head reads: NaN there changes nothing (a block's scores are read whole)
        unread = (bias[0] == float("-inf")).all(0)
        k[0, :, unread], v[0, :, unread] = float("nan"), float("nan")
    got = kernels.decode_attention(q, k, v, bias, 0.3, isa)
    assert (got.double() - want).abs().max().item() < 1e-5
    assert torch.equal(kernels.decode_attention(q.bfloat16(), k, v, bias, 0.3, isa), got)  # given as bf16: the same
    wrong = kernels.decode_attention(q, k, v, bias, 0.6, isa)
    assert (wrong.double() - want).abs().max().item() > 1e-3


@needs_extension
@pytest.mark.parametrize("isa", ["avx512_bf16", "amx"])
def test_a_bf16_query_of_many_heads_takes_the_bf16_pair_products(isa):
    """Which path scored is seen from what only bf16 pair products do (vdpbf16ps, and AMX's
    tdpbf16ps): they read bf16 denormals as 0. One position's keys are the bf16 denormal 2^-130
    in every dim, the query 2^126: a score of 64 * 2^-4 = 4 by the FMAs (fp32 keeps the
    denormal), 0 by the pair products, so that position's weight (its value row of ones, the
    others 0) is e^4 / (e^4 + 31) or 1/32. With 4 query heads per KV head and the query exactly
    bf16, avx512_bf16 (keys across lanes) and amx (tile scores up to 16 heads, keys across lanes
    beyond) give 1/32; with 3 heads, or the query an fp32 ulp away from bf16, they give what the
    generic path gives."""
    if isa not in kernels.available_isas(autotp.Runtime.from_env()):
        pytest.skip(f"this CPU does not run {isa}: its bf16 pair products are tested where it does")

    def case(group, query):
        q = torch.full((1, 1, group, 64), query)
        k = torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16)
        v = torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16)
        k[0, 0, 5], v[0, 0, 5] = 2.0 ** -130, 1.0
        assert k[0, 0, 5, 0].item() == 2.0 ** -130  # a bf16 denormal, kept exactly
        return [kernels.decode_attention(q, k, v, None, 1.0, path)[0, 0, :, 0] for path in (isa, "generic")]

    fmas = math.exp(4) / (math.exp(4) + 31)
    for group in (4, 16, 20):  # AMX: tiles to 16 heads, keys across lanes past that
        pairs, generic = case(group, 2.0 ** 126)
        assert torch.allclose(generic, torch.full_like(generic, fmas), rtol=1e-5)
        assert torch.allclose(pairs, torch.full_like(pairs, 1 / 32), rtol=1e-5)
    for group, query in [(3, 2.0 ** 126), (4, 2.0 ** 126 * (1 + 2.0 ** -23))]:
        fast, generic = case(group, query)
        assert torch.allclose(fast, generic, rtol=1e-5) and abs(generic[0].item() - fmas) < 1e-4


@needs_extension
def test_native_decode_attention_reads_a_strided_bias_and_query_as_their_copies():
    """The op reads a float32 bias whose positions are contiguous where it lies (the model's mask
    is a slice of a larger one) and widens a bf16 query itself: the same bits as with contiguous
    copies given, and as a strided query (copied inside the op); a wrong bias differs."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 8, 64, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 40, 64, generator=gen).bfloat16() for _ in range(2))
    big = torch.randn(2, 16, 3, 48, generator=gen)
    big[..., 30:40] = float("-inf")
    bias = big[:, :, -1, :40]  # [2, 16, 40], rows 144 floats apart
    assert not bias.is_contiguous() and bias.stride(-1) == 1
    want = kernels.decode_attention(q.float(), k, v, bias.contiguous(), 0.125)
    assert torch.equal(kernels.decode_attention(q, k, v, bias, 0.125), want)
    strided_q = q.float().transpose(2, 3).contiguous().transpose(2, 3)  # the same values, not contiguous
    assert not strided_q.is_contiguous()
    assert torch.equal(kernels.decode_attention(strided_q, k, v, bias, 0.125), want)
    shared = big[:, :1, -1, :40]  # one row for all heads, batch rows 2304 floats apart
    assert torch.equal(kernels.decode_attention(q, k, v, shared, 0.125),
                       kernels.decode_attention(q, k, v, shared.contiguous(), 0.125))
    assert not torch.equal(kernels.decode_attention(q, k, v, big[:, :, 0, :40], 0.125), want)


@needs_extension
@pytest.mark.parametrize("isa", kernels.available_isas(autotp.Runtime.from_env()) or ["generic"])
@pytest.mark.parametrize("bias_kind", ["shared", "per_head"])
def test_native_decode_attention_stops_at_the_last_position_read(isa, bias_kind):
    """A static cache is allocated for the whole generation and a step's mask hides the rows not
    written yet: the op over 200 positions of which the first 37 are read (garbage, NaN and
    huge values, behind the mask) gives the same bits as over those 37 alone (so the compiled
    step over a static cache and the plain one over a cache of the tokens so far agree) and
    matches float64; the negative control, the first 36 alone, differs."""
    batch, kv_heads, group, length, live, dim = 2, 2, 3, 200, 37, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, kv_heads, group, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    k[:, :, live::2], v[:, :, live + 1::2] = float("nan"), 3e38
    bias = torch.zeros(batch, 1 if bias_kind == "shared" else kv_heads * group, length)
    bias[..., live:] = float("-inf")
    if bias_kind == "per_head":  # head 0 stops earlier: the last position any head reads counts
        bias[:, 0, live - 5:] = float("-inf")
    got = kernels.decode_attention(q, k, v, bias, 0.3, isa)
    prefix = kernels.decode_attention(q, k[:, :, :live].contiguous(), v[:, :, :live].contiguous(),
                                      bias[..., :live].contiguous(), 0.3, isa)
    assert torch.equal(got, prefix)
    want = attention_reference(q, k[:, :, :live], v[:, :, :live], bias[..., :live], 0.3)
    assert (got.double() - want).abs().max().item() < 1e-5
    shorter = kernels.decode_attention(q, k[:, :, :live - 1].contiguous(), v[:, :, :live - 1].contiguous(),
                                       bias[..., :live - 1].contiguous(), 0.3, isa)
    assert (shorter - got).abs().max().item() > 1e-4


@needs_extension
@pytest.mark.parametrize("isa", kernels.available_isas(autotp.Runtime.from_env()) or ["generic"])
@pytest.mark.parametrize("group", [1, 8])
def test_native_decode_attention_reads_ahead_without_changing_a_bit(isa, group):
    """The op's read-ahead (the keys, then the values, then the next KV head's keys, prefetched
    ahead of the reads: on where weight_prefetch is) changes no result: the same bits with it
    on and off, over 6 (row, KV head) pairs with 90 of 160 positions read, a bf16 query (the
    tile and across-lanes scores where the ISA has them) and a float32 one; and both match
    float64 (so a prefetch that replaced a read would be seen)."""
    gen = torch.Generator().manual_seed(group)
    q = torch.randn(2, 3, group, 64, generator=gen).bfloat16()
    k, v = (torch.randn(2, 3, 160, 64, generator=gen).bfloat16() for _ in range(2))
    bias = torch.zeros(2, 1, 160)
    bias[..., 90:] = float("-inf")
    was = kernels.weight_prefetch()
    try:
        runs = {}
        for on in (True, False):
            kernels.weight_prefetch(on)
            runs[on] = [kernels.decode_attention(x, k, v, bias, 0.125, isa) for x in (q, q.float())]
    finally:
        kernels.weight_prefetch(was)
    want = attention_reference(q.float(), k, v, bias, 0.125)
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a, b)
        assert (a.double() - want).abs().max().item() < 1e-5


@needs_extension
@pytest.mark.parametrize("case", ["float_key", "shape", "bias_shape", "half_query"])
def test_native_decode_attention_refuses_bad_input(case):
    q = torch.randn(1, 2, 2, 8)
    k, v, bias = torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 5, 8).bfloat16(), torch.zeros(1, 1, 5)
    if case == "float_key":
        k = k.float()
    elif case == "shape":
        v = torch.randn(1, 2, 6, 8).bfloat16()
    elif case == "bias_shape":
        bias = torch.zeros(1, 3, 5)
    elif case == "half_query":
        q = q.half()
    with pytest.raises(RuntimeError, match="autotp::decode_attention"):
        kernels.decode_attention(q, k, v, bias, 0.5)
