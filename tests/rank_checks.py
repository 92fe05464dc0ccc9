"""Functions that run inside each spawned rank (importable, so spawn can find them)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import autotp
import census
import zoo

NEW_TOKENS = 8


def _generate(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kw)


def compare_family(rank: int, world_size: int, family: str, beams: int = 1, fuse: bool = True,
                   experts: str = "tensor") -> dict:
    """Unsharded reference and sharded model in the same rank: logits and greedy tokens."""
    inputs = zoo.batch()
    model = zoo.build(family)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = _generate(model, inputs, num_beams=beams)
    ref_beam = _generate(model, inputs, num_beams=3)
    # the plan shard applies below (it verifies it; once is enough)
    weights = census.census(model, autotp.plan(model, world_size, fuse_allreduce=fuse, verify=False,
                                               experts=experts))
    shape = _kv_shape(model)
    autotp.shard(model, world_size, fuse_allreduce=fuse, experts=experts)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = _generate(model, inputs, num_beams=beams)
    beam = _generate(model, inputs, num_beams=3)
    return {
        "beam_equal": torch.equal(beam, ref_beam),
        "max_abs_diff": (logits - ref_logits).abs().max().item(),
        "ref_logits_std": ref_logits.std().item(),
        "logits_shape_ok": logits.shape == ref_logits.shape,
        "tokens_equal": torch.equal(tokens, ref_tokens),
        "new_tokens": tokens.shape[1] - inputs["input_ids"].shape[1],
        "tokens": tokens.tolist(),
        "sharded_weights": weights.sharded,
        "replicated_weights": weights.replicated,
        "unplanned_weights": weights.unplanned,
        "local_weights": sum(census.weights(model).values()),
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        **shape,
    }


def _kv_shape(model) -> dict:
    """Head counts from the config, and the parameter count of one KV head in all layers (k and v)."""
    c = model.config
    heads = c.num_attention_heads
    multi_query = getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False)
    kv = 1 if multi_query else getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_head = 2 * head_dim * c.hidden_size * c.num_hidden_layers
    return {"heads": heads, "kv_heads": kv, "kv_head_numel": per_head}


def compare_all(rank: int, world_size: int, families: list[str], fuse: bool = True,
                experts: str = "tensor") -> dict:
    return {f: compare_family(rank, world_size, f, fuse=fuse, experts=experts) for f in families}


def compare_bf16(rank: int, world_size: int, family: str, kernels: str = "auto") -> dict:
    """Logits error against an fp32 reference: unsharded bf16 vs sharded bf16, with the
    sharded layers on the kernels ``kernels`` picks (and which were used). Runtimes here start
    from ``Runtime.from_env()``: whoever runs the suite may cap the ISA (AUTOTP_ISA=generic plays
    a CPU without AVX-512), and the parent's expectations read the same environment."""
    from autotp.sharding.layers import PackableLinear

    inputs = zoo.batch()
    runtime = autotp.Runtime.from_env().replace(kernels=kernels)
    with torch.no_grad():
        ref = zoo.build(family)(**inputs).logits
        plain = zoo.build(family, torch.bfloat16)(**inputs).logits.float()
        model = autotp.shard(zoo.build(family, torch.bfloat16), world_size, runtime=runtime)
        sharded = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    layers = [m for m in model.modules() if isinstance(m, PackableLinear) and not getattr(m, "tied", False)]
    return {"plain_err": (plain - ref)[mask].abs().max().item(),
            "sharded_err": (sharded - ref)[mask].abs().max().item(),
            "layers": len(layers), "packed": sum(m.packed for m in layers)}


def count_collectives(rank: int, world_size: int, family: str, fuse: bool = True) -> dict:
    """Count the all-reduces and all-gathers one forward issues (on torch.distributed, where
    they can be counted)."""
    model = zoo.build(family)
    plan = autotp.plan(model, world_size, fuse_allreduce=fuse)
    autotp.shard(model, world_size, fuse_allreduce=fuse, runtime=autotp.Runtime.from_env().replace(comm="torch"))
    counts = {"all_reduce": 0, "all_gather": 0}
    real = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in counts:
        setattr(dist, name, counting(name))
    try:
        with torch.no_grad():
            model(**zoo.batch())
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return {"counts": counts, "per_layer": plan.collectives_per_layer}


