"""autotp's ops as C functions in a compiled graph (autotp.kernels.shims): inductor's C++ wrapper
calls each op's C entry point instead of the dispatcher, and gets the eager op's bits."""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_cpp_code

import autotp
from autotp import kernels
from autotp.kernels import int4, shims
from dist_helper import RankChecks

needs_extension = pytest.mark.skipif(not kernels.available_isas(autotp.Runtime.from_env()),
                                     reason=f"extension unavailable: {kernels.status()[1]}")


def compiled_code(fn, *args, table):
    """(the compiled fn's result, its C++ wrapper's code), compiled afresh with ``table`` as the
    C shim table."""
    torch._dynamo.reset()
    with torch._inductor.config.patch({"aot_inductor.custom_ops_to_c_shims": table, "fx_graph_cache": False}):
        return run_and_get_cpp_code(torch.compile(fn, options={"cpp_wrapper": True}), *args)


def ops_and_inputs():
    """A function calling autotp's GEMMs (bf16 with a bias and an fp32 output, INT8 with 16- and
    8-bit activations, INT4 asymmetric with its zero points) and its decode attention (a bias),
    and its inputs."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=gen) * 0.05
    packed, bias = kernels.prepack(w.bfloat16()), torch.randn(96, generator=gen)
    q8, s8 = kernels.prepack_int8(*kernels.quantize_int8(w, 32))
    q4, s4, z4 = int4.prepack_int4(*int4.quantize_int4(w, 32, symmetric=False))

    def fn(x, q, k, v, mask):
        y = torch.ops.autotp.linear_bf16(x * 2, packed, bias, 96, torch.float32, "")
        y = y + torch.ops.autotp.linear_int8(x, q8, s8, None, 96, 32, 0, None, "", 16).float()
        y = y + torch.ops.autotp.linear_int8(x, q8, s8, bias, 96, 32, 0, torch.float32, "", 8)
        y = y + torch.ops.autotp.linear_int4(x, q4, s4, z4, None, 96, 32, 0, torch.float32, "")
        a = torch.ops.autotp.decode_attention(q * 1.5, k, v, mask, 0.125, "")
        return y, a

    x = torch.randn(3, 160, generator=gen).bfloat16()
    q = torch.randn(2, 2, 4, 64, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 20, 64, generator=gen).bfloat16() for _ in range(2))
    mask = torch.zeros(2, 1, 20)
    mask[:, :, 17:] = float("-inf")
    return fn, (x, q, k, v, mask)


@needs_extension
def test_a_compiled_graph_calls_the_ops_c_functions_and_gets_the_eager_bits():
    """With the shim table every autotp op of the graph is one call of its C function (no
    dispatcher stack is built for any of them), and the outputs equal the eager ops' bit for
    bit. Negative controls: without the table the same graph goes through the dispatcher, and an
    input changed after the eager run gives other outputs, which the comparison sees."""
    fn, args = ops_and_inputs()
    want = fn(*args)
    (got, code) = compiled_code(fn, *args, table=shims.c_shims())
    for name in ("linear_bf16", "linear_int8", "linear_int4", "decode_attention"):
        assert re.search(rf"aoti_torch_cpu_{name}\(", code), name
    assert "autotp::" not in "".join(re.findall(r'findSchemaOrThrow\("[^"]*"', code)), "an op went through the dispatcher"
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    (plain, code) = compiled_code(fn, *args, table={})
    assert 'findSchemaOrThrow("autotp::linear_bf16"' in code and "aoti_torch_cpu_linear_bf16(" not in code
    assert all(torch.equal(g, w) for g, w in zip(plain, want))
    changed = fn(args[0] * 1.01, *args[1:])
    assert not torch.equal(changed[0], got[0])


@needs_extension
def test_the_shim_table_pickles_by_op_names():
    """inductor keys its on-disk graph cache by the pickled config: the table pickles to its
    ops' names and declarations (an op object does not pickle, which made inductor bypass its
    cache and compile the step again in every process)."""
    import pickle

    table = shims.c_shims()
    assert set(table) == {getattr(torch.ops.autotp, n).default for n in shims.DECLARATIONS}
    back = pickle.loads(pickle.dumps(table))
    assert back == {str(op): decls for op, decls in table.items()} and "autotp.linear_bf16.default" in back


CHECKS = RankChecks({2: {"bf16": ("compiled_collectives", ())}})


@needs_extension
def test_compiled_collectives_call_their_c_functions_on_two_ranks():
    """2 ranks with the shared-memory group: a compiled graph's all-reduce and all-gather are
    calls of their C functions and give the eager collectives' bits."""
    for rank, r in enumerate(CHECKS(2, "bf16")):
        assert r["shims_called"] and r["equal"] and r["other_rank_differs"], (rank, r)
