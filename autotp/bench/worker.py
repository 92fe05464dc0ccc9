"""One benchmark configuration, run inside each rank (launched by autotp.bench.runner through
autotp-run). It loads the model the way the configuration says, measures read bandwidth and
the weight bytes each rank streams per token, saves the logits of a probe prompt, then times
``generate`` on every case and writes rank 0's findings as JSON.

    python -m autotp.bench.worker SPEC.json     (SPEC written by the runner)
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import autotp
from autotp import kernels
from autotp.kernels import pages
from autotp.comm.group import TPGroup
from autotp.runtime import Runtime
from autotp.sharding.decode import compiled_decoding, returned_cache

PROBE_BYTES = 512 << 20  # per rank, at least
LLC_MARGIN = 4  # the probe reads at least this many times the largest cache the CPU reports
PROBE_CAP = 4 << 30  # per rank, at most (a guest may report a cache of any size)
SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes(root: Path = SYS_CACHE) -> int:
    """The largest CPU cache the kernel reports for cpu0 (sysfs ``index*/size``, e.g.
    ``32768K``), 0 where it reports none. Virtual machines report what their host gives them:
    480 MiB of L3 has been seen on a 2-core Xeon guest here."""
    largest = 0
    for entry in sorted(root.glob("index*/size")) if root.is_dir() else []:
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


def probe_bytes(llc: int | None = None) -> int:
    """Bytes each rank's bandwidth probe reads per sample: PROBE_BYTES, or LLC_MARGIN times the
    last-level cache where that is more, so that no sample, not even one taken right after
    another, is served from the cache (a decoding step streams weights many times the cache).
    With a 480 MiB L3, two ranks reading 512 MB each back to back read 13.9-14.1 GB/s against
    13.3-13.4 over 2048 MB: a floor ~5% too low. At most PROBE_CAP: a virtual machine may
    report any cache size, and each rank holds its buffer beside its weights."""
    llc = last_level_cache_bytes() if llc is None else llc
    return max(PROBE_BYTES, min(LLC_MARGIN * llc, PROBE_CAP))


class StepClock(LogitsProcessor):
    """Notes the time at each decoding step: generate calls its logits processors once per
    step, right after the forward that produced the step's logits (greedy and beam alike)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def case_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    """The prompt of one case: fixed random ids, the same in every rank and configuration."""
    gen = torch.Generator().manual_seed(1000 + length)
    return torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=gen)


def load(spec: dict[str, Any], world: int, runtime: Runtime) -> nn.Module:
    cfg, dtype = spec["config"], getattr(torch, spec["dtype"])
    if cfg["impl"] == "transformers":
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    else:  # INT8 / INT4 configurations quantize each rank's slices while loading (or read a quantized checkpoint)
        model = autotp.from_pretrained(spec["model_dir"], dtype=dtype, world_size=world,
                                       fuse_allreduce=cfg["fuse"], quantize=cfg.get("quantize"),
                                       quant_group_size=spec["quant_group_size"] if cfg.get("quantize") else None,
                                       runtime=runtime)
    return model.eval()


