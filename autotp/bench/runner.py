"""The end-to-end benchmark: first-token and next-token latency of ``generate`` on 1 rank with
all cores against N ranks with the cores split among them, for each option autotp offers.

    autotp-bench --model llama-1b gptj-1b [--ranks 2] [--input 32 256] [--beams 1 4] ...
    python -m autotp.bench --help

Every configuration runs in its own processes, started through ``autotp-run --bind-cores``
(1 rank gets every physical core, N ranks a share each), one after another, ``--rounds``
times in alternation so that machine noise falls on all alike. First a float32 pass checks
that every configuration generates the same tokens and records the reference logits; then
the timed pass (bf16 by default) reports medians, spreads, speedups against 1 rank, the
floor that memory bandwidth sets and each configuration's logits error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from autotp import kernels
from autotp.bench import report, shapes
from autotp.launcher import parse_cpulist, physical_cores
from autotp.runtime import Runtime


@dataclass(frozen=True)
class RunConfig:
    """One way of running the model: how many ranks, whose layers, which kernels and all-reduce."""
    key: str
    ranks: int
    impl: str  # "transformers" (the unsharded model) or "autotp"
    kernels: str = "native"  # AUTOTP_KERNELS
    comm: str = "shm"  # AUTOTP_COMM
    fuse: bool = True  # fuse_allreduce
    quantize: str | None = None  # autotp.from_pretrained(quantize=...)
    bf16_twin: str | None = None  # for a quantized configuration: the same one without quantization
    compile: bool = True  # AUTOTP_COMPILE: static KV cache and a compiled decoding step
    cores: int | None = None  # physical cores the configuration may use (None: all)
    huge_pages: bool = True  # AUTOTP_HUGE_PAGES: weights on transparent huge pages
    int8_activations: str = "int16"  # AUTOTP_INT8_ACTIVATIONS: how the INT8 GEMM rounds activations

    def label(self, cores: int) -> str:
        cores = min(cores, self.cores or cores)
        head = f"{self.ranks}x{cores // self.ranks}"
        tail = (f" {self.quantize}" if self.quantize else "") + \
            ("" if self.compile or self.impl == "transformers" else " eager") + \
            ("" if self.huge_pages or self.impl == "transformers" else " 4k-pages") + \
            (" a8" if self.quantize and self.int8_activations == "int8" else "")
        if self.impl == "transformers":
            return f"{head} transformers"
        if self.ranks == 1:
            return f"{head} autotp {self.kernels}{tail}"
        comm = "shm" if self.comm == "shm" else "gloo"
        return f"{head} {self.kernels}+{comm}" + ("" if self.fuse else " unfused") + tail


def all_configs(ranks: int) -> list[RunConfig]:
    return [RunConfig("transformers", 1, "transformers", "torch", "torch"),
            RunConfig("autotp-1", 1, "autotp"),
            RunConfig("autotp-1x1", 1, "autotp", cores=1),
            RunConfig("native-shm", ranks, "autotp"),
            RunConfig("native-shm-eager", ranks, "autotp", compile=False),
            RunConfig("native-shm-4k", ranks, "autotp", huge_pages=False),
            RunConfig("torch-shm", ranks, "autotp", kernels="torch"),
            RunConfig("native-gloo", ranks, "autotp", comm="torch"),
            RunConfig("native-shm-unfused", ranks, "autotp", fuse=False),
            RunConfig("int8-1", 1, "autotp", quantize="int8", bf16_twin="autotp-1"),
            RunConfig("int8-shm", ranks, "autotp", quantize="int8", bf16_twin="native-shm"),
            RunConfig("int8-shm-eager", ranks, "autotp", quantize="int8", bf16_twin="native-shm-eager",
                      compile=False),
            RunConfig("int8-shm-4k", ranks, "autotp", quantize="int8", bf16_twin="native-shm-4k", huge_pages=False),
            RunConfig("int8a8-shm", ranks, "autotp", quantize="int8", bf16_twin="native-shm",
                      int8_activations="int8"),
            RunConfig("int4-1", 1, "autotp", quantize="int4", bf16_twin="autotp-1"),
            RunConfig("int4-shm", ranks, "autotp", quantize="int4", bf16_twin="native-shm")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [c.key for c in all_configs(2)]
    p = argparse.ArgumentParser(prog="autotp-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["llama-1b", "gptj-1b"],
                   help=f"named shapes ({', '.join(shapes.SHAPES)}; random weights) or checkpoint "
                        "directories (Hugging Face, or pre-sharded by create_shard_model)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the parallel configurations (default 2)")
    p.add_argument("--input", type=int, nargs="+", default=[32, 256], help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call (default 1)")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="1 = greedy; 4 = beam search of 4")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="timed dtype")
    p.add_argument("--configs", nargs="+", default=keys, choices=keys, metavar="CONFIG",
                   help=f"configurations to run (default all available): {', '.join(keys)}; the int8 and "
                        "int4 ones load with autotp.from_pretrained(quantize='int8' / 'int4'): each rank "
                        "quantizes its slices")
    p.add_argument("--quant-group-size", type=int, default=128,
                   help="input columns per scale in the int8 and int4 configurations (0: one per output row)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per decoding mode first")
    p.add_argument("--runs", type=int, default=2, help="timed generations per case per round")
    p.add_argument("--rounds", type=int, default=2, help="passes over all configurations, alternating")
    p.add_argument("--no-check", action="store_true",
                   help="skip the float32 pass (token identity and reference logits)")
    p.add_argument("--probe-tokens", type=int, default=32, help="prompt length of the logits comparison")
    p.add_argument("--work-dir", type=Path, default=Path("bench-work"),
                   help="built checkpoints, worker logs and raw results (default ./bench-work)")
    p.add_argument("--out", type=Path, default=Path("bench-results/benchmark"),
                   help="writes OUT.json and OUT.png (default bench-results/benchmark)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one configuration may take")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available(configs: list[RunConfig], runtime: Runtime, log) -> list[RunConfig]:
    """The configurations this machine can run under ``runtime``: where the native GEMM cannot
    run, the native ones run on torch kernels (and are labelled so); where the extension does
    not build, those that need shared memory run over gloo."""
    native_ok, why = kernels.status(runtime)
    kept = []
    for cfg in configs:
        if cfg.impl == "autotp" and cfg.kernels == "native" and not native_ok:
            log(f"{cfg.key} runs on torch kernels: the native ones are unavailable here ({why})")
            cfg = dataclasses.replace(cfg, kernels="torch")
        if cfg.impl == "autotp" and cfg.ranks > 1 and cfg.comm == "shm" and not kernels.extension_loaded(runtime):
            log(f"{cfg.key} runs over gloo: the shared-memory all-reduce needs the C++ extension ({why})")
            cfg = dataclasses.replace(cfg, comm="torch")
        kept.append(cfg)
    return kept


def launch(cfg: RunConfig, spec: dict[str, Any], spec_path: Path, log_path: Path, timeout: float,
           runtime: Runtime) -> dict | None:
    """Run one configuration's ranks, each with ``runtime`` less what the configuration
    chooses (kernels, all-reduce); their result, or None (the log says why)."""
    spec_path.write_text(json.dumps(spec))
    Path(spec["result_path"]).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "autotp.launcher", "--nproc", str(cfg.ranks), "--bind-cores",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "autotp.bench.worker", str(spec_path)]
    env = dict(os.environ, **runtime.replace(kernels=cfg.kernels, comm=cfg.comm, compile=cfg.compile,
                                                     huge_pages=cfg.huge_pages,
                                                     int8_activations=cfg.int8_activations).as_env(),
               PYTHONUNBUFFERED="1")
    cpus = None
    if cfg.cores:  # the first cfg.cores physical cores (with their hyperthreads), for the launcher to bind
        mine = set(os.sched_getaffinity(0))
        first = physical_cores(mine)[:cfg.cores]
        cpus = {c for c in mine if any(_same_core(c, p) for p in first)}

    def restrict() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=restrict)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"timed out after {timeout:.0f} s"
    result = Path(spec["result_path"])
    if code != 0 or not result.is_file():
        tail = "\n    ".join(log_path.read_text(errors="replace").splitlines()[-15:])
        print(f"autotp.bench: {cfg.key} failed ({code}); last lines of {log_path}:\n    {tail}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def _same_core(cpu: int, core: int) -> bool:
    """Whether logical ``cpu`` is physical core ``core`` (the lowest-numbered logical CPU of it)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return core in parse_cpulist(path.read_text())
    except OSError:
        return cpu == core


