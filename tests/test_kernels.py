"""The native BF16 GEMM (autotp.kernels) against float64 references, the packed layout against
its definition, the ops under torch.library.opcheck, and the dispatch of the parallel layers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autotp import kernels
from autotp.comm.threads import ThreadWorld
from autotp.runtime import Runtime
from autotp.sharding.layers import ColumnParallelLinear, PackableLinear, RowParallelLinear

AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}


def cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo ("" where it has none)."""
    for line in open("/proc/cpuinfo"):
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def test_extension_builds_and_picks_the_best_path_the_cpu_has():
    ok, why = kernels.status(Runtime())  # the CPU's own answer, whatever AUTOTP_ISA the caller set
    flags = cpu_flags()
    if Runtime.from_env().portable_build:  # AUTOTP_PORTABLE_BUILD=1: the generic code only, on any CPU
        assert not ok and "portable code only" in why, why
    elif AVX512 | {"fma", "avx512_bf16", "amx_bf16", "amx_tile"} <= flags:
        assert ok and why == "amx", why
    elif AVX512 | {"fma", "avx512_bf16"} <= flags:
        assert ok and why == "avx512_bf16", why
    elif AVX512 | {"fma", "avx512_vnni"} <= flags:
        assert ok and why == "avx512_vnni", why
    elif AVX512 | {"fma"} <= flags:
        assert ok and why == "avx512", why
    elif {"avx2", "fma"} <= flags:
        assert ok and why == "avx2", why
    else:
        assert not ok and "neither AVX2" in why
    assert kernels.available_isas(Runtime())[-1] == "generic"  # the spec runs on every CPU


