"""The extension's first-use self-check (autotp.kernels.selfcheck: every vector path the CPU
selects against the generic one, a path that differs switched off with a warning) and the
fallback when the extension cannot build."""
import warnings

import pytest
import torch
from torch import nn

from autotp import kernels
from autotp.comm.threads import ThreadWorld
from autotp.runtime import Runtime
from autotp.sharding.layers import ColumnParallelLinear, pack_layers
from test_kernels import PATHS


def test_self_check_passes_every_path_here():
    assert kernels.selfcheck.check_paths(PATHS) == {}
    assert kernels._EXTENSION.disabled == {}


@pytest.mark.skipif(not PATHS, reason="extension unavailable")
def test_negative_control_self_check_switches_off_a_wrong_kernel(monkeypatch):
    """A deliberately wrong GEMM (off by 1e-3 of the output's scale in one column) registered
    for a path: the self-check names the ISA and the shape, and the handle drops that path."""
    def wrong(x, packed, bias, n, out_dtype, isa):
        y = torch.ops.autotp.linear_bf16(x, packed, bias, n, out_dtype, "generic")
        y[..., 3] += 1e-3 * y.abs().max()
        return y

    failed = kernels.selfcheck.check_paths(["avx2", "generic"], linear_bf16=wrong)
    assert set(failed) == {"avx2"} and "bf16 GEMM differs" in failed["avx2"] and "M=1 N=70 K=33" in failed["avx2"]

    def wrong_int8(x, q, s, bias, n, g, o, out_dtype, isa, bits):
        y = torch.ops.autotp.linear_int8(x, q, s, bias, n, g, o, out_dtype, "generic", bits)
        return y * (1 + 1e-4)

    def right(x, packed, bias, n, out_dtype, isa):  # the bf16 side passes, on any build
        return torch.ops.autotp.linear_bf16(x, packed, bias, n, out_dtype, "generic")

    failed = kernels.selfcheck.check_paths(["avx512"], linear_bf16=right, linear_int8=wrong_int8)
    assert "INT8 GEMM (16-bit activations) differs" in failed["avx512"]

    def wrong_int8_bytes(x, q, s, bias, n, g, o, out_dtype, isa, bits):  # wrong with 8-bit activations only
        y = torch.ops.autotp.linear_int8(x, q, s, bias, n, g, o, out_dtype, "generic", bits)
        return y * (1 + 1e-4) if bits == 8 else y

    failed = kernels.selfcheck.check_paths(["avx512"], linear_bf16=right, linear_int8=wrong_int8_bytes)
    assert "INT8 GEMM (8-bit activations) differs" in failed["avx512"]

    def right_int8(x, q, s, bias, n, g, o, out_dtype, isa, bits):
        return torch.ops.autotp.linear_int8(x, q, s, bias, n, g, o, out_dtype, "generic", bits)

    def wrong_int4(x, q, s, z, bias, n, g, o, out_dtype, isa):  # one column off by 1e-3 of the scale
        y = torch.ops.autotp.linear_int4(x, q, s, z, bias, n, g, o, out_dtype, "generic")
        y[..., 5] += 1e-3 * y.abs().max()
        return y

    failed = kernels.selfcheck.check_paths(["avx2"], linear_bf16=right, linear_int8=right_int8,
                                           linear_int4=wrong_int4)
    assert "INT4 GEMM differs" in failed["avx2"] and "M=1 N=70 K=33" in failed["avx2"]

    def right_int4(x, q, s, z, bias, n, g, o, out_dtype, isa):
        return torch.ops.autotp.linear_int4(x, q, s, z, bias, n, g, o, out_dtype, "generic")

    def wrong_attention(q, k, v, bias, scale, isa):  # one output off by 1e-3 of the values' scale
        y = torch.ops.autotp.decode_attention(q, k, v, bias, scale, "generic")
        y[1, 0, 2, 7] += 1e-3 * v.float().abs().max()
        return y

    failed = kernels.selfcheck.check_paths(["avx2"], linear_bf16=right, linear_int8=right_int8,
                                           linear_int4=right_int4, decode_attention=wrong_attention)
    assert set(failed) == {"avx2"} and "decode attention differs" in failed["avx2"]

    def wrong_for_many_heads(q, k, v, bias, scale, isa):  # off only with many heads per KV head
        return wrong_attention(q, k, v, bias, scale, isa) if q.shape[2] >= 4 else \
            torch.ops.autotp.decode_attention(q, k, v, bias, scale, "generic")

    failed = kernels.selfcheck.check_paths(["avx2"], linear_bf16=right, linear_int8=right_int8,
                                           linear_int4=right_int4, decode_attention=wrong_for_many_heads)
    assert set(failed) == {"avx2"} and "(9 heads per KV head" in failed["avx2"]
    handle = kernels.Extension(build=lambda verbose, portable: ["avx2", "generic"],
                               check=lambda isas: kernels.selfcheck.check_paths(isas, linear_bf16=wrong))
    monkeypatch.setattr(kernels, "_EXTENSION", handle)
    with pytest.warns(UserWarning, match="avx2 kernels are switched off on this CPU: its bf16 GEMM differs"):
        assert kernels.extension_loaded()
    assert kernels.available_isas(Runtime()) == ["generic"] and not kernels.status(Runtime())[0]


def test_build_failure_falls_back_once_or_raises_when_forced(monkeypatch):
    """A machine where the extension cannot build: auto warns once and stays on torch; native
    raises with the cause."""
    def failing(verbose: bool, portable: bool) -> list[str]:
        raise OSError("g++: not found")

    monkeypatch.setattr(kernels, "_EXTENSION", kernels.Extension(build=failing))
    auto = Runtime(kernels="auto")
    model = nn.Sequential(ColumnParallelLinear(nn.Linear(8, 8, dtype=torch.bfloat16), [(0, 8)],
                                               ThreadWorld(1).group(0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pack_layers(model, auto) == 0
        assert not kernels.native_enabled(runtime=auto)
    assert len(caught) == 1 and "g++: not found" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="AUTOTP_KERNELS=native but .*g\\+\\+: not found"):
        kernels.native_enabled(runtime=Runtime(kernels="native"))
