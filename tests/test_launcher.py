"""autotp-run: core shares from a CPU topology, real runs pinned with --bind-cores, and two
"machines" on loopback (two launches, --nnodes 2) sharding across them over torch.distributed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotp.launcher import core_shares, physical_cores
from dist_helper import free_port

TARGET = str(Path(__file__).parent / "launch_target.py")
TIMEOUT = 300


def fake_topology(root: Path) -> tuple[Path, Path]:
    """2 NUMA nodes x 2 cores x 2 hyperthreads; siblings are cpu c and c + 4."""
    cpu_dir, node_dir = root / "cpu", root / "node"
    for cpu in range(8):
        core = cpu % 4
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(str(core % 2))
        (topo / "physical_package_id").write_text(str(core // 2))
    for node, cpus in ((0, "0-1,4-5"), (1, "2-3,6-7")):
        (node_dir / f"node{node}").mkdir(parents=True)
        (node_dir / f"node{node}" / "cpulist").write_text(cpus)
    return cpu_dir, node_dir


def test_physical_cores_and_shares_follow_the_topology(tmp_path):
    cpu_dir, node_dir = fake_topology(tmp_path)
    cores = physical_cores(set(range(8)), cpu_dir, node_dir)
    assert cores == [0, 1, 2, 3]  # one hyperthread per core, node 0 first
    assert core_shares(cores, 2) == [[0, 1], [2, 3]]  # one NUMA node each
    assert core_shares(cores, 3) == [[0, 1], [2], [3]]
    assert physical_cores({4, 5, 6}, cpu_dir, node_dir) == [4, 5, 6]  # only what affinity allows
    with pytest.raises(SystemExit, match="5 local ranks but only 4 physical cores"):
        core_shares(cores, 5)


def launch(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotp.launcher", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})


def reports(output: str) -> list[dict]:
    decoder = json.JSONDecoder()
    found = [decoder.raw_decode(part)[0] for part in output.split("REPORT ")[1:]]
    return sorted(found, key=lambda r: r["rank"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give each rank its own")
def test_bind_cores_gives_each_rank_its_own_core_and_sharding_still_matches():
    done = launch(["--nproc", "2", "--bind-cores", "--master-port", str(free_port()), TARGET])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    got = reports(done.stdout)
    assert len(got) == 2
    share = len(os.sched_getaffinity(0)) // 2
    assert all(len(r["affinity"]) == share and r["omp"] == str(share) and r["threads"] == share for r in got)
    assert not set(got[0]["affinity"]) & set(got[1]["affinity"])
    for r in got:
        assert r["torch.float32"]["max_abs_diff"] <= 1e-4, r
        assert r["torch.bfloat16"]["max_abs_diff"] <= 0.1, r  # bf16 rounding of tiny logits
        assert r["torch.float32"]["backend"] == "shm", r


def test_two_machines_on_loopback_use_torch_distributed_and_match():
    """Two launches, one process each, --nnodes 2 with a shared rendezvous on 127.0.0.1; the
    host ids differ (Runtime.host_id, given to the target as --host-id), as on two machines, so
    the all-reduce is gloo's."""
    port = str(free_port())
    common = ["--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    procs = [subprocess.Popen([sys.executable, "-m", "autotp.launcher", *common, "--node-rank", str(node), TARGET,
                               "--host-id", f"machine-{node}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for node in (0, 1)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
        outputs.append(out)
    got = reports("".join(outputs))
    assert [r["rank"] for r in got] == [0, 1]
    for r in got:
        assert r["torch.float32"]["backend"] == "torch", r
        assert r["torch.float32"]["max_abs_diff"] <= 1e-4, r
        assert r["torch.bfloat16"]["max_abs_diff"] <= 0.1, r


def test_help_explains_the_options():
    done = launch(["--help"])
    assert done.returncode == 0 and "--bind-cores" in done.stdout and "torchrun" in done.stdout


def test_a_failing_rank_ends_the_launch_with_its_code_and_no_traceback(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import os, sys\nprint('rank', os.environ['RANK'], 'refuses', file=sys.stderr)\nsys.exit(3)\n")
    done = launch(["--nproc", "2", "--master-port", str(free_port()), str(script)])
    assert done.returncode == 3, done.stderr[-3000:]
    assert "refuses" in done.stderr and "exited with code 3" in done.stderr
    assert "Traceback" not in done.stderr
