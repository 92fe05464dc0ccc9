"""Column-parallel layers that read the same input, multiplied as one GEMM.

A transformer block feeds one activation to several column-parallel layers: the query, key and
value projections, the MLP's gate and up projections (GPT-J: all four of q, k, v and fc_in read
the same norm's output). Each is a GEMM of its own: its own call, its own conversion of the
activations (INT8: to int16 per segment) and its own start and end of a weight stream, which for
a decoding step's small GEMMs (Llama-1B's key and value shards are 2048 x 128) is a fair part of
their time. Measured on a Xeon with AMX (1 thread, one rank's share of a Llama-1B step's GEMMs
from huge pages, 1 row, in one process, alternating): INT8 on AVX512-VNNI 27.8 vs 29.0 ms and
26.1 vs 26.9 (0.96-0.97x), 4 rows 31.4 vs 32.4; bf16 on AMX 0.98-1.00x.

Which layers read the same input is found from the data flow, as the plan is: one forward of the
sharded model over a few tokens records each column-parallel layer's input tensor (the same
object and version: nothing wrote to it between the calls). Layers called once with the same
input, whose packed weights have the same format and input width, become one group of
:class:`Siblings`: their packed tensors are copied, one after another, into one buffer (the
packed layouts hold 64 output columns per leading index, so each layer's part is a slice of it,
its last 64 columns partly padding where its outputs are not a multiple of 64) and each layer's
parameters become views of their slice: no byte is held twice, the state dict
and a layer called alone are unchanged. In a forward the group's first layer multiplies the
whole buffer and each layer returns its columns. Each column's sum is the one its own GEMM
computes (every kernel sums a column over K the same way whatever the other columns), so the
outputs are the same bits.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from autotp import kernels
from autotp.kernels import pages
from autotp.runtime import Runtime
from autotp.sharding.layers import ColumnParallelLinear

log = logging.getLogger(__name__)

_TENSORS = ("weight", "weight_scale", "weight_zero")  # a packed format's tensors, each [groups of 64, ...]
PROBE_TOKENS = 4


class _Whole:
    """The group's tensors as one layer, for its format's matmul (formats.Holder)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features