native = pytest.mark.skipif(not kernels.status()[0], reason=f"native kernels unavailable: {kernels.status()[1]}")
# every path this machine can run (capped by AUTOTP_ISA when whoever runs the suite sets it),
# each tested on its own; the generic one everywhere the extension builds
PATHS = kernels.available_isas(Runtime.from_env())
paths = pytest.mark.parametrize("isa", PATHS or [pytest.param("", marks=pytest.mark.skip(
    reason=f"extension unavailable: {kernels.status()[1]}"))])


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x W^T + b in float64 (exact products of the bf16 inputs) and the bound on fp32 rounding
    error: k * 2^-24 * (|x| |W|^T + |b|), with k = 2 log2(K) + 4 for pairwise-free summation
    splits (chunks of K, then the bias), loose enough for any fp32 summation order."""
    x64, w64 = x.double(), w.double()
    y = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    k = x.shape[-1]
    return y, mag * (k + 2) * 2.0**-24 + 1e-30


@paths
# (20, 4200): K over one pass of the AVX512-BF16 tile (2048 K pairs), so partial sums carry between passes
@pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (16, 32), (17, 31), (100, 129), (257, 1000), (48, 4096), (20, 4200)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_shape_sweep_against_float64(n, k, bias, isa):
    w = bf16(n, k, seed=n * 7 + k)
    b = bf16(n, seed=k) if bias else None
    packed = kernels.prepack(w)
    for m in (1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 64, 97, 255, 1024, 2048):
        if m * n * k > 2**27:
            continue
        x = bf16(m, k, seed=m)
        expect, bound = reference(x, w, b)
        y32 = kernels.linear(x, packed, b, n, torch.float32, isa)
        err = (y32.double() - expect).abs()
        assert (err <= bound).all(), f"M={m} N={n} K={k}: max err {err.max():.3g}, bound {bound.max():.3g}"
        # bf16 output: the fp32 result rounded once, to nearest even
        assert torch.equal(kernels.linear(x, packed, b, n, isa=isa), y32.bfloat16()), f"{isa} M={m} N={n} K={k}"


@paths
def test_a_groups_last_k_pairs_never_read_the_next_groups_weights(isa):
    """In the packed layout a group's K pairs are followed by the next group's: a tile that
    walks K in whole steps (AMX: 16 pairs) must not multiply past K2 there. Columns 64.. are
    infinite; with K2 = 19 (a tail of 3 pairs after a step of 16) every path and row count (AMX's
    streaming tile up to 16 rows, its prefill tile from 17) must still give columns 0..63 within
    the float64 bound, where one infinity read would make them inf or NaN."""
    k = 37
    w = bf16(130, k, seed=5)
    w[64:] = float("inf")
    packed = kernels.prepack(w)
    for m in (1, 4, 16, 17, 40):
        x = bf16(m, k, seed=m)
        expect, bound = reference(x, w[:64], None)
        y = kernels.linear(x, packed, None, 130, torch.float32, isa)[:, :64]
        err = (y.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m}: max err {err.max():.3g}, bound {bound.max():.3g}"
    # negative control: an infinity inside the group reaches its column
    w[3, k - 1] = float("inf")
    assert not kernels.linear(x, kernels.prepack(w), None, 130, torch.float32, isa)[:, 3].isfinite().all()


@paths
def test_gemm_reuses_its_scratch_across_sizes(isa):
    """linear_bf16 keeps the padded copy of a few bf16 rows on the calling thread from call to call:
    calls that grow and shrink, a short K after a long one (the padding past K must be zero again,
    not the last call's values: a call over infinities before each leaves them there), each
    against float64. Negative control: one changed input moves a result past the bound."""
    poison, poison_packed = torch.full((6, 4200), float("inf")).bfloat16(), kernels.prepack(bf16(16, 4200, seed=1))
    for m, n, k in [(2, 40, 1000), (3, 40, 31), (1, 40, 4200), (4, 40, 17), (200, 40, 3000), (2, 40, 33)]:
        kernels.linear(poison[:m], poison_packed, None, 16, torch.float32, isa)
        w = bf16(n, k, seed=k)
        packed = kernels.prepack(w)
        x = bf16(m, k, seed=m + k)
        expect, bound = reference(x, w, None)
        y = kernels.linear(x, packed, None, n, torch.float32, isa)
        err = (y.double() - expect).abs()
        assert (err <= bound).all(), f"{isa} M={m} K={k}: max err {err.max():.3g}, bound {bound.max():.3g}"
    x[-1, 0] += 8
    assert ((kernels.linear(x, packed, None, n, torch.float32, isa).double() - expect).abs() > bound).any()


@paths
@pytest.mark.parametrize("n,k", [(257, 1000), (130, 4200)])
def test_few_rows_give_each_row_the_one_row_result(n, k, isa):
    """Decoding with beams (2-4 rows) takes other tiles than one row (AVX2: 2 rows x 2 blocks
    over K chunks; the K order of each sum kept): every row of a few-row call equals, bit for
    bit, that row computed alone, on the paths that widen bf16 to fp32 and on AMX (one tile
    serves 1-16 rows, each row's sums alike); AVX512-BF16 pairs K differently for 1 row and
    for more, and is checked by the float64 sweep only."""
    if kernels.serving_isa(isa, "bf16", torch.bfloat16, 4) not in ("generic", "avx2", "avx512", "amx"):
        pytest.skip(f"{isa} serves 4 bf16 rows with bf16 dot products: pairs are summed in another order")
    w = bf16(n, k, seed=11)
    packed = kernels.prepack(w)
    x = bf16(4, k, seed=12)
    alone = torch.cat([kernels.linear(x[i:i + 1], packed, None, n, torch.float32, isa) for i in range(4)])
    for m in (2, 3, 4):
        assert torch.equal(kernels.linear(x[:m], packed, None, n, torch.float32, isa), alone[:m]), (isa, m)
    # negative control: one weight one bf16 ulp off (the check sees it)
    nudged = w.clone()
    nudged.view(torch.int16)[n // 2, k // 3] += 1
    assert not torch.equal(kernels.linear(x[:4], kernels.prepack(nudged), None, n, torch.float32, isa), alone)


@paths
def test_gemm_leading_dims_fp32_input_and_empty(isa):
    w, b = bf16(40, 24, seed=1), bf16(40, seed=2)
    packed = kernels.prepack(w)
    x = bf16(2, 3, 24, seed=3)
    y = kernels.linear(x, packed, b, 40, isa=isa)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y, kernels.linear(x.reshape(6, 24), packed, b, 40, isa=isa).reshape(2, 3, 40))
    y32 = kernels.linear(x.float(), packed, b, 40, isa=isa)
    assert y32.dtype == torch.float32 and torch.allclose(y32, y.float(), atol=0.05)
    assert kernels.linear(bf16(0, 24, seed=4), packed, None, 40, isa=isa).shape == (0, 40)
    strided = bf16(24, 3, seed=5).t()  # rows 1 apart, columns 3: not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(kernels.linear(strided, packed, b, 40, isa=isa),
                       kernels.linear(strided.contiguous(), packed, b, 40, isa=isa))
    q, s = kernels.quantize_int8(w.float(), 8)
    qp, sp = kernels.prepack_int8(q, s)
    assert torch.equal(kernels.linear_int8(strided, qp, sp, b, 40, 8, isa=isa),
                       kernels.linear_int8(strided.contiguous(), qp, sp, b, 40, 8, isa=isa))
    assert not torch.equal(kernels.linear(strided, packed, b, 40, isa=isa),  # negative control: the rows matter
                           kernels.linear(strided.flip(0), packed, b, 40, isa=isa))


@paths
def test_gemm_reaches_all_columns_and_rows_with_many_threads(isa):
    """Every output element written exactly once whatever the split (poisoned output would show)."""
    w = bf16(1000, 64, seed=5)
    packed = kernels.prepack(w)
    x = bf16(300, 64, seed=6)
    expect, bound = reference(x, w, None)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = kernels.linear(x, packed, None, 1000, torch.float32, isa)
            assert ((y.double() - expect).abs() <= bound).all(), (isa, threads)
    finally:
        torch.set_num_threads(before)


@native
@pytest.mark.parametrize("n,k", [(1, 1), (17, 31), (64, 4), (70, 5)])
def test_packed_layout_is_the_documented_one(n, k):
    w = bf16(n, k, seed=9)
    packed = kernels.prepack(w)
    assert packed.shape == (math.ceil(n / 64), math.ceil(k / 2), 128) and packed.dtype == torch.bfloat16
    zero = torch.tensor(0, dtype=torch.bfloat16)
    for g in range(packed.shape[0]):
        for p in range(packed.shape[1]):
            for j in range(4):
                for i in range(16):
                    for s in range(2):
                        row, col = 64 * g + 16 * j + i, 2 * p + s
                        want = w[row, col] if row < n and col < k else zero
                        assert packed[g, p, 32 * j + 2 * i + s] == want
    assert torch.equal(kernels.unpack(packed, n, k), w)


@native
def test_op_errors_name_the_problem():
    w = bf16(20, 10, seed=1)
    packed = kernels.prepack(w)
    with pytest.raises(RuntimeError, match="does not hold a \\[20, 12\\] weight"):
        kernels.linear(bf16(2, 12, seed=2), packed, None, 20)
    with pytest.raises(RuntimeError, match="bias must be \\[20\\]"):
        kernels.linear(bf16(2, 10, seed=2), packed, bf16(21, seed=3), 20)
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensor"):
        kernels.prepack(w.float())
    with pytest.raises(RuntimeError, match="x must be a bfloat16 or float32"):
        kernels.linear(bf16(2, 10, seed=2).half(), packed, None, 20)


@paths
def test_opcheck(isa):
    w, b = bf16(33, 70, seed=1), bf16(33, seed=2)
    packed = kernels.prepack(w)
    x = bf16(5, 70, seed=3)
    torch.library.opcheck(torch.ops.autotp.prepack_bf16.default, (w,))
    torch.library.opcheck(torch.ops.autotp.unpack_bf16.default, (packed, 33, 70))
    for args in [(x, packed, b, 33, None, isa), (x, packed, None, 33, None, isa), (x, packed, b, 33, torch.float32, isa)]:
        torch.library.opcheck(torch.ops.autotp.linear_bf16.default, args)


def two_rank_layers(kind: type, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                    runtime: Runtime | None = None) -> list[torch.Tensor]:
    """Run a column or row layer of 2 simulated ranks, packed as ``runtime`` says; returns
    whether each packed and each rank's output."""
    source = nn.Linear(w.shape[1], w.shape[0], bias=True, dtype=w.dtype)
    source.weight.data, source.bias.data = w, b
    world = ThreadWorld(2)
    half = (w.shape[0] if kind is ColumnParallelLinear else w.shape[1]) // 2
    ranges = [[(0, half)], [(half, 2 * half)]]
    layers = [kind(source, ranges[r], world.group(r)) for r in range(2)]
    packed = [layer.pack_weight(runtime) for layer in layers]
    xs = [x, x] if kind is ColumnParallelLinear else [x[..., :half], x[..., half:]]
    outs = world.run(lambda r: layers[r](xs[r]))
    return [packed, outs]


@pytest.mark.parametrize("mode", ["native", "torch", *(f"native-{isa}" for isa in PATHS)])
@pytest.mark.parametrize("kind", [ColumnParallelLinear, RowParallelLinear])
def test_parallel_layers_dispatch_and_match_nn_linear(mode, kind):
    runtime = Runtime(kernels=mode.split("-")[0], isa=mode.split("-")[1] if "-" in mode else "auto")
    if mode == "native" and not kernels.status()[0]:
        pytest.skip(kernels.status()[1])
    w, b, x = bf16(64, 96, seed=1), bf16(64, seed=2), bf16(3, 5, 96, seed=3)
    packed, outs = two_rank_layers(kind, w, b, x, runtime)
    assert packed == [mode != "torch"] * 2
    expect = F.linear(x.float(), w.float(), b.float())
    if kind is ColumnParallelLinear:
        got = torch.cat(outs, dim=-1).float()
    else:
        assert torch.equal(outs[0], outs[1])
        got = outs[0].float()
    assert (got - expect).abs().max() <= 0.02 * expect.abs().max()  # bf16 output rounding


def test_float32_layers_stay_on_torch():
    layer = ColumnParallelLinear(nn.Linear(8, 8), [(0, 8)], ThreadWorld(1).group(0))
    assert not layer.pack_weight(Runtime(kernels="auto")) and not layer.packed


@native
def test_packed_layer_unpacks_to_its_weight():
    w = bf16(24, 40, seed=4)
    layer = ColumnParallelLinear(nn.Linear(40, 24, dtype=torch.bfloat16), [(0, 24)], ThreadWorld(1).group(0))
    layer.weight.data = w.clone()
    assert isinstance(layer, PackableLinear) and layer.pack_weight()
    assert layer.weight.shape == (1, 20, 128)
    assert torch.equal(layer.unpacked_weight(), w)


@native
def test_packing_in_row_chunks_with_release_equals_whole():
    """The loader's path: rows packed a chunk at a time, each chunk handed to ``release``."""
    w = bf16(1100, 4000, seed=8)  # 8 MiB chunks of 1024 rows: two chunks, the last ragged
    released = []
    layer = ColumnParallelLinear(nn.Linear(4000, 1100, dtype=torch.bfloat16), [(0, 1100)], ThreadWorld(1).group(0))
    layer.weight.data = w.clone()
    assert layer.pack_weight(release=released.append)
    assert torch.equal(layer.weight, kernels.prepack(w))
    assert [r.shape[0] for r in released] == [1024, 76]


@pytest.mark.skipif(not PATHS, reason="extension unavailable")
def test_each_call_goes_to_the_first_table_down_the_list_that_serves_it():
    """AVX512-BF16 adds only bf16-activation tiles, AMX those and an INT8 tile for more than
    16 rows, AVX512-VNNI only an INT8 tile: fp32 activations go to AVX-512, INT8 to AVX512-VNNI
    where the CPU has it (AMX from 17 rows); the other tables serve all. Every table but
    AVX512-VNNI's has its own decode attention."""
    int8_top = "avx512_vnni" if "avx512_vnni" in PATHS else "avx512"
    above_avx512 = ("amx", "avx512_bf16", "avx512_vnni")
    for isa in PATHS:
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 2, 4, 16, 17, 64):
                got = kernels.serving_isa(isa, "bf16", dtype, rows)
                if isa == "amx" and dtype == torch.bfloat16:
                    want = "amx"
                elif isa in ("amx", "avx512_bf16"):
                    want = "avx512_bf16" if dtype == torch.bfloat16 else "avx512"
                elif isa == "avx512_vnni":
                    want = "avx512"
                else:
                    want = isa
                assert got == want, (isa, dtype, rows, got)
        assert kernels.serving_isa(isa, "int8") == (int8_top if isa in above_avx512 else isa)
        # AMX multiplies INT8 from 17 rows (prompts, batches); fewer rows stream on AVX512-VNNI
        for rows in (4, 16, 17, 64):
            got = kernels.serving_isa(isa, "int8", rows=rows)
            assert got == ("amx" if isa == "amx" and rows > 16 else int8_top if isa in above_avx512 else isa), (isa, rows)
        # INT4: bf16 activations take AVX512-BF16's dot products, fp32 ones the AVX-512 tile
        assert kernels.serving_isa(isa, "int4", torch.bfloat16) == (
            "avx512_bf16" if isa == "amx" else "avx512" if isa == "avx512_vnni" else isa)
        assert kernels.serving_isa(isa, "int4", torch.float32) == ("avx512" if isa in above_avx512 else isa)
        # decode attention: AMX's own (tile scores), AVX512-VNNI hands it to AVX-512
        assert kernels.serving_isa(isa, "attention") == ("avx512" if isa == "avx512_vnni" else isa)
    with pytest.raises(RuntimeError, match="weight must be bf16, int8, int4 or attention"):
        kernels.serving_isa("", "int2")
