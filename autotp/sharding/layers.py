"""The parallel layers. Each owns its shard of the weight and its collective.

With Y = X A^T + b and A of shape [out, in]:
  ColumnParallelLinear keeps rows of A (a slice of the outputs): Y_r = X A_r^T + b_r, no
    communication; the output stays sharded for the row-parallel layer that reads it.
  RowParallelLinear keeps columns of A (a slice of the inputs): Y = sum_r X_r A_r^T, one
    all-reduce, then + b once (after the sum, so the bias is not counted tp_size times).
  Vocab-parallel embedding / lm_head keep rows of the vocabulary; the embedding all-reduces
    (each token's row lives on one rank), the lm_head all-gathers full logits.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autotp.comm import TPGroup
from autotp.kernels.formats import Int4Weight, Int8Weight, PlainWeight, Release, WeightFormat
from autotp.plan import Ranges, Style, cut_dim
from autotp.runtime import Runtime, resolve
from autotp.sharding.quantize import QuantShard


def take(tensor: torch.Tensor, dim: int, ranges: Ranges, copy: bool = True) -> torch.Tensor:
    """Concatenate the [start, stop) blocks of ``tensor`` along ``dim`` into a new tensor (so the
    rest can be freed); with ``copy=False`` a single block is returned as a view instead."""
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in ranges]
    if len(parts) == 1:
        return parts[0].clone().contiguous() if copy else parts[0]
    return torch.cat(parts, dim=dim).contiguous()


def shard_param(tensor: torch.Tensor, style: Style, param: str, ranges: Ranges, copy: bool = True) -> torch.Tensor:
    """This rank's part of parameter ``param`` of a module of ``style`` (plan.CUT_DIMS), as a
    new tensor (``copy``) or a view where one block suffices."""
    dim = cut_dim(style, param)
    if dim is None:
        return tensor.clone() if copy else tensor
    return take(tensor, dim, ranges, copy)


class ParallelLayer:
    """Marker base of every module autotp creates; a model holding one is already sharded."""

    group: TPGroup


class PackableLinear(nn.Linear):
    """A Linear whose weight has a format (autotp.kernels.formats): plain, packed bf16, INT8 or
    INT4, plain or packed. The format multiplies, unpacks and packs; the layer keeps its tensors
    as parameters (``weight``, and ``weight_scale`` / ``weight_zero`` when quantized) so state
    dicts see them."""

    weight_format: WeightFormat = PlainWeight()

    @property
    def packed(self) -> bool:
        return self.weight_format.packed

    @property
    def quantized(self) -> bool:
        return self.weight_format.quantized

    def set_quantized(self, shard: QuantShard) -> None:
        """Hold the quantized ``shard`` (autotp.sharding.quantize) in place of the weight: ``weight``
        becomes the int8 values (INT8) or the 4-bit ones two per byte (INT4), ``weight_scale``
        their fp32 scales and, for asymmetric INT4, ``weight_zero`` the zero points; plain until
        :meth:`pack_weight` packs them for the native GEMM where it runs. Plain, the torch path
        dequantises and multiplies in fp32 (the spec the kernels meet)."""
        self.weight = nn.Parameter(shard.q, requires_grad=False)
        self.weight_scale = nn.Parameter(shard.scales, requires_grad=False)
        if shard.zeros is not None:
            self.weight_zero = nn.Parameter(shard.zeros, requires_grad=False)
        self.weight_format = (Int8Weight(shard.group_size, shard.group_offset) if shard.bits == 8 else
                              Int4Weight(shard.group_size, shard.group_offset, shard.zeros is None))

    set_int8 = set_quantized

    def int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q [out_features, in_features] int8, scales [out_features, groups] fp32) of an INT8 layer."""
        if not isinstance(self.weight_format, Int8Weight):
            raise ValueError(f"autotp: this {type(self).__name__} holds {self.weight.dtype} weights, not INT8")
        return self.weight_format.parts(self)

    def int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(U [out_features, in_features] uint8 values 0..15, scales [out_features, groups] fp32,
        zero points [out_features, groups] uint8 or None when symmetric) of an INT4 layer."""
        if not isinstance(self.weight_format, Int4Weight):
            raise ValueError(f"autotp: this {type(self).__name__} holds {self.weight.dtype} weights, not INT4")
        return self.weight_format.parts(self)

    def pack_weight(self, runtime: Runtime | None = None, release: Release | None = None) -> bool:
        """Pack the weight for the native GEMM where ``autotp.kernels`` says it runs under
        ``runtime`` for this weight's dtype; returns whether the layer is now packed. ``release``
        is given the plain tensors once copied (to hand back the pages of a memory-mapped
        checkpoint)."""
        self.weight_format = self.weight_format.pack(self, resolve(runtime), release)
        return self.weight_format.packed

    def unpacked_weight(self) -> torch.Tensor:
        """The [out_features, in_features] weight, unpacked if need be (a new tensor then); a
        quantized layer's dequantised, in float32."""
        return self.weight_format.unpacked(self)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.weight_format.matmul(self, x, bias)


