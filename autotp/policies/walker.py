"""The graph walker: classifies every Linear from the data flow of one real forward.

The model runs once on a tiny input under a TorchFunctionMode that labels each tensor either
replicated (no label) or column-sharded (a label naming the column-parallel layers it came
from). A Linear reading a replicated tensor is column-parallel and its output is sharded; a
Linear reading a sharded tensor is row-parallel, its output is summed by an all-reduce and is
replicated again. Any other op passes the labels of its inputs on to its outputs. Shapes seen
along the way tell how a column layer's output is cut into heads (a view [.., D] -> [.., n, D/n]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from autotp.plan import Style

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
# ops that combine values across a dim: over the whole sharded width they need every rank's part
_REDUCTIONS = {
    torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.var, torch.Tensor.var,
    torch.std, torch.Tensor.std, torch.norm, torch.Tensor.norm, torch.linalg.vector_norm,
    torch.amax, torch.Tensor.amax, torch.logsumexp, torch.Tensor.logsumexp, torch.softmax,
    torch.Tensor.softmax, F.softmax, F.normalize,
}
_NORMS = {F.layer_norm, F.rms_norm, F.group_norm}
# ops through which a partial sum stays a partial sum: sums (with replicated tensors too) and
# dropout, an identity at inference
_SUMS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}
_IDENTITIES = {F.dropout}


@dataclass
class Trace:
    """What one forward showed about each Linear."""

    styles: dict[str, Style] = field(default_factory=dict)
    row_sources: dict[str, set[str]] = field(default_factory=dict)  # row layer -> columns feeding it
    heads: dict[str, int] = field(default_factory=dict)             # column layer -> heads in its output
    escaped: dict[str, str] = field(default_factory=dict)           # column layer -> why it cannot stay sharded
    conflicts: dict[str, str] = field(default_factory=dict)         # Linear -> why it has no single style
    row_order: list[str] = field(default_factory=list)              # row layers in order of first call
    reductions: list[frozenset[str]] = field(default_factory=list)  # row layers whose partial sums meet
                                                                    # before the first op that needs the total


class _Labeler(TorchFunctionMode):
    def __init__(self, linears: dict[int, str], out_features: dict[str, int],
                 forced: dict[str, Style], vocab_head: str | None, trace: Trace) -> None:
        super().__init__()
        self.linears, self.out_features, self.forced = linears, out_features, forced
        self.vocab_head, self.trace = vocab_head, trace
        self.labels: dict[int, frozenset[str]] = {}
        self.pending: dict[int, frozenset[str]] = {}  # tensor -> row layers whose unreduced sums it holds
        self.alive: list[torch.Tensor] = []  # keeps labelled tensors alive so ids stay unique

    def label(self, t: Any) -> frozenset[str] | None:
        return self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_label(self, t: torch.Tensor, sources: frozenset[str]) -> None:
        self.labels[id(t)] = self.labels.get(id(t), frozenset()) | sources
        self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.pending and self._carry_partial_sums(func, args, kwargs, out):
            return out
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func in _LINEAR_FUNCS and id(weight) in self.linears:
            x = args[0] if args else kwargs["input"]
            self._linear(self.linears[id(weight)], self.label(x), out)
        elif func is torch.Tensor.__setitem__:
            src = self.label(args[2]) if len(args) > 2 else None
            if src:
                self.set_label(args[0], src)
        else:
            self._propagate(func, args, kwargs, out)
        return out

    def _linear(self, name: str, sources: frozenset[str] | None, out: torch.Tensor) -> None:
        style = self.forced.get(name)
        if name == self.vocab_head and style is None:
            style = Style.VOCAB
        if style in (Style.REPLICATE, Style.VOCAB):
            if sources:
                for s in sources:
                    self.trace.escaped.setdefault(s, f"its sharded output is read by '{name}', which is {style.value}")
            self.trace.styles.setdefault(name, style)
            return
        if style is None:
            style = Style.ROW if sources else Style.COLUMN
        seen = self.trace.styles.setdefault(name, style)
        if seen != style:
            self.trace.conflicts[name] = f"it is called both as {seen.value} and as {style.value}"
        if style == Style.COLUMN:
            self.set_label(out, frozenset({name}))
        else:
            self.trace.row_sources.setdefault(name, set()).update(sources or ())
            if name not in self.trace.row_order:
                self.trace.row_order.append(name)
            self.pending[id(out)] = frozenset({name})
            self.alive.append(out)

    def _carry_partial_sums(self, func, args: tuple, kwargs: dict, out: Any) -> bool:
        """Sums keep partial sums pending; any other op reading one is where the total is
        needed: record which row layers' sums meet there, and from then on the tensor counts
        as reduced (replicated). Returns True when ``out`` was labelled here."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        pending = [t for t in inputs if id(t) in self.pending]
        if not pending:
            return False
        rows = frozenset().union(*(self.pending[id(t)] for t in pending))
        plain_sum = (func in _SUMS and kwargs.get("alpha", 1) == 1) or func in _IDENTITIES
        if plain_sum and not any(id(t) in self.labels for t in inputs) and isinstance(out, torch.Tensor):
            self.pending[id(out)] = rows
            self.alive.append(out)
            return True
        self.trace.reductions.append(rows)
        for t in pending:
            del self.pending[id(t)]
        return False

    def _check_reduction(self, func, args: tuple, kwargs: dict) -> None:
        """A norm or reduction over the last dim of a column layer's un-split output needs the
        whole width: that layer cannot stay sharded."""
        if func not in _REDUCTIONS and func not in _NORMS or not args or id(args[0]) not in self.labels:
            return
        x = args[0]
        if func in _REDUCTIONS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
            dims = range(x.dim()) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
            if not any(isinstance(d, int) and d % max(x.dim(), 1) == x.dim() - 1 for d in dims):
                return
        for name in self.labels[id(x)]:
            if self.out_features.get(name) == x.shape[-1]:
                why = f"its sharded output is reduced across its whole width by {getattr(func, '__name__', func)}"
                self.trace.escaped.setdefault(name, why)

    def _propagate(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sharded = [t for t in inputs if id(t) in self.labels]
        if not sharded:
            return
        sources = frozenset().union(*(self.labels[id(t)] for t in sharded))
        self._check_reduction(func, args, kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outputs:
            self.set_label(t, sources)
        if len(sharded) == 1:
            for t in outputs:
                self._note_heads(sharded[0], t)

    def _note_heads(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """[.., D] viewed as [.., n, ...] with the trailing dims multiplying to D: n heads."""
        d, nd = src.shape[-1] if src.dim() else 0, src.dim()
        if out.dim() <= nd or tuple(out.shape[: nd - 1]) != tuple(src.shape[:-1]):
            return
        if math.prod(out.shape[nd - 1:]) != d:
            return
        for name in self.labels[id(src)]:
            if self.out_features.get(name) == d and name not in self.trace.heads:
                self.trace.heads[name] = int(out.shape[nd - 1])


def sample_inputs(model: nn.Module, seq_len: int = 6) -> dict[str, torch.Tensor]:
    """A tiny, fixed batch for the trace: batch 1, ``seq_len`` tokens inside the vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(1, min(vocab, 1000)), (1, seq_len), generator=gen)
    device = next(model.parameters()).device
    if device.type == "meta":  # mask code reads the mask's values, which meta tensors lack
        return {"input_ids": ids.to(device)}
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def walk(model: nn.Module, forced: dict[str, Style], vocab_head: str | None) -> Trace:
    """Run one forward and classify every Linear that it calls."""
    linears = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out_features = {name: m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    trace = Trace()
    labeler = _Labeler(linears, out_features, forced, vocab_head, trace)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), labeler:
            result = model(**sample_inputs(model), use_cache=False)
    finally:
        model.train(was_training)
    for t in _leaves(result):
        if id(t) in labeler.pending:
            trace.reductions.append(labeler.pending.pop(id(t)))
        for name in labeler.label(t) or ():
            trace.escaped.setdefault(name, "its sharded output reaches the model's output")
    fed = set().union(*trace.row_sources.values()) if trace.row_sources else set()
    for name, style in trace.styles.items():
        if style == Style.COLUMN and name not in fed and name not in forced:
            trace.escaped.setdefault(name, "its sharded output is never read by a row-parallel layer")
    return trace


def _leaves(result: Any) -> Iterator[torch.Tensor]:
    values = result.values() if hasattr(result, "values") else result
    return (t for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor))