def _offsets(layers: list[nn.Module]) -> list[int]:
    """Each layer's first output column in the group: the packed layouts hold 64 columns per
    leading index, the last partly padding where a layer's outputs are not a multiple of 64."""
    starts, start = [], 0
    for m in layers:
        starts.append(start)
        start += -(-m.out_features // kernels.GROUP_N) * kernels.GROUP_N
    return starts


def _parts(layers: list[nn.Module]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of each of the group's buffers: the packed tensors one after another
    along dim 0, then the biases (where any layer has one) at each layer's offset."""
    first = layers[0]
    parts = [(name, (sum(getattr(m, name).shape[0] for m in layers), *getattr(first, name).shape[1:]),
              getattr(first, name).dtype) for name in _TENSORS if getattr(first, name, None) is not None]
    biases = [m.bias for m in layers if m.bias is not None]
    if biases:
        parts.append(("bias", (_offsets(layers)[-1] + layers[-1].out_features,), biases[0].dtype))
    return parts


class Siblings:
    """Column-parallel layers that read one input, in the order they are called (``called``),
    their tensors laid out one after another in that order in ``arena``, each layer's
    parameters views of its part. ``output`` is each member's forward."""

    def __init__(self, called: list[nn.Module], arena: pages.Arena) -> None:
        self.called = called
        starts = _offsets(called)
        self.columns = {id(m): (start, m.out_features) for m, start in zip(called, starts)}
        self.format = called[0].weight_format
        self.whole = _Whole(called[0].in_features, starts[-1] + called[-1].out_features)
        self.whole.bias = None
        for name, shape, dtype in _parts(called):
            whole = arena.take(shape, dtype)
            if name == "bias":  # zeros where a layer has none, and in the padding (the same sums: only -0 becomes +0)
                whole.zero_()
            row = 0
            for m, start in zip(called, starts):
                t = getattr(m, name)
                if t is not None:
                    part = whole[start:start + m.out_features] if name == "bias" else whole[row:row + t.shape[0]]
                    part.copy_(t)
                    setattr(m, name, nn.Parameter(part, requires_grad=False))  # the old tensor goes
                    row += t.shape[0]
            setattr(self.whole, name, whole)
        for i, m in enumerate(called):
            m.siblings, m.sibling_index = self, i
        self._held = [(m, name, getattr(m, name)) for m in called for name in (*_TENSORS, "bias")
                      if getattr(m, name, None) is not None]
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s forward: the first member called multiplies the whole group and keeps the
        others' columns for them; a later member given the same input (the same tensor, not
        written since) takes its columns, any other call multiplies its own weights."""
        i = layer.sibling_index
        if i == 0:
            if not torch.compiler.is_compiling() and any(getattr(m, name) is not p for m, name, p in self._held):
                self.dissolve()  # a layer's tensor was replaced (load_state_dict(assign=True), say): the buffer is stale
                return layer.matmul(x, layer.bias)
            y = self.format.matmul(self.whole, x, self.whole.bias)
            outputs = tuple(y.narrow(-1, *self.columns[id(m)]).contiguous() for m in self.called)
            self._x, self._outputs = x, outputs
            if not torch.compiler.is_compiling():
                self._version = x._version
            return outputs[0]
        if self._x is x and (torch.compiler.is_compiling() or x._version == self._version):
            out = self._outputs[i]
            if i == len(self.called) - 1:  # the last one: nothing left to hold
                self._x, self._outputs = None, ()
            return out
        return layer.matmul(x, layer.bias)

    def tensors(self) -> list[torch.Tensor]:
        """The group's own tensors (its members' parameters are views of them)."""
        return [t for t in vars(self.whole).values() if isinstance(t, torch.Tensor)]

    def dissolve(self) -> None:
        """Each layer alone again (its tensors stay where they are)."""
        for m in self.called:
            m.siblings, m.sibling_index = None, 0
        self._x, self._outputs = None, ()


def _mergeable(m: nn.Module) -> bool:
    fmt = getattr(m, "weight_format", None)
    return fmt is not None and fmt.packed and getattr(m, "siblings", None) is None


def find_siblings(model: nn.Module) -> list[list[nn.Module]]:
    """Groups of column-parallel layers (in the order a forward calls them) that read the same
    input tensor, unchanged, once each per forward, with packed weights of one format and input
    width: from one forward over PROBE_TOKENS tokens (every rank at once: it runs the model's
    collectives). None found where that forward fails."""
    calls: list[tuple[nn.Module, torch.Tensor, int]] = []

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            calls.append((module, args[0], args[0]._version))

    layers = [m for m in model.modules() if isinstance(m, ColumnParallelLinear) and _mergeable(m)]
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(1, PROBE_TOKENS + 1).clamp(max=vocab - 1)[None]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as exc:  # a model whose forward needs more than ids: no merging
        log.info("autotp: no sibling layers merged (%s: %s)", type(exc).__name__, exc)
        return []
    finally:
        for h in hooks:
            h.remove()
    times: dict[int, int] = {}
    for m, _, _ in calls:
        times[id(m)] = times.get(id(m), 0) + 1
    groups: dict[tuple[Any, ...], list[nn.Module]] = {}
    for m, x, version in calls:
        if times[id(m)] == 1:
            key = (id(x), version, m.weight_format, m.in_features, m.weight.dtype,
                   x.dtype if m.bias is None else m.bias.dtype)  # (a layer without a bias adds zeros)
            groups.setdefault(key, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def merge_siblings(model: nn.Module, runtime: Runtime) -> int:
    """Merge each group :func:`find_siblings` finds into one :class:`Siblings`, all groups'
    tensors in one arena (on huge pages with ``runtime.huge_pages``). Returns the layers merged."""
    groups = find_siblings(model)
    if not groups:
        return 0
    nbytes = sum(pages.Arena.span(torch.Size(shape).numel() * dtype.itemsize)
                 for g in groups for _, shape, dtype in _parts(g))
    arena = pages.Arena.new(nbytes, runtime.huge_pages)
    for called in groups:
        Siblings(called, arena)
    return sum(len(g) for g in groups)
