"""Sharding and loading: wall time and peak resident memory per process.

Builds (once, cached in --workdir) a random Llama saved with save_pretrained in bf16, then
measures, each in fresh processes:
  create_shard_model            one process, --world-size N
  transformers from_pretrained  N processes, each loading the whole model (what every rank of a
                                plain tensor-parallel job does first)
  autotp pre-sharded            N ranks, autotp.from_pretrained(OUT_DIR)
  autotp from HF directory      N ranks, autotp.from_pretrained(MODEL_DIR)
and with --int8 the same three autotp rows for weight-only INT8 (create_shard_model --quantize
int8; from_pretrained of that; from_pretrained(MODEL_DIR, quantize="int8")).
Peak RSS (VmHWM) is taken after loading and one forward pass (so memory-mapped weights are
counted once touched). Two baselines: a process that imports torch and transformers, and one
that also reads the model's config with AutoConfig (which imports most of transformers'
configuration machinery, ~80 MiB, a cost every loader of the model pays).

    python tools/bench_load.py [--workdir /tmp/autotp-bench-load] [--world-size 2] [--int8]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, os, sys, time
import torch
import transformers
mode, path = sys.argv[1], sys.argv[2]
result = {}
if mode == "baseline":
    pass
elif mode == "baseline-config":
    transformers.AutoConfig.from_pretrained(path)
elif mode == "shard":
    from autotp.cli import create_shard_model
    start = time.perf_counter()
    assert create_shard_model(["-m", path, "--world-size", sys.argv[3], "--save-path", sys.argv[4],
                               "--overwrite", "--quiet", *sys.argv[5:]]) == 0
    result["wall"] = time.perf_counter() - start
else:
    import autotp
    torch.set_num_threads(1)
    if mode != "transformers":
        autotp.init_distributed()
    start = time.perf_counter()
    if mode == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        model = autotp.from_pretrained(path, quantize="int8" if mode == "hf-int8" else None)
    result["wall"] = time.perf_counter() - start
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
# VmHWM belongs to this address space; ru_maxrss would carry the parent's high-water mark over exec
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
result["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print("RESULT " + json.dumps(result), flush=True)
# what was to be measured is measured: leave without interpreter and library teardown (which
# only adds time, and once aborted intermittently: see the README's known problems)
os._exit(0)
'''


def make_model(workdir: Path, layers: int) -> Path:
    source = workdir / f"llama-{layers}l-bf16"
    if (source / "config.json").is_file():
        return source
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                  num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(source, max_shard_size="1GB")
    return source


def run(mode: str, args: list[str], ranks: int = 1) -> list[dict]:
    """Start ``ranks`` children (with torchrun-style environment) and collect their results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, mode, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"{mode} failed:\n{err[-3000:]}")
        results.append(json.loads(line[7:]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/autotp-bench-load", help="where the model and shards go")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32,
                        help="decoder layers of hidden 2048: 32 -> 1.6 B params, 3.1 GB; 16 -> 1.7 GB")
    parser.add_argument("--int8", action="store_true", help="also measure INT8 sharding and loading")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = make_model(workdir, args.layers)
    out = workdir / f"{source.name}-tp{args.world_size}"
    disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    from autotp.checkpoint.stfile import read_header

    largest = max((i.end - i.start) for f in source.glob("*.safetensors") for i in read_header(f)[0].values())
    bare = run("baseline", ["-"])[0]["peak_rss_mb"]
    base = run("baseline-config", [str(source)])[0]["peak_rss_mb"]
    rows = [("baseline: python + torch + transformers", [{"wall": 0.0, "peak_rss_mb": bare}]),
            ("  ... + AutoConfig.from_pretrained", [{"wall": 0.0, "peak_rss_mb": base}])]
    rows.append(("create_shard_model (1 process)", run("shard", [str(source), str(args.world_size), str(out)])))
    rows.append(("transformers from_pretrained (each rank)", run("transformers", [str(source)], args.world_size)))
    rows.append(("autotp.from_pretrained pre-sharded", run("presharded", [str(out)], args.world_size)))
    rows.append(("autotp.from_pretrained HF directory", run("hf", [str(source)], args.world_size)))
    if args.int8:
        out8 = workdir / f"{source.name}-int8-tp{args.world_size}"
        rows.append(("create_shard_model --quantize int8",
                     run("shard", [str(source), str(args.world_size), str(out8), "--quantize", "int8"])))
        rows.append(("autotp.from_pretrained pre-sharded int8", run("presharded", [str(out8)], args.world_size)))
        rows.append(("autotp.from_pretrained HF dir, quantize", run("hf-int8", [str(source)], args.world_size)))

    print(f"random Llama, {args.layers} layers, hidden 2048: {disk / 1e9:.2f} GB on disk (bf16), largest tensor "
          f"{largest / 2**20:.0f} MiB; {args.world_size} ranks")
    print(f"{'what':<42} {'wall s (max)':>12} {'peak RSS MiB per process':>26}")
    for name, res in rows:
        rss = "/".join(f"{r['peak_rss_mb']:.0f}" for r in res)
        print(f"{name:<42} {max(r['wall'] for r in res):>12.1f} {rss:>26}")
    shard_rss = rows[2][1][0]["peak_rss_mb"]
    plain = max(r["peak_rss_mb"] for r in rows[3][1])
    for label, floor in (("python + torch + transformers + config", base), ("python + torch + transformers", bare)):
        print(f"sharder peak RSS over {label}: {shard_rss - floor:.0f} MiB = "
              f"{(shard_rss - floor) / (largest / 2**20):.2f}x the largest tensor (target < 2x)")
    for i, name in ((4, "pre-sharded"), (5, "HF directory")):
        worst = max(r["peak_rss_mb"] for r in rows[i][1])
        print(f"per-rank load peak RSS, {name}: {worst / plain:.3f}x the plain full load (target < 0.6x)")
    if args.int8:
        rank_files = sorted(out8.glob("rank-*.safetensors"))
        share = max(f.stat().st_size for f in rank_files) / 2**20
        for i, name in ((7, "pre-sharded int8"), (8, "HF directory, quantize")):
            worst = max(r["peak_rss_mb"] for r in rows[i][1])
            print(f"per-rank load peak RSS, {name}: {worst:.0f} MiB = config baseline {base:.0f} + "
                  f"{worst - base:.0f} MiB; its int8 rank file is {share:.0f} MiB "
                  f"({(worst - base) / share:.2f}x); {worst / plain:.3f}x the plain full load")


if __name__ == "__main__":
    main()
