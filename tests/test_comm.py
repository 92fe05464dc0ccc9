"""The shared-memory all-reduce against gloo and the exact sum, its fault handling, segment
hygiene, and the choice between it and torch.distributed."""
import os
import time
from pathlib import Path

import pytest

import comm_checks
from autotp import kernels
from autotp.runtime import Runtime
from autotp.comm import shm
from dist_helper import run_ranks

pytestmark = pytest.mark.skipif(not kernels.extension_loaded(), reason=f"extension unavailable: {kernels.status()[1]}")

SIZES = [1, 7, 1000, 65536 + 5, (4 << 20) // 4 + 3]  # the last spans two 4 MiB chunks in fp32


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shm_all_reduce_equals_gloo_and_the_exact_sum(world_size):
    sizes = SIZES + [16 << 20]  # and 64 MB of fp32 (32 MB of bf16)
    for rank, r in enumerate(run_ranks(comm_checks.shm_against_gloo, world_size, sizes, 300)):
        assert r["backends"] == ["shm", "shm"]
        assert r["left_in_dev_shm"] == [], "segment names must be removed once mapped"
        assert r["in_a_row"]
        assert r["clock"]["collective"][1] == 300 and r["clock"]["gemm"] == (0.0, 0), r["clock"]
        for case in r["cases"]:
            assert case["exact"], (rank, case)  # fp32: the exact sum; bf16: it rounded once
            assert case["op_exact"] and case["op_input_kept"], (rank, case)
            if case["dtype"] == "torch.float32" or world_size == 2:
                assert case["gloo_equal"], (rank, case)
            else:  # gloo rounds bf16 partial sums; ours rounds once: one bf16 step apart at most
                assert case["gloo_max_rel"] <= 2**-7, (rank, case)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shm_all_gather_equals_the_concatenation_bit_for_bit(world_size):
    for rank, r in enumerate(run_ranks(comm_checks.shm_all_gather, world_size)):
        assert r["backend"] == "shm"
        for case in r["cases"]:
            assert case["shape_ok"] and case["equal"] and case["other_differs"], (rank, case)
            # copied, not summed: negative zeros stay (the fallback for rows wider than a slot sums)
            assert case["bits_equal"] or case["fallback"], (rank, case)
        assert any(c["fallback"] for c in r["cases"]) and not all(c["fallback"] for c in r["cases"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_portable_reduction_equals_the_exact_sum(world_size):
    """The plain C++ reduction CPUs without AVX-512 run, forced here."""
    for r in run_ranks(comm_checks.shm_against_gloo, world_size, SIZES[:4], 50, True):
        assert r["in_a_row"] and all(c["exact"] for c in r["cases"]), r


def test_a_killed_rank_is_noticed_at_once():
    results = run_ranks(comm_checks.shm_peer_fails, 3, 1, "exit", may_exit=(1,))  # rank 1 gets SIGKILL
    for rank in (0, 2):
        r = results[rank]
        assert r["error"] and "rank 1" in r["error"] and "exited" in r["error"], r
        assert r["seconds"] < 3, r  # the pid check, well before the 3 s timeout
    leftovers = run_ranks(comm_checks.shm_against_gloo, 2, [10], 5)  # the next run works
    assert all(all(c["exact"] for c in r["cases"]) for r in leftovers)


def test_a_rank_that_stalls_times_out():
    results = run_ranks(comm_checks.shm_peer_fails, 2, 1, "stall")
    r = results[0]
    assert r["error"] and "did not reach" in r["error"] and "AUTOTP_COMM_TIMEOUT" in r["error"], r
    assert 3 <= r["seconds"] < 6, r


def test_stale_segments_of_dead_creators_are_removed(tmp_path):
    dead = tmp_path / f"autotp-{2**22 + 12345}-abc"  # beyond pid_max defaults: never alive
    alive = tmp_path / f"autotp-{os.getpid()}-def"
    other = tmp_path / "something-else"
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    assert shm.remove_stale_segments(tmp_path) == [dead.name]
    assert not dead.exists() and alive.exists() and other.exists()


def test_single_process_segment_round_trip():
    name = f"/autotp-{os.getpid()}-selftest{time.monotonic_ns()}"
    handle = shm.open_segment(name, 0, 1, True, Runtime(comm_timeout_s=1.0))
    handle.unlink()
    assert not Path("/dev/shm", name.lstrip("/")).exists()
    import torch
    x = torch.arange(5.0)
    assert torch.equal(handle.all_reduce(x), torch.arange(5.0))  # one rank: the identity
    with pytest.raises(RuntimeError, match="contiguous float32 or bfloat16"):
        handle.all_reduce(torch.ones(4, dtype=torch.int32))
