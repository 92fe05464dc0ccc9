"""Functions that run inside each spawned rank (importable, so spawn can find them)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import autotp
from autotp.sharding.layers import ParallelLayer
import zoo

NEW_TOKENS = 8


def _generate(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kw)


def compare_family(rank: int, world_size: int, family: str, beams: int = 1) -> dict:
    """Unsharded reference and sharded model in the same rank: logits and greedy tokens."""
    inputs = zoo.batch()
    model = zoo.build(family)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = _generate(model, inputs, num_beams=beams)
    linear_total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    autotp.shard(model, world_size)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = _generate(model, inputs, num_beams=beams)
    local = [m for m in model.modules() if isinstance(m, ParallelLayer)]
    return {
        "max_abs_diff": (logits - ref_logits).abs().max().item(),
        "logits_shape_ok": logits.shape == ref_logits.shape,
        "tokens_equal": torch.equal(tokens, ref_tokens),
        "new_tokens": tokens.shape[1] - inputs["input_ids"].shape[1],
        "tokens": tokens.tolist(),
        "local_linear_numel": sum(m.weight.numel() for m in local if isinstance(m, torch.nn.Linear)
                                  and m is not model.get_output_embeddings()),
        "linear_total": linear_total,
    }


def compare_all(rank: int, world_size: int, families: list[str]) -> dict:
    return {f: compare_family(rank, world_size, f) for f in families}


def compare_bf16(rank: int, world_size: int, family: str) -> dict:
    """Logits error against an fp32 reference: unsharded bf16 vs sharded bf16."""
    inputs = zoo.batch()
    with torch.no_grad():
        ref = zoo.build(family)(**inputs).logits
        plain = zoo.build(family, torch.bfloat16)(**inputs).logits.float()
        model = autotp.shard(zoo.build(family, torch.bfloat16), world_size)
        sharded = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    return {"plain_err": (plain - ref)[mask].abs().max().item(),
            "sharded_err": (sharded - ref)[mask].abs().max().item()}


def count_collectives(rank: int, world_size: int, family: str) -> dict:
    """Count the all-reduces and all-gathers one forward actually issues."""
    model = zoo.build(family)
    plan = autotp.plan(model, world_size)
    autotp.shard(model, world_size)
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