def machine_facts(cores: list[int], runtime: Runtime) -> dict[str, Any]:
    import transformers

    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "isa": isa, "physical_cores": len(cores), "torch": torch.__version__,
            "transformers": transformers.__version__, "native_kernels": kernels.status(runtime)[1],
            "runtime": dataclasses.asdict(runtime)}


def main(argv: list[str] | None = None, runtime: Runtime | None = None) -> None:
    """Run the benchmark; ``runtime`` (default ``Runtime.from_env()``) is what every rank runs
    with, less the kernels and all-reduce each configuration chooses."""
    args = parse_args(argv)
    runtime = Runtime.from_env() if runtime is None else runtime

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    cores = physical_cores(os.sched_getaffinity(0))
    if args.ranks < 2 or args.ranks > len(cores):
        raise SystemExit(f"autotp-bench: --ranks {args.ranks} needs 2 to {len(cores)} (the physical cores "
                         "this process may use)")
    dtype = getattr(torch, args.dtype)
    configs = available([c for c in all_configs(args.ranks) if c.key in args.configs], runtime, log)
    cases = [{"beams": b, "input": n} for b in args.beams for n in args.input]
    for sub in ("logs", "raw"):
        (args.work_dir / sub).mkdir(parents=True, exist_ok=True)
    models, raw = {}, {}
    for name in args.model:
        path, config = shapes.prepare(name, args.work_dir, dtype, log)
        label = name if name in shapes.SHAPES else path.name
        fixed_world = shapes.presharded_world(path)
        mine = [c for c in configs if fixed_world is None or (c.impl == "autotp" and c.ranks == fixed_world)]
        if fixed_world is not None:
            log(f"{path} is pre-sharded for {fixed_world} ranks: only {[c.key for c in mine]} can load it")
        elif not shapes.fusion_matters(config, args.ranks):
            mine = [c for c in mine if c.fuse]  # unfused would be the same plan
        models[label] = {"path": str(path), "model_type": config.model_type,
                         "parameters": shapes.parameter_count(config), "configs": [c.key for c in mine]}
        raw[label] = run_model(label, path, mine, cases, args, len(cores), runtime, log)
    doc = report.build(args, machine_facts(cores, runtime), models, raw,
                       {c.key: c.label(len(cores)) for c in configs},
                       {c.key: c.bf16_twin for c in configs if c.bf16_twin})
    report.write(doc, args.out, log)
    if doc["token_mismatches"]:
        raise SystemExit("autotp-bench: configurations disagree on float32 tokens (see the table above)")


