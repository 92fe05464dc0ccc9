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

import functools
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from autotp import kernels
from autotp.comm import TPGroup
from autotp.plan import Ranges

if TYPE_CHECKING:
    from autotp.sharding.quantize import Int8Shard


def take(tensor: torch.Tensor, dim: int, ranges: Ranges, copy: bool = True) -> torch.Tensor:
    """Concatenate the [start, stop) blocks of ``tensor`` along ``dim`` into a new tensor (so the
    rest can be freed); with ``copy=False`` a single block is returned as a view instead."""
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in ranges]
    if len(parts) == 1:
        return parts[0].clone().contiguous() if copy else parts[0]
    return torch.cat(parts, dim=dim).contiguous()


class ParallelLayer:
    """Marker base of every module autotp creates; a model holding one is already sharded."""

    group: TPGroup


class PackableLinear(nn.Linear):
    """A Linear whose weight may be swapped for the native kernels' packed layout.

    After ``pack_weight`` the ``weight`` parameter holds [ceil(out/16), ceil(in/2), 32] bf16
    (one copy: the plain weight is dropped); ``unpacked_weight()`` gives the [out, in] view back.
    """

    packed: bool = False
    quant_group: int = 0  # input columns per INT8 scale; 0 while the weight is not INT8
    quant_offset: int = 0  # the first local column's place in its group (row-parallel shards)

    def set_int8(self, shard: "Int8Shard") -> None:
        """Hold the INT8 ``shard`` (autotp.sharding.quantize) in place of the weight: ``weight``
        becomes the int8 values and ``weight_scale`` their fp32 scales, plain until
        ``pack_weight`` packs them for the native INT8 GEMM where it runs (``AUTOTP_KERNELS``);
        unpacked, the torch path dequantises and multiplies in fp32 (the spec the kernel meets)."""
        self.weight = nn.Parameter(shard.q, requires_grad=False)
        self.weight_scale = nn.Parameter(shard.scales, requires_grad=False)
        self.packed, self.quant_group, self.quant_offset = False, shard.group_size, shard.group_offset

    def int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q [out_features, in_features] int8, scales [out_features, groups] fp32) of an INT8 layer."""
        if not self.quant_group:
            raise ValueError(f"autotp: this {type(self).__name__} holds {self.weight.dtype} weights, not INT8")
        if self.packed:
            return kernels.unpack_int8(self.weight, self.weight_scale, self.out_features)
        return self.weight, self.weight_scale

    def pack_weight(self, release: Callable[[torch.Tensor], None] | None = None) -> bool:
        """Pack the weight for the native GEMM if ``autotp.kernels`` says it runs here for this
        dtype (int8 for an INT8 layer); returns whether the layer is now packed. ``release`` is
        given the plain weight once it has been copied (to hand back the pages of a
        memory-mapped checkpoint)."""
        if self.packed or not kernels.native_enabled(torch.int8 if self.quant_group else self.weight.dtype):
            return self.packed
        plain = self.weight.data
        if self.quant_group:
            scales = self.weight_scale.data
            packed, packed_scales = kernels.prepack_int8(plain, scales)
            self.weight_scale = nn.Parameter(packed_scales, requires_grad=False)
            if release is not None:
                release(plain)
                release(scales)
        elif release is None:
            packed = kernels.prepack(plain)
        else:  # groups of 64 rows pack independently: a few MiB at a time, handed back at once
            packed = torch.empty(kernels.packed_shape(*plain.shape), dtype=plain.dtype)
            step = kernels.GROUP_N * max(1, (8 << 20) // (kernels.GROUP_N * plain[0].nbytes))
            for start in range(0, plain.shape[0], step):
                rows = plain[start:start + step]
                packed[start // kernels.GROUP_N:][:kernels.packed_shape(*rows.shape)[0]] = kernels.prepack(rows)
                release(rows)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed = True
        return True

    def unpacked_weight(self) -> torch.Tensor:
        """The [out_features, in_features] weight, unpacked if need be (a new tensor then); an
        INT8 layer's dequantised, in float32."""
        if self.quant_group:
            q, scales = self.int8_parts()
            return kernels.dequantize_int8(q, scales, self.quant_group, self.quant_offset)
        if self.packed:
            return kernels.unpack(self.weight, self.out_features, self.in_features)
        return self.weight

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_group and self.packed:
            return kernels.linear_int8(x, self.weight, self.weight_scale, bias, self.out_features, self.quant_group,
                                       self.quant_offset)
        if self.quant_group:
            y = F.linear(x.float(), self.unpacked_weight(), None if bias is None else bias.float())
            return y.to(x.dtype)
        if self.packed:
            return kernels.linear(x, self.weight, bias, self.out_features)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(PackableLinear, ParallelLayer):
    """Output features split: Y_r = X A_r^T + b_r. The output is this rank's slice."""

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup, copy: bool = True) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.weight = nn.Parameter(take(source.weight.data, 0, ranges, copy), requires_grad=False)
        self.bias = (nn.Parameter(take(source.bias.data, 0, ranges, copy), requires_grad=False)
                     if source.bias is not None else None)
        self.in_features = source.in_features
        self.out_features = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowParallelLinear(PackableLinear, ParallelLayer):
    """Input features split: Y = all_reduce(X_r A_r^T) + b. ``x`` is this rank's slice.

    With ``partial_sums`` the layer is one of several whose outputs are only ever added
    together (parallel attention and MLP): a ``defer`` layer leaves its X_r A_r^T there and
    returns zeros; the last layer adds those to its own, all-reduces once, and adds every
    member's bias once: Y_a + Y_b = all_reduce(X_a A_a^T + X_b A_b^T) + b_a + b_b.
    """

    def __init__(self, source: nn.Linear, ranges: Ranges, group: TPGroup,
                 partial_sums: "PartialSums | None" = None, defer: bool = False, copy: bool = True) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.weight = nn.Parameter(take(source.weight.data, 1, ranges, copy), requires_grad=False)
        self.bias = (nn.Parameter(source.bias.data.clone() if copy else source.bias.data, requires_grad=False)
                     if source.bias is not None else None)
        self.in_features = self.weight.shape[1]
        self.out_features = source.out_features
        self.partial_sums, self.defer = partial_sums, defer
        if partial_sums is not None and defer:
            partial_sums.deferred.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        sums = self.partial_sums
        if sums is None:
            y = self.group.all_reduce(y)
            return y + self.bias if self.bias is not None else y
        if self.defer:
            sums.parts[id(self)] = y
            return torch.zeros_like(y)
        for layer in sums.deferred:
            part = sums.parts.pop(id(layer), None)
            if part is None:
                raise RuntimeError("autotp: a fused all-reduce ran before the layer whose partial sum it "
                                   "adds; the block's order differs from the plan (re-plan with "
                                   "fuse_allreduce=False)")
            y = y + part
        y = self.group.all_reduce(y)
        for layer in sums.deferred + [self]:
            if layer.bias is not None:
                y = y + layer.bias
        return y