def corrupted_plan(rank: int, world_size: int, family: str) -> float:
    """Negative control: swap two ranks' slices of every row layer; logits must change."""
    from autotp.comm import TPGroup
    from autotp.sharding.apply import apply_plan

    inputs = zoo.batch()
    model = zoo.build(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    plan = autotp.plan(model, world_size)
    for entry in plan.entries.values():
        if entry.style.value == "row":
            entry.ranges = entry.ranges[::-1]
    apply_plan(model, plan, TPGroup.from_torch(world_size))
    with torch.no_grad():
        return (model(**inputs).logits - ref).abs().max().item()


def shard_errors(rank: int, world_size: int) -> dict:
    """The errors shard() raises inside a real process group; messages returned for checking."""
    messages = {}
    group_before = dist.group.WORLD
    autotp.init_distributed()  # already up (the helper called it): must be a no-op
    messages["init_noop"] = dist.group.WORLD is group_before and dist.get_world_size() == world_size
    model = zoo.build("llama")
    try:
        autotp.shard(model, world_size + 1)
    except ValueError as exc:
        messages["wrong_world_size"] = str(exc)
    autotp.shard(model, world_size)
    try:
        autotp.shard(model, world_size)
    except ValueError as exc:
        messages["twice"] = str(exc)
    return messages


def load_and_compare(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    """For each (family, directory[, from_pretrained keyword arguments]): from_pretrained on
    this rank against the unsharded model."""
    inputs = zoo.batch()
    out = []
    for family, directory, *options in cases:
        reference = zoo.build(family)
        with torch.no_grad():
            ref_logits = reference(**inputs).logits
        ref_tokens = _generate(reference, inputs)
        model = autotp.from_pretrained(directory, **(options[0] if options else {}))
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = _generate(model, inputs)
        out.append({"case": (family, directory), "max_abs_diff": (logits - ref_logits).abs().max().item(),
                    "tokens_equal": torch.equal(tokens, ref_tokens),
                    "new_tokens": tokens.shape[1] - inputs["input_ids"].shape[1]})
    return out


def load_own_file_only(rank: int, world_size: int, family: str, per_rank_dirs: list[str]) -> float:
    """Each rank loads from a directory that holds only its own rank file."""
    inputs = zoo.batch()
    with torch.no_grad():
        ref = zoo.build(family)(**inputs).logits
        return (autotp.from_pretrained(per_rank_dirs[rank])(**inputs).logits - ref).abs().max().item()


def int8_spec_model(family: str, world_size: int, group_size: int, dtype: torch.dtype = torch.float32,
                    scheme: str = "int8"):
    """The unsharded model with every layer the plan splits replaced by its quantized spec: the
    whole weight quantized (autotp.kernels.quantize_int8, or quantize_int4 for the INT4 schemes)
    and dequantised in fp32, the same on any number of ranks."""
    from autotp import kernels
    from autotp.plan import Style

    model = zoo.build(family, dtype)
    for entry in autotp.plan(zoo.build(family), world_size).entries.values():
        if entry.style in (Style.COLUMN, Style.ROW) and not entry.is_param and entry.norm_width is None:
            linear = model.get_submodule(entry.name)
            weight = linear.weight.data.t() if entry.transposed else linear.weight.data  # Conv1D: [in, out]
            g = group_size or weight.shape[1]
            if scheme == "int8":
                spec = kernels.dequantize_int8(*kernels.quantize_int8(weight, g), g).to(dtype)
            else:
                u, s, z = kernels.quantize_int4(weight, g, 0, scheme == "int4")
                spec = kernels.dequantize_int4(u, s, z, g).to(dtype)
            linear.weight.data = spec.t().contiguous() if entry.transposed else spec
    return model


def compare_int8(rank: int, world_size: int, family: str, group_size: int, scheme: str = "int8") -> dict:
    """Sharded INT8 (or INT4: ``scheme``) against the quantized spec model (fp32 activations:
    only the summation order differs) and, in bf16, against the unsharded bf16 model: logits and
    32 greedy tokens."""
    inputs = zoo.batch()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        spec = int8_spec_model(family, world_size, group_size, scheme=scheme)(**inputs).logits
        sharded = autotp.shard(zoo.build(family), world_size, quantize=scheme, quant_group_size=group_size)
        got = sharded(**inputs).logits
        plain = zoo.build(family, torch.bfloat16)
        ref16 = plain(**inputs).logits.float()
        int8_16 = autotp.shard(zoo.build(family, torch.bfloat16), world_size, quantize=scheme,
                               quant_group_size=group_size)
        got16 = int8_16(**inputs).logits.float()
        # greedy agreement step by step, each step fed the bf16 model's own tokens so far (a
        # free-running comparison would count every step after a first difference as another)
        seq = plain.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, -32:])], 1)
        picks = [m(input_ids=seq, attention_mask=full_mask).logits[:, -33:-1].argmax(-1) for m in (plain, int8_16)]
        # one decode step (M = 2 rows: the kernels' few-rows path) against the spec too
        step = {k: v[:, -1:] for k, v in inputs.items() if k == "input_ids"}
        step_err = (sharded(**step).logits - int8_spec_model(family, world_size, group_size, scheme=scheme)(
            **step).logits).abs().max().item()
    return {"spec_err": (got - spec)[mask].abs().max().item(), "spec_absmax": spec[mask].abs().max().item(),
            "step_err": step_err,
            "bf16_rel_err": ((got16 - ref16)[mask].abs().max() / ref16[mask].abs().max()).item(),
            "token_agreement": (picks[0] == picks[1]).float().mean().item(),
            "int8_layers": sum(bool(getattr(m, "quantized", False)) for m in sharded.modules()),
            "formats": sorted({type(m.weight_format).__name__ for m in sharded.modules()
                               if getattr(m, "quantized", False)})}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def load_int8_and_compare(rank: int, world_size: int, cases: list[tuple], scheme: str = "int8") -> list[dict]:
    """For each (Hugging Face dir, quantized pre-sharded dir, group size[, scheme]): from_pretrained
    on the pre-sharded dir and on the HF dir with quantize=scheme (default ``scheme``), against
    autotp.shard(quantize=scheme) of the HF model on the same ranks: quantized values, scales
    (zero points), offsets and logits."""
    from transformers import AutoModelForCausalLM

    inputs = zoo.batch()
    out = []
    for hf_dir, presharded, group, *named in cases:
        scheme = named[0] if named else scheme
        online = autotp.shard(AutoModelForCausalLM.from_pretrained(hf_dir), world_size, quantize=scheme,
                              quant_group_size=group)
        loaded = {"presharded": autotp.from_pretrained(presharded),
                  "hf": autotp.from_pretrained(hf_dir, quantize=scheme, quant_group_size=group)}
        with torch.no_grad():
            ref = online(**inputs).logits
        layers = {n: m for n, m in online.named_modules() if getattr(m, "quantized", False)}
        for how, model in loaded.items():
            mine = dict(model.named_modules())
            parts_equal = all(all(_same(a, b) for a, b in zip(m.weight_format.parts(m),
                                                              mine[n].weight_format.parts(mine[n])))
                              and mine[n].weight_format.group_size == m.weight_format.group_size
                              and mine[n].weight_format.group_offset == m.weight_format.group_offset
                              for n, m in layers.items())
            with torch.no_grad():
                diff = (model(**inputs).logits - ref).abs().max().item()
            out.append({"case": (hf_dir, how, group), "int8_layers": len(layers), "parts_equal": parts_equal,
                        "max_abs_diff": diff})
    return out


