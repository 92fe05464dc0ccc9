"""The public functions of shared/DESIGN.md. Thin: they resolve the runtime, make the plan and
the group, and hand them to autotp.sharding (or autotp.checkpoint)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from autotp.checkpoint.loader import from_pretrained
from autotp.checkpoint.writer import save_sharded
from autotp.comm import TPGroup, init_distributed
from autotp.plan import Plan, Style
from autotp.policies import build_plan
from autotp.runtime import Runtime, resolve
from autotp.sharding.apply import apply_plan, check_not_sharded
from autotp.sharding.decode import prepare_decoding
from autotp.sharding.layers import pack_layers
from autotp.sharding.quantize import DEFAULT_GROUP_SIZE, QuantScheme


def plan(model: nn.Module, world_size: int, overrides: Mapping[str, str | Style] | None = None,
         strict: bool = True, verify: bool = True, fuse_allreduce: bool = True,
         runtime: Runtime | None = None, experts: str = "tensor") -> Plan:
    """The tensor-parallel plan of ``model`` for ``world_size`` ranks, without any process group.

    ``overrides`` maps module-name patterns (``*`` for any layer index) to a style
    ('column', 'row', 'replicate' or Hugging Face's 'colwise' / 'rowwise'); with
    ``strict=False`` a Linear inside a decoder layer that cannot stay sharded is replicated
    instead of raising. With ``verify`` (the default) the plan is checked numerically on
    simulated ranks of one decoder layer, and a plan that would change the model's output
    raises ShardingError instead of being returned. With ``fuse_allreduce`` (the default),
    row-parallel layers whose partial sums are added together before anything reads them
    (attention and MLP of a parallel-residual block) share one all-reduce; pass False to
    give every row-parallel layer its own, for comparison or debugging. ``runtime`` (default
    ``Runtime.from_env()``) holds autotp's settings; planning reads none of them yet.

    Mixture-of-experts blocks: ``experts="tensor"`` (the default) splits every expert like a
    dense MLP (gate/up by output features, down by input features, one all-reduce for the
    block), so every rank reads 1/N of each expert a token picks; ``experts="expert"`` gives
    each rank whole experts (expert parallelism, where the experts divide evenly over the
    ranks): a rank computes only the tokens routed to its experts, and the same one
    all-reduce brings them back. See the README for which is faster where.
    """
    resolve(runtime)
    check_not_sharded(model)
    return build_plan(model, world_size, overrides, strict, verify, fuse_allreduce, experts)


def shard(model: nn.Module, world_size: int, overrides: Mapping[str, str | Style] | None = None,
          strict: bool = True, verify: bool = True, fuse_allreduce: bool = True,
          process_group: Any = None, quantize: str | None = None,
          quant_group_size: int = DEFAULT_GROUP_SIZE, runtime: Runtime | None = None,
          experts: str = "tensor") -> nn.Module:
    """Shard ``model`` in place for ``world_size`` ranks and return it; this process's rank
    comes from torch.distributed (``process_group``, or the default group). Every rank's
    forward returns the full logits. ``overrides``, ``strict``, ``verify``,
    ``fuse_allreduce`` and ``experts`` are as in :func:`plan`. bf16 Linear shards are packed for the native
    kernels where they run; ``runtime`` (default ``Runtime.from_env()``: ``AUTOTP_KERNELS``,
    ``AUTOTP_COMM``, ...) chooses the kernels and the all-reduce.

    ``quantize="int8"`` gives the column- and row-parallel layers weight-only INT8 weights
    (activations keep the model's dtype): one fp32 scale per output row and group of
    ``quant_group_size`` input columns of the whole weight (0: per row), so each rank holds
    exactly its slice of the quantized unsharded model. ``quantize="int4"`` does the same with
    4-bit values, two per byte (symmetric), ``"int4-asym"`` with a 4-bit zero point per group
    too (autotp.kernels.int4 defines both). The lm_head and embeddings stay as they are.

    With ``runtime.compile`` (``AUTOTP_COMPILE=1``) ``generate`` decodes with a static KV cache
    and a compiled step (autotp.sharding.decode)."""
    rt = resolve(runtime)
    check_not_sharded(model)
    quant = QuantScheme.parse(quantize, quant_group_size if quantize else None)
    the_plan = build_plan(model, world_size, overrides, strict, verify, fuse_allreduce, experts)
    group = TPGroup.from_torch(world_size, process_group, rt)  # after the plan is known valid
    apply_plan(model, the_plan, group, quant=quant)
    pack_layers(model, rt)
    return prepare_decoding(model, rt)


__all__ = ["from_pretrained", "init_distributed", "plan", "save_sharded", "shard", "Plan", "Runtime", "Style"]