class PartialSums:
    """What the row layers of one fused all-reduce share: the deferred layers and, during a
    forward, their unreduced outputs."""

    def __init__(self) -> None:
        self.deferred: list[RowParallelLinear] = []
        self.parts: dict[int, torch.Tensor] = {}


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
            take(source.weight.data, 0, ranges), requires_grad=False)
        self.bias = (nn.Parameter(take(source.bias.data, 0, ranges), requires_grad=False)
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


def pack_layers(model: nn.Module, release: Callable[[torch.Tensor], None] | None = None) -> int:
    """Pack the weights of ``model``'s parallel Linear layers for the native kernels, where
    ``autotp.kernels`` says they run; an lm_head tied to the embedding stays plain (packing it
    would need a second copy). Layer by layer, so at most one plain weight is alive beside the
    packed ones (``release`` as in ``pack_weight``). Returns how many layers were packed."""
    count = 0
    for module in model.modules():
        if isinstance(module, PackableLinear) and not getattr(module, "tied", False):
            count += module.pack_weight(release)
    return count


@functools.cache
def _vocab_parallel_class(cls: type) -> type:
    return type(f"VocabParallel{cls.__name__}", (VocabParallelEmbeddingMixin, cls), {})


def make_vocab_parallel_embedding(module: nn.Embedding, start: int, stop: int, group: TPGroup) -> nn.Embedding:
    """Turn ``module`` in place into its vocab-parallel form holding rows [start, stop)."""
    module.__class__ = _vocab_parallel_class(type(module))
    module.weight = nn.Parameter(module.weight.data[start:stop].clone(), requires_grad=False)
    module.num_embeddings = stop - start
    module.padding_idx = None  # only steers gradients; a global index means nothing locally
    module.vocab_start, module.vocab_end, module.group = start, stop, group
    return module
