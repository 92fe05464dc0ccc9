"""The extension's machine ops through autotp.kernels (csrc/machine_ops.cpp): the weights'
software prefetch and its distance change no value and default per CPU, the op clock counts
by kind, and any kernels call may come first in a process."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from autotp import kernels
from test_kernels import PATHS, bf16, cpuinfo, paths, reference


@paths
def test_weight_prefetch_switch_changes_no_value(isa):
    """The weights' software prefetch (kernels.weight_prefetch) on or off: every bf16 (bf16 and
    fp32 activations), INT8 and INT4 product the same bits, at the row counts whose tiles the
    switch reaches (1-2) and beyond; the bf16 ones within the float64 bound, so the values
    compared are right, and a nudged weight shows (the comparison can fail)."""
    n, k = 130, 1000
    w = bf16(n, k, seed=21)
    packed = kernels.prepack(w)
    q8, s8 = kernels.prepack_int8(*kernels.quantize_int8(w.float(), 128))
    q4, s4, z4 = kernels.prepack_int4(*kernels.quantize_int4(w.float(), 128))
    xs = {m: bf16(m, k, seed=m) for m in (1, 2, 3, 4, 7)}

    def products(weight: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for m, x in xs.items():
            out += [kernels.linear(x, weight, None, n, torch.float32, isa),
                    kernels.linear(x.float(), weight, None, n, torch.float32, isa),
                    kernels.linear_int8(x, q8, s8, None, n, 128, isa=isa),
                    kernels.linear_int4(x, q4, s4, z4, None, n, 128, isa=isa)]
        return out

    before, before_pairs = kernels.weight_prefetch(), kernels.weight_prefetch_pairs()
    try:
        results = {on: (kernels.weight_prefetch(on), products(packed))[1] for on in (True, False)}
        assert kernels.weight_prefetch() is False
        for i, (a, b) in enumerate(zip(results[True], results[False])):
            assert torch.equal(a, b), f"{isa}: product {i} differs with the prefetch off"
        kernels.weight_prefetch(True)
        for pairs in (0, 4, 256):  # the distance too (past the end of the weights at 256)
            assert kernels.weight_prefetch_pairs(pairs) == pairs
            for i, (a, b) in enumerate(zip(products(packed), results[False])):
                assert torch.equal(a, b), f"{isa}: product {i} differs {pairs} pairs ahead"
        kernels.weight_prefetch(False)
        for m, x in xs.items():
            expect, bound = reference(x, w, None)
            got = results[False][4 * list(xs).index(m)]
            assert ((got.double() - expect).abs() <= bound).all(), (isa, m)
        nudged = w.clone()
        nudged.view(torch.int16)[n // 2, k // 3] += 1
        assert not torch.equal(kernels.linear(xs[1], kernels.prepack(nudged), None, n, torch.float32, isa),
                               results[False][0])
        with pytest.raises(RuntimeError, match="weight_prefetch_pairs: pairs is -1"):
            kernels.weight_prefetch_pairs(257)
    finally:
        kernels.weight_prefetch(before)
        kernels.weight_prefetch_pairs(before_pairs)


@paths
def test_op_clock_counts_each_op_by_kind_only_while_on(isa):
    """kernels.op_clock: while on, each bf16 / INT8 / INT4 product is one GEMM call and each
    decode_attention one attention call, their time inside the wall time around them; reading
    resets; while off (the negative control) the same calls add nothing."""
    n, k = 70, 256
    w = bf16(n, k, seed=5)
    packed = kernels.prepack(w)
    q8, s8 = kernels.prepack_int8(*kernels.quantize_int8(w.float(), 128))
    q4, s4, z4 = kernels.prepack_int4(*kernels.quantize_int4(w.float(), 128))
    x = bf16(2, k, seed=6)
    q, key, value = bf16(1, 2, 4, 64, seed=7), bf16(1, 2, 9, 64, seed=8), bf16(1, 2, 9, 64, seed=9)

    def calls() -> float:
        start = time.perf_counter()
        for _ in range(3):
            kernels.linear(x, packed, None, n, torch.float32, isa)
        kernels.linear_int8(x, q8, s8, None, n, 128, isa=isa)
        kernels.linear_int4(x, q4, s4, z4, None, n, 128, isa=isa)
        kernels.decode_attention(q.float(), key, value, None, 0.125, isa)
        return time.perf_counter() - start

    kernels.op_clock(False)
    try:
        kernels.op_clock(True)
        wall = calls()
        read = kernels.op_clock()
        assert [read[kind][1] for kind in kernels.OP_KINDS] == [5, 0, 1], read
        assert 0 < read["gemm"][0] and 0 < read["attention"][0] and read["gemm"][0] + read["attention"][0] <= wall
        assert kernels.op_clock(False) == {kind: (0.0, 0) for kind in kernels.OP_KINDS}  # the read reset it
        calls()
        assert kernels.op_clock() == {kind: (0.0, 0) for kind in kernels.OP_KINDS}  # off: nothing added
    finally:
        kernels.op_clock(False)


@pytest.mark.skipif(not PATHS, reason="extension unavailable")
def test_weight_prefetch_default_is_off_on_amd_with_avx512_only():
    """The switch's defaults, in a fresh process: off where /proc/cpuinfo names AMD and AVX-512
    (Zen 4: the streaming tiles measured faster without it), on elsewhere; the bf16 streaming
    distance 4 pairs on AMD without AVX-512 (Zen 1-3), 16 elsewhere."""
    vendor, flags = cpuinfo("vendor_id"), cpuinfo("flags").split()
    amd, avx512 = vendor == "AuthenticAMD", "avx512f" in flags
    code = ("from autotp import kernels; assert kernels.extension_loaded(); "
            "print(kernels.weight_prefetch(), kernels.weight_prefetch_pairs())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(not (amd and avx512)), "4" if amd and not avx512 else "16"], (vendor, out.stdout)


@pytest.mark.skipif(not PATHS, reason="extension unavailable")
def test_any_kernels_call_may_come_first(monkeypatch):
    """A fresh process whose first autotp.kernels call is prepack (or the prefetch switch)
    builds the extension then, as status() would; where it cannot be built the call says so
    and names the op (negative control: a build that fails)."""
    code = ("import torch; from autotp import kernels; "
            "p = kernels.prepack(torch.ones(64, 64, dtype=torch.bfloat16)); "
            "print(p.dtype, kernels.weight_prefetch_pairs() >= 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.bfloat16", "True"], out.stdout

    def broken(verbose: bool, portable: bool) -> list[str]:
        raise OSError("no compiler here")

    monkeypatch.setattr(kernels, "_EXTENSION", kernels.Extension(build=broken))
    with pytest.raises(RuntimeError, match="prepack_bf16 needs the C\\+\\+ extension.*no compiler here"):
        kernels.prepack(torch.ones(64, 64, dtype=torch.bfloat16))