def compare_fast_decoding(rank: int, world_size: int, family: str) -> dict:
    """The sharded model with a compiled decoding step and autotp's attention function against
    the unsharded model on plain transformers (SDPA, dynamic cache, eager): greedy and 3-beam
    tokens; how many graphs dynamo compiled, and how often the attention function ran its own
    decode path (not SDPA's) in an eager step (inside the compiled step the same code runs at
    tracing, where counting would be guarded and recompile)."""
    from torch._dynamo.utils import counters

    from autotp.sharding import attention, decode

    # greedy over 6 rows, as many as beam search's 2 x 3: one compiled graph serves both (a
    # second shape would compile a second, dynamic one)
    inputs, wide = zoo.batch(), zoo.batch(copies=3)
    model = zoo.build(family)
    ref_greedy, ref_beam = _generate(model, wide), _generate(model, inputs, num_beams=3)
    calls = {"decode": 0, "reorder": 0}
    own, own_reorder = attention.decode_attention, decode.reorder_cache

    def counted(module, query, *args, **kwargs):
        if not torch.compiler.is_compiling():  # (a count inside the graph would be guarded: recompiles)
            calls["decode"] += query.shape[2] == 1
        return own(module, query, *args, **kwargs)

    def counted_reorder(cache, beam_idx):
        calls["reorder"] += 1
        return own_reorder(cache, beam_idx)

    attention.decode_attention, decode.reorder_cache = counted, counted_reorder
    graphs = counters["stats"]["unique_graphs"]
    rows = []  # the rows of each prompt forward (more than one position), outside the compiled step

    def prompt_rows(module, args):
        if not torch.compiler.is_compiling() and args[0].shape[1] > 1:
            rows.append(args[0].shape[0])

    try:
        autotp.shard(model, world_size, runtime=autotp.Runtime.from_env().replace(compile=True, attention="auto"))
        hook = model.get_input_embeddings().register_forward_pre_hook(prompt_rows)
        greedy, beam = _generate(model, wide), _generate(model, inputs, num_beams=3)
        hook.remove()
        with torch.no_grad():  # one eager step over a dynamic cache: the decode path itself
            out = model(**inputs, use_cache=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
                  **{decode.cache_keyword(model): decode.returned_cache(out)})
    finally:
        attention.decode_attention, decode.reorder_cache = own, own_reorder
    return {"greedy_equal": torch.equal(greedy, ref_greedy), "beam_equal": torch.equal(beam, ref_beam),
            "graphs": counters["stats"]["unique_graphs"] - graphs, "decode_calls": calls["decode"],
            "reorders": calls["reorder"], "prompt_rows": rows,
            "attn": model.config._attn_implementation, "tokens": greedy.tolist()}


