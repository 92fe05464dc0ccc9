"""The extension built from its portable code only (AUTOTP_PORTABLE_BUILD=1, compiled with
-DAUTOTP_PORTABLE_ONLY: no x86 table, as on aarch64) loads here and passes the kernel tests on
its generic path. It runs in a child process: a process keeps the first build it loads."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autotp import kernels
from autotp.runtime import ENV_NAMES, ISAS, Runtime

TESTS = Path(__file__).parent
KERNEL_TESTS = ["test_kernels.py", "test_int8_kernels.py"]


def run_child(args: list[str], **env: str) -> subprocess.CompletedProcess:
    child_env = {**os.environ, **Runtime.from_env().replace(portable_build=True, isa="auto").as_env(), **env}
    return subprocess.run([sys.executable, *args], cwd=TESTS, env=child_env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.skipif(not kernels.extension_loaded(Runtime.from_env()), reason="the extension does not build here")
def test_portable_build_holds_only_the_generic_path_and_passes_the_kernel_tests():
    probe = run_child(["-c", "import torch; from autotp import kernels; from autotp.runtime import Runtime; "
                             "assert kernels.extension_loaded(Runtime.from_env()); "
                             "print(list(torch.ops.autotp.cpu_isas()))"])
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == "['generic']", probe.stdout
    # AUTOTP_KERNELS=native: the layer tests run on the generic GEMM too, instead of skipping
    tests = run_child(["-m", "pytest", "-v", "-p", "no:cacheprovider", "-rs", *KERNEL_TESTS],
                      **{ENV_NAMES["kernels"]: "native"})
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    # the per-path tests (the sweeps against float64, threads, opcheck) ran on the generic path only
    ran = [set(ids.split("-")) & set(ISAS) for ids in re.findall(r"::\S+?\[(\S+)\] PASSED", tests.stdout)]
    assert sum(isas == {"generic"} for isas in ran) >= 30, summary
    assert all(isas <= {"generic"} for isas in ran), tests.stdout[-3000:]


def test_each_checkout_and_version_of_the_sources_builds_under_its_own_name(tmp_path):
    """The same sources in the same folder find their build again; another checkout, a changed
    source, other flags or the portable build get their own, so no two rebuild over each other's
    cache (torch's build files name the source paths: a shared folder would recompile on every
    switch)."""
    csrc = Path(kernels.__file__).parent / "csrc"
    copies = []
    for name in ("one", "two"):
        copy = tmp_path / name
        copy.mkdir()
        for path in [*csrc.glob("*.cpp"), *csrc.glob("*.h")]:
            (copy / path.name).write_bytes(path.read_bytes())
        copies.append(copy)
    flags = ["-O3"]
    name = kernels.build_name(copies[0], flags, False)
    assert name == kernels.build_name(copies[0], list(flags), False)  # negative control for the != below
    assert name.isidentifier() and name.startswith("autotp_kernels_")
    assert kernels.build_name(copies[1], flags, False) != name
    edited = kernels.build_name(copies[1], flags, False)
    header = copies[1] / "kernel_table.h"
    header.write_bytes(header.read_bytes() + b"\n")
    assert kernels.build_name(copies[1], flags, False) != edited
    assert kernels.build_name(copies[0], ["-O2"], False) != name
    assert kernels.build_name(copies[0], flags, True).startswith("autotp_kernels_portable_")