class ColumnParallelLinear(PackableLinear, ParallelLayer):
    """Output features split: Y_r = X A_r^T + b_r. The output is this rank's slice. Layers that
    read the same input may be merged into one GEMM (``siblings``: autotp.sharding.siblings)."""

    siblings = None  # a Siblings group once merged
    sibling_index = 0  # this layer's place in the order the group's layers are called

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup, copy: bool = True) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.weight = nn.Parameter(shard_param(source.weight.data, Style.COLUMN, "weight", ranges, copy),
                                   requires_grad=False)
        self.bias = (nn.Parameter(shard_param(source.bias.data, Style.COLUMN, "bias", ranges, copy),
                                  requires_grad=False) if source.bias is not None else None)
        self.in_features = source.in_features
        self.out_features = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.siblings is not None:
            return self.siblings.output(self, x)
        return self.matmul(x, self.bias)


class RowParallelLinear(PackableLinear, ParallelLayer):
    """Input features split: Y = all_reduce(X_r A_r^T) + b. ``x`` is this rank's slice."""

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup, copy: bool = True) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.weight = nn.Parameter(shard_param(source.weight.data, Style.ROW, "weight", ranges, copy),
                                   requires_grad=False)
        self.bias = (nn.Parameter(shard_param(source.bias.data, Style.ROW, "bias", ranges, copy),
                                  requires_grad=False) if source.bias is not None else None)
        self.in_features = self.weight.shape[1]
        self.out_features = source.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.matmul(x, None))
        return y + self.bias if self.bias is not None else y


class PartialSums:
    """What the row layers of one fused all-reduce share: the deferred layers and, during a
    forward, their unreduced outputs."""

    def __init__(self) -> None:
        self.deferred: list[DeferredRowParallelLinear] = []
        self.parts: dict[int, torch.Tensor] = {}


class DeferredRowParallelLinear(RowParallelLinear):
    """A row layer whose output is only ever added to another's before anything reads it
    (parallel attention and MLP): it leaves X_r A_r^T in ``partial_sums`` for the
    FusedRowParallelLinear that reduces both, and returns zeros."""

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup, partial_sums: PartialSums,
                 copy: bool = True) -> None:
        super().__init__(source, ranges, group, copy)
        self.partial_sums = partial_sums
        partial_sums.deferred.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        self.partial_sums.parts[id(self)] = y
        return torch.zeros_like(y)


class FusedRowParallelLinear(RowParallelLinear):
    """The last row layer of a fused block: adds the deferred layers' partial sums to its own,
    all-reduces once, and adds every member's bias once:
    Y_a + Y_b = all_reduce(X_a A_a^T + X_b A_b^T) + b_a + b_b."""

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup, partial_sums: PartialSums,
                 copy: bool = True) -> None:
        super().__init__(source, ranges, group, copy)
        self.partial_sums = partial_sums

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        sums = self.partial_sums
        for layer in sums.deferred:
            part = sums.parts.pop(id(layer), None)
            if part is None:
                raise RuntimeError("autotp: a fused all-reduce ran before the layer whose partial sum it "
                                   "adds; the block's order differs from the plan (re-plan with "
                                   "fuse_allreduce=False)")
            y = y + part
        y = self.group.all_reduce(y)
        for layer in [*sums.deferred, self]:
            if layer.bias is not None:
                y = y + layer.bias
        return y


