"""``autotp-run``: torchrun with each local rank pinned to its own physical cores.

    autotp-run --nproc N [--bind-cores] [torchrun options] script.py [script args]
    autotp-run --nproc N [--bind-cores] [torchrun options] -m module [module args]

Everything but ``--nproc`` (torchrun's ``--nproc-per-node``) and ``--bind-cores`` goes to
torchrun (``torch.distributed.run``) unchanged: ``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--master-addr`` and the rest work as they do there.

With ``--bind-cores`` each worker starts in this module first: it takes the CPUs this launcher
may run on (``os.sched_getaffinity``), keeps one logical CPU per physical core, orders the
cores by NUMA node, splits them into LOCAL_WORLD_SIZE contiguous shares (so a rank stays
inside one node when the ranks divide the nodes evenly), pins itself to share LOCAL_RANK with
``os.sched_setaffinity``, sets OMP_NUM_THREADS and torch's thread count to the share's size
(AUTOTP_BOUND_CORES lists the share), and then runs the script.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
SYS_NODE = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def physical_cores(cpus: set[int], sys_cpu: Path = SYS_CPU, sys_node: Path = SYS_NODE) -> list[int]:
    """One logical CPU (the lowest) per physical core among ``cpus``, ordered by (NUMA node,
    package, core)."""
    node_of: dict[int, int] = {}
    for node_dir in sorted(sys_node.glob("node[0-9]*")):
        try:
            for cpu in parse_cpulist((node_dir / "cpulist").read_text()):
                node_of[cpu] = int(node_dir.name[4:])
        except OSError:
            continue
    first: dict[tuple[int, int, int], int] = {}
    for cpu in sorted(cpus):
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        key = (node_of.get(cpu, 0), _read_int(topo / "physical_package_id", 0), _read_int(topo / "core_id", cpu))
        first.setdefault(key, cpu)
    return [first[k] for k in sorted(first)]


def core_shares(cores: list[int], n: int) -> list[list[int]]:
    """``cores`` split into ``n`` contiguous shares whose sizes differ by at most one."""
    if n > len(cores):
        raise SystemExit(f"autotp-run --bind-cores: {n} local ranks but only {len(cores)} physical cores "
                         f"are available to this process ({cores}); use fewer ranks or drop --bind-cores")
    base, extra = divmod(len(cores), n)
    shares, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        shares.append(cores[start:start + size])
        start += size
    return shares


def _worker(argv: list[str]) -> None:
    """Runs inside each torchrun worker: pin, set OMP_NUM_THREADS, run the target."""
    as_module = argv[0] == "--module"
    target, args = (argv[1], argv[2:]) if as_module else (argv[0], argv[1:])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = core_shares(physical_cores(os.sched_getaffinity(0)), local_size)[local_rank]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    os.environ["AUTOTP_BOUND_CORES"] = ",".join(map(str, share))
    import torch  # already imported with the autotp package: set its pool to match

    torch.set_num_threads(len(share))
    sys.argv = [target, *args]
    if as_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    from torch.distributed.run import get_args_parser, run

    bind, rest, i = False, [], 0
    nproc = None
    while i < len(argv):
        arg = argv[i]
        if arg == "--bind-cores":
            bind = True
        elif arg == "--nproc" and i + 1 < len(argv):
            nproc, i = argv[i + 1], i + 1
        elif arg.startswith("--nproc="):
            nproc = arg.split("=", 1)[1]
        elif arg in ("-h", "--help") and not rest:
            print(__doc__)
            return
        else:
            rest = argv[i:]
            break
        i += 1
    if nproc is not None:
        rest = ["--nproc-per-node", nproc, *rest]
    args = get_args_parser().parse_args(rest)
    if bind:
        # each worker sets its own; set here too so torchrun does not force 1 with a warning
        if str(args.nproc_per_node).isdigit():
            share = len(physical_cores(os.sched_getaffinity(0))) // max(1, int(args.nproc_per_node))
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))
        script_args = [args.training_script, *args.training_script_args]
        args.training_script_args = ["--worker", *(["--module"] if args.module else []), *script_args]
        args.training_script, args.module, args.no_python = "autotp.launcher", True, False
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        run(args)
    except ChildFailedError as exc:  # the rank has said why on its own stderr: no traceback of ours
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(f"autotp-run: rank {rank} exited with code {failure.exitcode}; its output above says why",
              file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