def run_model(label: str, path: Path, configs: list[RunConfig], cases: list[dict], args: argparse.Namespace,
              cores: int, runtime: Runtime, log) -> dict[str, Any]:
    """Every pass of every configuration on one model: {phase: {config key: [results]}}."""
    phases = ([("check", "float32", 1, 0, 1)] if not args.no_check else []) + \
             [("time", args.dtype, args.rounds, args.warmup, args.runs)]
    out: dict[str, Any] = {}
    for phase, dtype, rounds, warmup, runs in phases:
        # INT8 weights are not the float32 model's: they have no place in the token check
        mine = [c for c in configs if phase == "time" or not c.quantize]
        out[phase] = {c.key: [] for c in mine}
        for rnd in range(rounds):
            for cfg in mine:
                stem = f"{label}-{phase}-{cfg.key}-r{rnd}"
                spec = {"model_dir": str(path), "dtype": dtype, "config": asdict(cfg), "cases": cases,
                        "batch": args.batch, "new_tokens": args.new_tokens, "warmup": warmup, "runs": runs,
                        "probe_tokens": args.probe_tokens, "quant_group_size": args.quant_group_size,
                        "logits_path": str((args.work_dir / "raw" / f"{stem}.logits.pt").resolve()),
                        "result_path": str((args.work_dir / "raw" / f"{stem}.json").resolve())}
                log(f"{label} {dtype} {cfg.label(cores)} (round {rnd + 1}/{rounds}) ...")
                start = time.perf_counter()
                result = launch(cfg, spec, args.work_dir / "raw" / f"{stem}.spec.json",
                                args.work_dir / "logs" / f"{stem}.log", args.timeout, runtime)
                if result is not None:
                    result["logits_path"] = spec["logits_path"]
                    out[phase][cfg.key].append(result)
                    log(f"    done in {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