def load_prequantized_and_compare(rank: int, world_size: int, cases: list[tuple[str, str]]) -> list[dict]:
    """For each (GPTQ / AWQ directory, family): autotp.from_pretrained on these ranks against the
    plain model with the format's reference dequantization (tests/gptq_awq.py), float32."""
    import gptq_awq

    inputs = zoo.batch()
    out = []
    for directory, family in cases:
        model = autotp.from_pretrained(directory)
        reference = gptq_awq.reference_model(directory, family)
        with torch.no_grad():
            ref = reference(**inputs).logits
            got = model(**inputs).logits
            step = {"input_ids": inputs["input_ids"][:, -1:]}  # M = 2: the few-rows kernels
            step_diff = model(**step).logits - reference(**step).logits
        formats = sorted({type(m.weight_format).__name__ for m in model.modules() if getattr(m, "quantized", False)})
        out.append({"case": directory, "max_abs_diff": (got - ref).abs().max().item(),
                    "step_diff": step_diff.abs().max().item(), "ref_absmax": ref.abs().max().item(),
                    "formats": formats, "dtype": str(next(model.parameters()).dtype),
                    "quantized_layers": sum(bool(getattr(m, "quantized", False)) for m in model.modules())})
    return out


def compare_merged_siblings(rank: int, world_size: int, family: str, quantize: str | None) -> dict:
    """The sharded bf16 (or quantized) model with its sibling layers merged (the default) against
    the same model with each layer alone: logits of one forward, and greedy (6 rows) and 3-beam
    tokens through a compiled decoding step; the merged groups by layer name."""
    from autotp.sharding.layers import ColumnParallelLinear

    base = zoo.build(family, torch.bfloat16)
    inputs, wide = zoo.batch(), zoo.batch(copies=3)
    out = {}
    for merge in (False, True):
        runtime = autotp.Runtime.from_env().replace(kernels="native", merge_siblings=merge, compile=True)
        model = autotp.shard(copy.deepcopy(base), world_size, quantize=quantize, runtime=runtime)
        with torch.no_grad():
            logits = model(**inputs).logits
        out[merge] = (logits, _generate(model, wide), _generate(model, inputs, num_beams=3))
        names = {m: n for n, m in model.named_modules()}
        groups = {id(m.siblings): m.siblings for m in model.modules()
                  if isinstance(m, ColumnParallelLinear) and m.siblings is not None}
        out[f"groups_{merge}"] = [[names[m] for m in g.called] for g in groups.values()]
    return {"logits_equal": torch.equal(out[False][0], out[True][0]),
            "greedy_equal": torch.equal(out[False][1], out[True][1]),
            "beam_equal": torch.equal(out[False][2], out[True][2]),
            "groups": out["groups_True"], "groups_when_off": out["groups_False"]}


def compiled_collectives(rank: int, world_size: int) -> dict:
    """A compiled graph's shared-memory all-reduce and all-gather, compiled with autotp's C shim
    table (autotp.kernels.shims): whether the C++ wrapper calls their C functions, and whether
    the results equal the eager collectives' bit for bit (bf16 sums, uneven gathered parts)."""
    from torch._inductor.utils import run_and_get_cpp_code

    from autotp.comm import TPGroup
    from autotp.kernels import shims

    group = TPGroup.from_torch(world_size, runtime=autotp.Runtime.from_env().replace(comm="shm"))
    sizes = [5 + r for r in range(world_size)]

    def fn(x, part):
        return group.all_reduce(x * 2), group.all_gather_last_dim(part + 1, sizes)

    gen = torch.Generator().manual_seed(rank)
    x, part = torch.randn(3, 64, generator=gen).bfloat16(), torch.randn(2, sizes[rank], generator=gen)
    want = (group.all_reduce((x * 2).clone()), group.all_gather_last_dim(part + 1, sizes))
    torch._dynamo.reset()
    with torch._inductor.config.patch({"aot_inductor.custom_ops_to_c_shims": shims.c_shims(), "fx_graph_cache": False}):
        got, code = run_and_get_cpp_code(torch.compile(fn, options={"cpp_wrapper": True}), x, part)
    return {"shims_called": all(f"aoti_torch_cpu_{op}(" in code for op in ("shm_all_reduce", "shm_all_gather_last_dim")),
            "equal": all(torch.equal(g, w) for g, w in zip(got, want)),
            "other_rank_differs": not torch.equal(want[0], (x * 2 * world_size))}