def streamed_bytes(model: nn.Module) -> int:
    """Bytes of weight this rank reads per decoding step: every parameter and packed weight
    (INT8 and INT4 ones with their scales) but the embedding tables, of which a step reads only a few rows (a table that is also the
    output projection's weight is read whole, as that)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = model.get_output_embeddings()
    out_weight = getattr(out, "weight", None)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        weight_like = t.is_floating_point() or t.dtype in (torch.int8, torch.uint8)  # not index buffers
        if id(t) in seen or (id(t) in lookups and t is not out_weight) or not weight_like:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


CACHE_PROBE_POSITIONS = 8


def cache_bytes_per_position(model: nn.Module, vocab: int) -> int:
    """Bytes of KV cache this rank holds per position of one sequence (its share of every
    layer's keys and values, as the model's own cache stores them), from a forward over
    CACHE_PROBE_POSITIONS positions. A decoding step reads that much per position of each row
    on top of the weights, which the floor does not count."""
    with torch.no_grad():
        out = model(input_ids=case_ids(vocab, 1, CACHE_PROBE_POSITIONS), use_cache=True)
    cache = returned_cache(out)
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        total += sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return total // CACHE_PROBE_POSITIONS


def step_cache_bytes(per_position: int, rows: int, prompt: int, new_tokens: int) -> int:
    """Cache bytes a decoding step reads at the middle of ``new_tokens``: ``rows`` sequences
    (batch x beams) over the prompt and half the new tokens (every layer over every position:
    a sliding-window layer, which keeps and reads only its window, is over-counted past it)."""
    return per_position * rows * (prompt + new_tokens // 2)


class BandwidthProbe:
    """Bytes per second this rank reads while every rank reads at once (the extension's
    streaming probe: AVX-512 or AVX2 loads where the CPU has them, portable ones elsewhere). The buffer
    is on huge pages where the system has them (autotp.kernels.pages), as autotp's weights are:
    the floor is what memory can give. It reads ``probe_bytes()``, several times the last-level
    cache, so that no sample is served from it. Sampled at load and again before every timed run (this
    machine's bandwidth moves while it runs); the floor uses the median of the samples."""

    def __init__(self, world: int, runtime: Runtime) -> None:
        self.world, self.runtime, self.samples = world, runtime, []
        self.buf, self.bytes = None, probe_bytes()
        if kernels.extension_loaded(runtime):
            buf = pages.empty(self.bytes)
            self.buf = torch.ones(self.bytes, dtype=torch.uint8) if buf is None else buf.fill_(1)
            kernels.read_probe(self.buf, runtime)  # touch every page first

    def sample(self, repeats: int = 3) -> float | None:
        """Adds one sample (the median of ``repeats`` timed reads) and returns it."""
        if self.buf is None:
            return None
        times = []
        for _ in range(repeats):
            if self.world > 1:
                dist.barrier()
            start = time.perf_counter()
            kernels.read_probe(self.buf, self.runtime)
            times.append(time.perf_counter() - start)
        self.samples.append(self.bytes / statistics.median(times))
        return self.samples[-1]

    def bandwidth(self) -> float | None:
        """The median sample (None where the extension is not built)."""
        return statistics.median(self.samples) if self.samples else None


def collectives_per_forward(model: nn.Module, ids: torch.Tensor) -> int:
    """All-reduces and all-gathers one forward issues, counted at the group object."""
    count = 0
    real = {name: getattr(TPGroup, name) for name in ("all_reduce", "all_gather_last_dim")}

    def counting(fn):
        def call(self, *args, **kwargs):
            nonlocal count
            count += self.tp_size > 1
            return fn(self, *args, **kwargs)
        return call

    for name, fn in real.items():
        setattr(TPGroup, name, counting(fn))
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :1])
    finally:
        for name, fn in real.items():
            setattr(TPGroup, name, fn)
    return count


def generate_once(model: nn.Module, ids: torch.Tensor, beams: int, new_tokens: int, world: int
                  ) -> tuple[float, list[float], list[list[int]]]:
    """(first-token seconds, seconds of each later step, generated tokens) of one generate."""
    clock = StepClock()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([clock]),
                             **exact_length(model, beams, new_tokens))
    stamps = clock.stamps
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, steps, out[:, ids.shape[1]:].tolist()


def exact_length(model: nn.Module, beams: int, new_tokens: int) -> dict[str, Any]:
    """generate's arguments for exactly ``new_tokens`` greedy or beam-search tokens: no
    end-of-sequence token (None given as an argument: in a config object generate would put the
    model's back), as serving benchmarks' "ignore EOS" does. ``min_new_tokens`` would do it too,
    but its logits processor scans the whole vocabulary every step (about 1 ms a step at a
    vocabulary of 50400 on an AMD EPYC Zen 4, one thread), a cost no configuration should be
    timed with."""
    return dict(do_sample=False, num_beams=beams, max_new_tokens=new_tokens, eos_token_id=None,
                pad_token_id=pad_id(model))


