"""Where a decode step's time goes: GEMMs, attention, norms / rotary / elementwise ops, the
all-reduce, KV-cache handling, the lm_head, beam search's own work (``--beams``), and the rest
(Python, module calls: the step's wall time minus everything the profiler attributes to an op).

A bench-shaped random model (``autotp.bench.shapes``: llama-1b, gptj-1b, ...) is sharded over the
ranks torchrun starts (one rank: run it with plain python), bf16 or INT8 (or, with ``--plain``,
left to plain transformers on one rank, for comparison), fed a prompt, and then
decoded token by token: first a few steps timed without the profiler (the step time quoted),
then ``--steps`` steps under torch.profiler, whose op times are sorted into the categories. Op
times under the profiler carry its overhead; the table gives each category's share of the
profiled step and scales it to the unprofiled median. A second table splits the unprofiled
steps themselves by autotp's op clock (autotp.kernels.op_clock: the time inside its GEMM,
collective and attention ops, and what is left), which adds no cost to the ops and no profiler
to the rest: the shares of the first table move with the profiler's own cost per op, those of
the second do not. Rank 0 prints (``--every-rank``: each rank in turn).

With ``--beams N`` the prompt is N rows and each step is beam search's: the forward over N rows,
log-softmax and top-N over every beam's continuations ("beam search"), and the cache reordered
to the chosen beams as ``generate`` does it ("KV cache": the model's ``_reorder_cache``, which the
compiled step brings, or the cache's own reorder).

    python tools/profile_decode.py --model llama-1b [--int8]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/profile_decode.py --model gptj-1b
    autotp-run --nproc 2 --bind-cores tools/profile_decode.py --model gptj-1b --compile --beams 4 --prompt 256
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import autotp
from autotp.bench import shapes
from autotp.comm.group import TPGroup
from autotp.sharding.decode import cache_keyword, returned_cache

CATEGORIES = ["GEMMs", "attention", "norms / rotary / elementwise", "all-reduce", "KV cache", "lm_head",
              "beam search", "rest"]
# ranges this tool opens around calls the profiler would otherwise split into small ops
_RANGES = {"autotp::all_reduce": "all-reduce", "autotp::kv_cache": "KV cache", "autotp::lm_head": "lm_head",
           "autotp::attention": "attention", "autotp::beam_search": "beam search",
           "autotp::decode_attention": "attention", "autotp::reorder_rows_": "KV cache",
           # a compiled step calls the collectives as ops (the lm_head's gather is its all-gather)
           "autotp::shm_all_reduce": "all-reduce", "autotp::shm_all_reduce_": "all-reduce",
           "autotp::all_reduce": "all-reduce",
           "autotp::shm_all_gather_last_dim": "lm_head", "autotp::all_gather_last_dim": "lm_head"}
_LINEAR_OPS = ("autotp::linear_bf16", "autotp::linear_int8")
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "autotp::linear_bf16",
          "autotp::linear_int8", "aten::_grouped_mm")
_ATTENTION = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math")
# a compiled step calls autotp's ops as C functions (autotp.kernels.shims), which inductor's
# kernel profile records by these names, without input shapes: the lm_head's GEMM is the one
# whose next op is the all-gather of the logits
_SHIM = "aoti_torch_cpu_"
_SHIM_GEMMS = tuple(f"{_SHIM}{op}" for op in ("linear_bf16", "linear_int8", "linear_int4"))
_SHIM_GATHER = f"{_SHIM}shm_all_gather_last_dim"
_SHIMS = {f"{_SHIM}decode_attention": "attention", f"{_SHIM}shm_all_reduce": "all-reduce", _SHIM_GATHER: "lm_head"}


def category_times(events, head_shape: tuple[int, ...] | None = None, compiled: bool = False) -> dict[str, float]:
    """Microseconds per category over the profiled events: a range or a GEMM / attention op
    counts whole (its children inside it); any other op counts its own time and its children
    are sorted on their own. In a compiled step (``compiled``) the lm_head's GEMM is the linear
    op whose weight has ``head_shape`` (shapes recorded), the batched matmuls are attention's
    (the only ones a dense decoder's step has), and inductor's fused loops count as
    elementwise (their cache writes included)."""
    totals: dict[str, float] = defaultdict(float)

    def visit_all(siblings) -> None:
        siblings = sorted(siblings, key=lambda e: e.time_range.start)
        for i, event in enumerate(siblings):
            following = next((e.name for e in siblings[i + 1:] if e.name.startswith(_SHIM)), None)
            visit(event, following)

    def visit(event, following: str | None = None) -> None:
        name = event.name
        shapes = getattr(event, "input_shapes", None) or []
        if compiled and name in _LINEAR_OPS and head_shape and len(shapes) > 1 and tuple(shapes[1]) == head_shape:
            totals["lm_head"] += event.cpu_time_total
        elif compiled and name in _SHIM_GEMMS:
            totals["lm_head" if following == _SHIM_GATHER else "GEMMs"] += event.cpu_time_total
        elif compiled and name in _SHIMS:
            totals[_SHIMS[name]] += event.cpu_time_total
        elif compiled and name == "aten::bmm":
            totals["attention"] += event.cpu_time_total
        elif compiled and "cpp_fused" in name:
            totals["norms / rotary / elementwise"] += event.cpu_time_total
        elif name in _RANGES:
            totals[_RANGES[name]] += event.cpu_time_total
        elif name in _ATTENTION:
            totals["attention"] += event.cpu_time_total
        elif name in _GEMMS:
            totals["GEMMs"] += event.cpu_time_total
        else:
            if name.startswith(("aten::", "autotp::")):
                totals["norms / rotary / elementwise"] += event.self_cpu_time_total
            visit_all(event.cpu_children)

    visit_all([event for event in events if event.cpu_parent is None])
    return totals


def instrument(model: torch.nn.Module) -> None:
    """Name the all-reduce, the KV-cache update, the attention function and the lm_head for the
    profiler (in eager steps: a compiled step runs none of this Python)."""
    original = TPGroup.all_reduce

    def all_reduce(self, tensor):
        with record_function("autotp::all_reduce"):
            return original(self, tensor)

    TPGroup.all_reduce = all_reduce
    from transformers import cache_utils

    for cls in {type(layer) for layer in DynamicCache(config=model.config).layers} | {cache_utils.DynamicLayer}:
        update = cls.update

        def wrapped(self, *args, __update=update, **kwargs):
            with record_function("autotp::kv_cache"):
                return __update(self, *args, **kwargs)

        cls.update = wrapped
    from transformers import AttentionInterface

    impl = model.config._attn_implementation
    if impl in AttentionInterface._global_mapping:
        attend = AttentionInterface._global_mapping[impl]

        def attention(*args, **kwargs):
            with record_function("autotp::attention"):
                return attend(*args, **kwargs)

        AttentionInterface._global_mapping[impl] = attention
    head = model.get_output_embeddings()
    forward = head.forward

    def head_forward(*args, **kwargs):
        with record_function("autotp::lm_head"):
            return forward(*args, **kwargs)

    head.forward = head_forward


class GreedyStep:
    """One greedy step: the forward, the best token of each row."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.key = cache_keyword(model)

    def __call__(self, forward, token, cache, position):
        out = forward(input_ids=token, **{self.key: cache}, use_cache=True, cache_position=position)
        return out.logits[:, -1:].argmax(-1), returned_cache(out), position[-1:] + 1


class BeamStep:
    """One step of beam search over ``beams`` rows, as generate's: the forward, the scores of every
    beam's continuations and the best ``beams`` of them, the cache reordered to the chosen beams."""

    def __init__(self, model: torch.nn.Module, beams: int) -> None:
        self.model, self.scores, self.key = model, torch.zeros(beams), cache_keyword(model)
        self.scores[1:] = -1e9  # the rows start equal: only the first one's continuations count

    def __call__(self, forward, token, cache, position):
        out = forward(input_ids=token, **{self.key: cache}, use_cache=True, cache_position=position)
        with record_function("autotp::beam_search"):
            logits = out.logits[:, -1].float()
            scores = torch.log_softmax(logits, dim=-1) + self.scores[:, None]
            best = scores.flatten().topk(len(self.scores))
            self.scores, beam_idx, token = best.values, best.indices // logits.shape[-1], best.indices % logits.shape[-1]
        with record_function("autotp::kv_cache"):
            reorder = getattr(self.model, "_reorder_cache", None)
            cache = reorder(returned_cache(out), beam_idx) if reorder else returned_cache(out)
            if not reorder:
                cache.reorder_cache(beam_idx)
        return token[:, None], cache, position[-1:] + 1


CLOCK_ROWS = {"gemm": "GEMMs (lm_head included)", "collective": "all-reduce / all-gather (waits included)",
              "attention": "attention (decode_attention)"}


def print_clock_table(times: list[float], clocks: list[dict[str, tuple[float, int]]]) -> None:
    """The timed (unprofiled) steps split by autotp's op clock (autotp.kernels.op_clock): medians
    per step of the time inside each kind of op, and of what is left ("outside autotp's ops": the
    compiled graph's own code and fused loops, the small eager ops, Python, the step's
    argmax or beam search)."""
    step = statistics.median(times)
    rows = {name: statistics.median(c[kind][0] for c in clocks) for kind, name in CLOCK_ROWS.items()}
    rows["outside autotp's ops"] = statistics.median(t - sum(s for s, _ in c.values()) for t, c in zip(times, clocks))
    calls = {name: statistics.median(c[kind][1] for c in clocks) for kind, name in CLOCK_ROWS.items()}
    print(f"unprofiled, by autotp's op clock (median of {len(times)} steps):")
    print(f"{'category':<42} {'share':>6} {'ms / step':>10} {'calls':>6}")
    for name, seconds in rows.items():
        count = f"{calls[name]:>6.0f}" if name in calls else f"{'':>6}"
        print(f"{name:<42} {seconds / step:>6.1%} {seconds * 1e3:>10.2f} {count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help=f"a bench shape: {', '.join(shapes.SHAPES)}")
    parser.add_argument("--int8", action="store_true", help="quantize='int8' (group 128)")
    parser.add_argument("--plain", action="store_true", help="profile plain transformers instead (one rank, bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="decode as AUTOTP_COMPILE=1 does: a static cache and the compiled step")
    parser.add_argument("--attention", choices=["auto", "sdpa"], default="auto",
                        help="AUTOTP_ATTENTION: autotp's attention function (auto) or SDPA")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=16, help="decode steps under the profiler")
    parser.add_argument("--timed", type=int, default=16, help="decode steps timed without the profiler")
    parser.add_argument("--beams", type=int, default=1, help="beam search over this many beams (1: greedy)")
    parser.add_argument("--ops", type=int, default=0, help="also list the N ops of most self time (profiled)")
    parser.add_argument("--every-rank", action="store_true",
                        help="every rank prints its table, in rank order (a rank that waits in the all-reduce "
                             "waits for a slower one: the tables show which, and where it spends the time)")
    args = parser.parse_args()

    if "WORLD_SIZE" in os.environ:
        autotp.init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shapes.shape_config(args.model), dtype=torch.bfloat16).eval()
    if args.plain:
        if world > 1 or args.int8 or args.compile:
            parser.error("--plain is the unsharded transformers model: one rank, bf16, eager")
    else:
        if not dist.is_initialized():  # one rank: a group of one, so that autotp.shard runs as usual
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                              WORLD_SIZE="1")
            autotp.init_distributed()
        runtime = autotp.Runtime.from_env().replace(compile=args.compile, attention=args.attention)
        model = autotp.shard(model, world, quantize="int8" if args.int8 else None, runtime=runtime)
    instrument(model)
    if args.beams < 1:
        parser.error("--beams must be at least 1")
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.expand(args.beams, -1)
    decode = GreedyStep(model) if args.beams == 1 else BeamStep(model, args.beams)
    forward = model  # with --compile its forward sends one-position steps over a static cache to the compiled step
    if args.compile:  # what generate does with AUTOTP_COMPILE=1
        cache = StaticCache(config=model.config, max_cache_len=args.prompt + 8 + args.timed + args.steps)
    else:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True,
                    cache_position=torch.arange(args.prompt))
        token, cache, position = out.logits[:, -1:].argmax(-1), returned_cache(out), torch.tensor([args.prompt])
        start = time.perf_counter()
        for _ in range(4):  # warm-up (compiling, with --compile)
            token, cache, position = decode(forward, token, cache, position)
        warmup = time.perf_counter() - start
        times, clocks = [], []
        clocked = not args.plain and autotp.kernels.extension_loaded()
        if clocked:
            autotp.kernels.op_clock(True)
        for _ in range(args.timed):
            start = time.perf_counter()
            token, cache, position = decode(forward, token, cache, position)
            times.append(time.perf_counter() - start)
            if clocked:
                clocks.append(autotp.kernels.op_clock())
        if clocked:
            autotp.kernels.op_clock(False)
        if args.compile:
            # The timed steps ran the step as generate compiles it. The profiled ones run it
            # compiled again with each fused loop named for the profiler: inductor then wraps every
            # loop in a guard that copies its source's stack trace, about 6% of a step (llama-1b
            # INT8, 2 x 1: 18.5 against 17.5 ms, AMD EPYC Zen 4), which the unprofiled median must not include.
            from torch._inductor import config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
            torch._dynamo.reset()
            for _ in range(2):
                token, cache, position = decode(forward, token, cache, position)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.compile) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                token, cache, position = decode(forward, token, cache, position)
            profiled = (time.perf_counter() - start) / args.steps
    head = model.get_output_embeddings().weight
    totals = category_times(prof.profiler.function_events, tuple(head.shape), args.compile)
    per_step = {k: v / args.steps / 1e6 for k, v in totals.items()}
    per_step["rest"] = max(0.0, profiled - sum(per_step.values()))
    for turn in range(world if args.every_rank else 1):
        if args.every_rank and dist.is_initialized():
            dist.barrier()
        if rank != turn:
            continue
        plain = statistics.median(times)
        kind = "plain transformers, bf16" if args.plain else "autotp, INT8 (group 128)" if args.int8 else "autotp, bf16"
        if not args.plain:
            kind += (", compiled step" if args.compile else ", eager") + f", attention {args.attention}"
        mode = "greedy" if args.beams == 1 else f"beam {args.beams}"
        who = f"rank {rank}: " if args.every_rank else ""
        print(f"{who}{args.model}, {kind}, {world} rank(s) x {torch.get_num_threads()} thread(s), prompt {args.prompt}, {mode}: "
              f"decode step {plain * 1e3:.1f} ms median unprofiled, {profiled * 1e3:.1f} ms profiled; "
              f"warm-up {warmup:.1f} s")
        print(f"{'category':<30} {'share':>6} {'ms / step':>10}")
        for name in CATEGORIES:
            share = per_step.get(name, 0.0) / profiled
            print(f"{name:<30} {share:>6.1%} {share * plain * 1e3:>10.2f}", flush=True)
        if clocks:
            print_clock_table(times, clocks)
        if args.ops:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