class VocabParallelLMHead(PackableLinear, ParallelLayer):
    """Vocabulary rows split: each rank computes its slice of the logits, then an all-gather
    gives every rank the full logits. ``sizes[r]`` is rank r's vocabulary slice."""

    def __init__(self, source: nn.Linear, ranges: Ranges, sizes: list[int], group: TPGroup,
                 weight: nn.Parameter | None = None) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.sizes = sizes
        self.tied = weight is not None  # shares the embedding's rows: stays unpacked
        self.weight = weight if weight is not None else nn.Parameter(
            shard_param(source.weight.data, Style.VOCAB, "weight", ranges), requires_grad=False)
        self.bias = (nn.Parameter(shard_param(source.bias.data, Style.VOCAB, "bias", ranges), requires_grad=False)
                     if source.bias is not None else None)
        self.in_features = source.in_features
        self.out_features = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last_dim(self.matmul(x, self.bias), self.sizes)


class VocabParallelEmbeddingMixin(ParallelLayer):
    """Mixed in front of the model's own embedding class, so that class's forward (scaling,
    say) still runs: tokens outside [vocab_start, vocab_end) look up row 0 and are zeroed,
    then the all-reduce fills every token from the rank that owns it."""

    vocab_start: int
    vocab_end: int

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = super().forward(local_ids)  # type: ignore[misc]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(out)


def pack_layers(model: nn.Module, runtime: Runtime | None = None, release: Release | None = None) -> int:
    """Pack the weights of ``model``'s parallel Linear layers for the native kernels, where
    ``autotp.kernels`` says they run under ``runtime``; an lm_head tied to the embedding stays
    plain (packing it would need a second copy). Layer by layer, so at most one plain weight is
    alive beside the packed ones (``release`` as in ``pack_weight``). Returns how many layers
    were packed."""
    rt = resolve(runtime)
    count = 0
    for module in model.modules():
        if isinstance(module, PackableLinear) and not getattr(module, "tied", False):
            count += module.pack_weight(rt, release)
    return count


def _vocab_parallel_class(cls: type) -> type:
    return type(f"VocabParallel{cls.__name__}", (VocabParallelEmbeddingMixin, cls), {})


def make_vocab_parallel_embedding(module: nn.Embedding, start: int, stop: int, group: TPGroup) -> nn.Embedding:
    """Turn ``module`` in place into its vocab-parallel form holding rows [start, stop)."""
    module.__class__ = _vocab_parallel_class(type(module))
    module.weight = nn.Parameter(shard_param(module.weight.data, Style.VOCAB, "weight", [(start, stop)]),
                                 requires_grad=False)
    module.num_embeddings = stop - start
    module.padding_idx = None  # only steers gradients; a global index means nothing locally
    module.vocab_start, module.vocab_end, module.group = start, stop, group
    return module


class _ShardedReductions(TorchFunctionMode):
    """Inside a sharded norm's forward: a mean or sum over the last dim of a local slice of
    ``local`` features is the all-reduced sum over every rank's slice (divided by ``width``
    for a mean)."""

    def __init__(self, local: int, width: int, group: TPGroup) -> None:
        super().__init__()
        self.local, self.width, self.group = local, width, group

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MEANS or func in _SUMS:
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == self.local and len(dims) == 1 \
                    and isinstance(dims[0], int) and dims[0] % x.dim() == x.dim() - 1:
                keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
                total = self.group.all_reduce(x.sum(-1, keepdim=True).contiguous())
                total = total / self.width if func in _MEANS else total
                return total if keepdim else total.squeeze(-1)
        return func(*args, **kwargs)


_MEANS = {torch.mean, torch.Tensor.mean}
_SUMS = {torch.sum, torch.Tensor.sum}


class ShardedNormMixin(ParallelLayer):
    """Mixed in front of a norm's own class (its forward still runs): the norm sees this rank's
    features of a column-sharded activation, and its reductions over them span every rank's."""

    norm_local: int
    norm_width: int

    def forward(self, *args, **kwargs):  # type: ignore[override]
        with _ShardedReductions(self.norm_local, self.norm_width, self.group):
            return super().forward(*args, **kwargs)  # type: ignore[misc]


def shard_norm(module: nn.Module, ranges: Ranges, width: int, group: TPGroup) -> nn.Module:
    """Turn a norm over a column-sharded activation of ``width`` features into this rank's
    part of it, in place: its 1-D parameters keep the features in ``ranges``."""
    module.__class__ = type(f"Sharded{type(module).__name__}", (ShardedNormMixin, type(module)), {})
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(take(p.data, 0, ranges), requires_grad=False))
    module.norm_local = sum(b - a for a, b in ranges)
    module.norm_width, module.group = width, group
    return module