def pad_id(model: nn.Module) -> int:
    eos = model.generation_config.eos_token_id
    return (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0


def run_cases(model: nn.Module, spec: dict[str, Any], vocab: int, world: int, probe: BandwidthProbe
              ) -> tuple[list[dict[str, Any]], float]:
    """The timed cases, and the seconds the warm-up took (with a compiled decoding step: its
    compilation, for every case's shape); ``probe`` samples the bandwidth right before and right
    after each timed generate and keeps the higher (a case's ``bandwidth``, one per run), so that
    each run is set against the memory of its own moment (this machine's bandwidth moves while it
    runs, within seconds) and a floor is never raised by one slow sample."""
    cases = [dict(c, first=[], next=[], steps=[], tokens=None, bandwidth=[]) for c in spec["cases"]]
    start = time.perf_counter()
    # warm-up: every prompt length, as many new tokens as timed (a compiled step's static cache
    # is as long as prompt and new tokens: another length would compile again while timed)
    for beams in sorted({c["beams"] for c in cases}):
        for _ in range(spec["warmup"]):
            for length in sorted({c["input"] for c in cases}):
                generate_once(model, case_ids(vocab, spec["batch"], length), beams, spec["new_tokens"], world)
    warmup = time.perf_counter() - start
    for _ in range(spec["runs"]):
        for case in cases:
            ids = case_ids(vocab, spec["batch"], case["input"])
            before = probe.sample(2)
            first, steps, tokens = generate_once(model, ids, case["beams"], spec["new_tokens"], world)
            after = probe.sample(2)
            case["bandwidth"].append(max(before, after) if before and after else None)
            case["first"].append(first)
            case["next"].append(statistics.fmean(steps) if steps else float("nan"))
            case["steps"].extend(steps)
            if case["tokens"] not in (None, tokens):
                case["tokens_vary"] = True  # the same prompt gave other tokens on another run
            case["tokens"] = tokens
    return cases, warmup


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    spec = json.loads(Path(argv[0]).read_text())
    runtime = Runtime.from_env()  # what the runner gave this rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        autotp.init_distributed()
    rank = dist.get_rank() if world > 1 else 0
    model = load(spec, world, runtime)
    vocab = model.config.get_text_config().vocab_size
    groups = [m.group for m in model.modules() if isinstance(getattr(m, "group", None), TPGroup)]
    reader = BandwidthProbe(world, runtime)
    reader.sample(5)
    probe = case_ids(vocab, 1, spec["probe_tokens"])
    with torch.no_grad():
        logits = model(input_ids=probe).logits[0].float()
    collectives = collectives_per_forward(model, probe)
    per_position = cache_bytes_per_position(model, vocab)
    cases, warmup = run_cases(model, spec, vocab, world, reader)
    facts = {"bytes": streamed_bytes(model), "bandwidth": reader.bandwidth(), "samples": reader.samples,
             "case_bandwidth": [c.pop("bandwidth") for c in cases], "cache_per_position": per_position}
    per_rank = [facts] * world
    if world > 1:
        dist.all_gather_object(per_rank, facts)
    packed = sum(bool(getattr(m, "packed", False)) for m in model.modules())
    int8 = sum(bool(getattr(m, "quantized", False)) for m in model.modules())
    if rank == 0:
        torch.save(logits, spec["logits_path"])
        floors = [f["bytes"] / f["bandwidth"] for f in per_rank if f["bandwidth"]]
        per_position = max(f["cache_per_position"] for f in per_rank)  # the rank that holds the most
        for case in cases:
            case["cache_bytes"] = step_cache_bytes(per_position, spec["batch"] * case["beams"], case["input"],
                                                   spec["new_tokens"])
        if len(floors) == world:
            for i, case in enumerate(cases):  # each run against the floor of its own samples (run_cases)
                if all(f["case_bandwidth"][i][run] for f in per_rank for run in range(len(case["next"]))):
                    case["floors"] = [max(f["bytes"] / f["case_bandwidth"][i][run] for f in per_rank)
                                      for run in range(len(case["next"]))]
        result = {
            "threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0)),
            "backend": groups[0].backend if groups and world > 1 else None,
            "packed_layers": packed, "int8_layers": int8,
            "native_kernels": kernels.status(runtime)[1] if packed else None,
            "collectives_per_token": collectives,
            "bytes_per_rank": max(f["bytes"] for f in per_rank),
            "bandwidth_per_rank": [f["bandwidth"] for f in per_rank],
            "bandwidth_samples": [f["samples"] for f in per_rank],
            "floor_s": max(floors) if len(floors) == world else None,
            "warmup_s": warmup, "compiled": compiled_decoding(model),
            "cases": cases,
        }
        tmp = Path(spec["result_path"] + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(spec["result_path"])  # complete or absent
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: the benchmark's work is written


if __name__ == "__main__":
    main()
