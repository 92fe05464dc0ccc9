"""The graph walker: classifies every weight from the data flow of one real forward.

The model runs once on a tiny input under a TorchFunctionMode that labels each tensor either
replicated (no label) or column-sharded (a label naming the sources it came from). A *unit* is a
weight that some operation multiplies an activation by: ``F.linear``, ``addmm`` / ``mm`` /
``matmul`` / ``@`` (GPT-2's Conv1D, Falcon's Linear), or a grouped / per-expert matmul of a 3-D
expert tensor (``w[e]``, ``w.transpose(-2, -1)``); the walker follows views of every parameter
to tell which of its dims holds the inputs and which the outputs. The module class does not
matter, the operation does.

A unit reading a replicated tensor is column-parallel and its output is sharded; a unit reading
a sharded tensor is row-parallel, its output is a partial sum that an all-reduce makes
replicated again. Any other op passes the labels of its inputs on to its outputs.

Shapes tell the rest. A column output viewed as [.., n, D/n] has n heads. A column output cut
along its features (slice, split, chunk, narrow) into parts that flow to different places has
*segments* (q | k | v, gate | up): each segment is a source of its own, split on its own, and
the unit keeps the concatenation of its segments' local rows.
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

# an activation times a weight: (function, which argument is the activation, which the weight,
# whether the weight operand is [.., out, in] (F.linear) rather than [.., in, out])
_MATMULS: dict[Any, tuple[int, int, bool]] = {
    F.linear: (0, 1, True), torch._C._nn.linear: (0, 1, True),
    torch.addmm: (1, 2, False), torch.Tensor.addmm: (1, 2, False),
    torch.mm: (0, 1, False), torch.Tensor.mm: (0, 1, False),
    torch.matmul: (0, 1, False), torch.Tensor.matmul: (0, 1, False), torch.Tensor.__matmul__: (0, 1, False),
    torch.bmm: (0, 1, False), torch.Tensor.bmm: (0, 1, False),
}
for _name in ("grouped_mm",):
    if hasattr(F, _name):
        _MATMULS[getattr(F, _name)] = (0, 1, False)
if hasattr(torch, "_grouped_mm"):
    _MATMULS[torch._grouped_mm] = (0, 1, False)

# ops that only rename a weight's dims: a view of the parameter, used as an operand later
_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute}
_T_PROPERTIES = {torch.Tensor.T.__get__: "T", torch.Tensor.mT.__get__: "mT"}
_SAME_WEIGHT = {torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as}

# ops that combine values across a dim: over the whole sharded width they need every rank's part
_REDUCTIONS = {
    torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.var, torch.Tensor.var,
    torch.std, torch.Tensor.std, torch.norm, torch.Tensor.norm, torch.linalg.vector_norm,
    torch.amax, torch.Tensor.amax, torch.logsumexp, torch.Tensor.logsumexp, torch.softmax,
    torch.Tensor.softmax, F.softmax, F.normalize, torch.topk, torch.Tensor.topk, torch.max, torch.Tensor.max,
    torch.argmax, torch.Tensor.argmax, torch.sort, torch.Tensor.sort,
}
_NORMS = {F.layer_norm, F.rms_norm, F.group_norm}
_CHOICES = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.topk, torch.Tensor.topk, torch.max, torch.Tensor.max,
            torch.argmax, torch.Tensor.argmax, torch.sort, torch.Tensor.sort}
# reductions a sharded norm computes as a partial sum and one all-reduce
_SPLITTABLE_REDUCTIONS = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum}
# ops through which a partial sum stays a partial sum: sums (with replicated tensors too) and
# dropout, an identity at inference
_SUMS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}
_IDENTITIES = {F.dropout}
# ops linear in one partial-sum operand (the others replicated): an expert block's combine
# (routing weights, reordering, summing over the top-k) keeps its down projection's partial sums
_SCALES = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
           torch.Tensor.__imul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__}
_MOVES = {torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute,
          torch.Tensor.transpose, torch.transpose, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
          torch.Tensor.type_as, torch.index_select, torch.Tensor.index_select, torch.Tensor.squeeze,
          torch.Tensor.unsqueeze, torch.squeeze, torch.unsqueeze, torch.Tensor.flatten, torch.flatten,
          torch.Tensor.unflatten, torch.sum, torch.Tensor.sum, torch.Tensor.clone, torch.clone}
_INDEX_ADDS = {torch.Tensor.index_add_, torch.Tensor.index_add, torch.index_add}
# reshapes: the trailing features keep their order
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten,
             torch.Tensor.flatten, torch.flatten, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze,
             torch.squeeze, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.to,
             torch.Tensor.float, torch.Tensor.type_as}
# cuts along one dim into consecutive parts
_CUTS = {torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.narrow, torch.narrow,
         torch.Tensor.tensor_split, torch.tensor_split, torch.Tensor.unbind, torch.unbind}


@dataclass(frozen=True)
class Unit:
    """A weight used as a matmul operand. ``name`` is the module when the parameter is a
    module's 2-D ``weight`` and the module computes a linear map of its input (nn.Linear,
    Conv1D, a Linear subclass), else the parameter's full name (expert tensors)."""

    name: str
    param: str           # the parameter's full name
    out_dim: int         # the parameter dim holding output features
    in_dim: int          # the parameter dim holding input features
    out_features: int
    in_features: int
    module_level: bool

    @property
    def transposed(self) -> bool:
        """A module-level 2-D weight stored [in, out] (Conv1D)."""
        return self.module_level and self.out_dim == 1


@dataclass
class Trace:
    """What one forward showed about each unit and each source (a unit or a segment of one)."""

    units: dict[str, Unit] = field(default_factory=dict)
    styles: dict[str, Style] = field(default_factory=dict)
    row_sources: dict[str, set[str]] = field(default_factory=dict)  # row unit -> sources feeding it
    heads: dict[str, int] = field(default_factory=dict)             # source -> heads in its output
    widths: dict[str, int] = field(default_factory=dict)            # source -> features
    escaped: dict[str, str] = field(default_factory=dict)           # unit -> why it cannot stay sharded
    conflicts: dict[str, str] = field(default_factory=dict)         # unit -> why it has no single style
    norms: dict[str, str] = field(default_factory=dict)             # norm module -> the source it normalises
    routers: set[str] = field(default_factory=set)                  # units whose whole output feeds a softmax
                                                                    # or top-k: a choice among outputs
    row_order: list[str] = field(default_factory=list)              # row units in order of first call
    reductions: list[frozenset[str]] = field(default_factory=list)  # row units whose partial sums meet
                                                                    # before the first op that needs the total


def segment_name(unit: str, start: int, stop: int) -> str:
    return f"{unit}[{start}:{stop}]"


def parse_source(source: str) -> tuple[str, int | None, int | None]:
    """'unit[a:b]' -> (unit, a, b); a whole unit -> (unit, None, None)."""
    if source.endswith("]") and "[" in source:
        unit, _, span = source[:-1].rpartition("[")
        a, b = span.split(":")
        return unit, int(a), int(b)
    return source, None, None


@dataclass(frozen=True)
class _WeightView:
    param: str
    dims: tuple[int, ...]  # view dim i is parameter dim dims[i]


class _Labeler(TorchFunctionMode):
    def __init__(self, params: dict[int, tuple[str, torch.Tensor]], by_name: dict[str, torch.Tensor],
                 module_weights: dict[str, str], forced: dict[str, Style], vocab_head: str | None,
                 trace: Trace) -> None:
        super().__init__()
        self.params_by_name = by_name
        self.module_weights = module_weights  # a module's 2-D weight (full name) -> the module
        self.forced, self.vocab_head, self.trace = forced, vocab_head, trace
        self.weights: dict[int, _WeightView] = {i: _WeightView(n, tuple(range(p.dim()))) for i, (n, p) in params.items()}
        self.labels: dict[int, frozenset[str]] = {}
        self.views: dict[int, tuple[str, tuple[int, ...]]] = {}  # tensor -> (source, trailing dims holding its features)
        self.pending: dict[int, frozenset[str]] = {}   # tensor -> row units whose unreduced sums it holds
        self.partial: dict[int, frozenset[str]] = {}   # tensor -> parameter-level row units' partial sums
        self.not_linear: set[str] = set()              # modules whose output is not x W^T (+ b)
        self.stack: list[tuple[str, nn.Module]] = []   # the modules running, innermost last
        self.alive: list[torch.Tensor] = []  # keeps labelled tensors alive so ids stay unique

    def label(self, t: Any) -> frozenset[str] | None:
        return self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_label(self, t: torch.Tensor, sources: frozenset[str]) -> None:
        self.labels[id(t)] = self.labels.get(id(t), frozenset()) | sources
        self.alive.append(t)

    # -- dispatch ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._track_weight_view(func, args, kwargs, out):
            return out
        use = self._matmul(func, args, kwargs)
        if use is not None:
            x, view, w_is_out_in = use
            self._unit(view, w_is_out_in, x, out)
            return out
        if self.partial and self._carry_partials(func, args, kwargs, out):
            return out
        if self.pending and self._carry_partial_sums(func, args, kwargs, out):
            return out
        if func is torch.Tensor.__setitem__:
            src = self.label(args[2]) if len(args) > 2 else None
            if src:
                self.set_label(args[0], src)
        else:
            self._propagate(func, args, kwargs, out)
        return out

    # -- weights -------------------------------------------------------------------------
    def _track_weight_view(self, func, args: tuple, kwargs: dict, out: Any) -> bool:
        """A view of a parameter (transposed, one expert picked, cast) is the same weight with
        its dims renamed; returns True when ``out`` is one."""
        if not args or not isinstance(args[0], torch.Tensor) or id(args[0]) not in self.weights \
                or not isinstance(out, torch.Tensor):
            return False
        view = self.weights[id(args[0])]
        dims = list(view.dims)
        name = _T_PROPERTIES.get(func, "")
        if func in _TRANSPOSES or name:
            if name == "T" or func in (torch.Tensor.t, torch.t):
                dims = dims[::-1]
            elif name == "mT":
                dims[-2], dims[-1] = dims[-1], dims[-2]
            elif func in (torch.Tensor.permute,):
                order = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
                dims = [dims[d] for d in order]
            else:
                a, b = (args[1], args[2]) if len(args) > 2 else (kwargs.get("dim0"), kwargs.get("dim1"))
                a, b = a % len(dims), b % len(dims)
                dims[a], dims[b] = dims[b], dims[a]
        elif func in _SAME_WEIGHT:
            pass
        elif func is torch.Tensor.__getitem__ and _picks_first(args[1]):
            dims = dims[1:]  # one expert: its matrix
        else:
            return False
        if len(dims) != out.dim():
            return False
        self.weights[id(out)] = _WeightView(view.param, tuple(dims))
        self.alive.append(out)
        return True

    def _matmul(self, func, args: tuple, kwargs: dict):
        """(activation, weight view, whether the weight operand is [out, in]) when ``func``
        multiplies an activation by a tracked weight, else None."""
        spec = _MATMULS.get(func)
        if spec is None:
            return None
        xi, wi, out_in = spec
        keys = {0: "input", 1: "weight"} if func in (F.linear, torch._C._nn.linear) else {}
        x = args[xi] if len(args) > xi else kwargs.get(keys.get(xi, "mat1" if xi == 1 else "input"))
        w = args[wi] if len(args) > wi else kwargs.get(keys.get(wi, "mat2" if wi == 2 else "other"))
        if not isinstance(w, torch.Tensor) or id(w) not in self.weights or not isinstance(x, torch.Tensor):
            return None
        return x, self.weights[id(w)], out_in

    def _unit(self, view: _WeightView, out_in: bool, x: torch.Tensor, out: torch.Tensor) -> None:
        pname = view.param
        p = self.params_by_name[pname]
        out_dim, in_dim = (view.dims[-2], view.dims[-1]) if out_in else (view.dims[-1], view.dims[-2])
        module = self.module_weights.get(pname)
        module_level = module is not None and module not in self.not_linear
        name = module if module_level else pname
        unit = Unit(name, pname, out_dim, in_dim, p.shape[out_dim], p.shape[in_dim], module_level)
        self.trace.units.setdefault(name, unit)
        self.trace.widths.setdefault(name, unit.out_features)
        self._classify(name, self.label(x), out, module_level)

    def _classify(self, name: str, sources: frozenset[str] | None, out: torch.Tensor, module_level: bool) -> None:
        style = self.forced.get(name)
        if name == self.vocab_head and style is None:
            style = Style.VOCAB
        if style in (Style.REPLICATE, Style.VOCAB):
            if sources:
                for s in sources:
                    self.trace.escaped.setdefault(parse_source(s)[0],
                                                  f"its sharded output is read by '{name}', which is {style.value}")
            self.trace.styles.setdefault(name, style)
            return
        if style is None:
            style = Style.ROW if sources else Style.COLUMN
        seen = self.trace.styles.setdefault(name, style)
        if seen != style:
            self.trace.conflicts[name] = f"it is called both as {seen.value} and as {style.value}"
        if style == Style.COLUMN:
            self.set_label(out, frozenset({name}))
            self.views[id(out)] = (name, (out.shape[-1],))
            return
        self.trace.row_sources.setdefault(name, set()).update(sources or ())
        if name not in self.trace.row_order:
            self.trace.row_order.append(name)
        if module_level:
            self.pending[id(out)] = frozenset({name})
        else:
            self.partial[id(out)] = frozenset({name})
        self.alive.append(out)

    # -- partial sums --------------------------------------------------------------------
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

    def _carry_partials(self, func, args: tuple, kwargs: dict, out: Any) -> bool:
        """The partial sums of parameter-level row units (an expert block's down projection)
        are reduced where the module owning the weight returns them; until then they may only
        go through ops linear in them. Another op records why the unit cannot stay sharded."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        held = [t for t in inputs if id(t) in self.partial]
        if not held:
            return False
        rows = frozenset().union(*(self.partial[id(t)] for t in held))
        others = [t for t in inputs if id(t) not in self.partial]
        linear = (
            (func in _MOVES and id(inputs[0]) in self.partial)
            or (func in _SCALES and len(held) == 1 and len(inputs) <= 2)
            or (func in _SUMS and not others)
            or (func in _INDEX_ADDS and held and held[-1] is inputs[-1])
        )
        if linear and not any(id(t) in self.labels for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.partial[id(t)] = rows
                    self.alive.append(t)
            return True
        why = f"its partial sums meet {getattr(func, '__name__', func)} before the block that owns it returns"
        for row in rows:
            self.trace.escaped.setdefault(row, why)
        for t in held:
            self.partial.pop(id(t), None)
        return False

    def module_output(self, module: str, rows: frozenset[str], output: Any) -> None:
        """Forward hook of a module owning parameter-level row units: its output is where their
        all-reduce goes, so it must hold exactly their partial sums."""
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        held = [t for t in outputs if id(t) in self.partial]
        if not held:
            for row in rows:
                if row in self.trace.styles and self.trace.styles[row] == Style.ROW:
                    self.trace.escaped.setdefault(row, f"its partial sums do not reach the output of '{module}'")
            return
        for t in held:
            self.partial.pop(id(t))

    # -- labels --------------------------------------------------------------------------
    def _escapes(self, func, args: tuple, kwargs: dict, out: Any, sources: frozenset[str]) -> frozenset[str]:
        """Sources whose sharding this op breaks: a norm or reduction over the last dim of a
        source's whole width (unless it happens inside a norm module whose weights can be
        split with it: a sharded norm), or a one-feature source broadcast across a wider dim.
        Their labels stop here, so what follows is traced as it will run once they are
        replicated."""
        broken = set()
        x = args[0] if args else None
        if (func in _REDUCTIONS or func in _NORMS) and isinstance(x, torch.Tensor) and id(x) in self.labels:
            dim = None
            if func in _REDUCTIONS:
                dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
                if func in (torch.topk, torch.Tensor.topk):
                    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            dims = range(x.dim()) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
            if func in _NORMS or any(isinstance(d, int) and d % max(x.dim(), 1) == x.dim() - 1 for d in dims):
                for name in self.labels[id(x)]:
                    if self.trace.widths.get(name) != x.shape[-1]:
                        continue
                    norm = self._norm_module(name) if func in _SPLITTABLE_REDUCTIONS else None
                    if norm is not None:
                        self.trace.norms[norm] = name
                        continue
                    why = f"its sharded output is reduced across its whole width by {getattr(func, '__name__', func)}"
                    self.trace.escaped.setdefault(parse_source(name)[0], why)
                    if func in _CHOICES:
                        self.trace.routers.add(parse_source(name)[0])
                    broken.add(name)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        widest = max((t.shape[-1] for t in outputs if t.dim()), default=0)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) in self.labels and t.dim() and t.shape[-1] == 1 < widest \
                    and func not in _MATMULS:
                for name in self.labels[id(t)]:
                    if self.trace.widths.get(name) == 1:
                        self.trace.escaped.setdefault(parse_source(name)[0], "its one output feature is broadcast "
                                                      f"across {widest} by {getattr(func, '__name__', func)}")
                        self.trace.routers.add(parse_source(name)[0])  # a gate: replicated, never split
                        broken.add(name)
        return frozenset(broken)

    def _norm_module(self, source: str) -> str | None:
        """The innermost running module, if it is a norm over ``source``'s width: every
        parameter of it 1-D of that width (q_norm over all heads, as OLMo2's)."""
        if not self.stack:
            return None
        name, module = self.stack[-1]
        params = list(module.parameters())
        width = self.trace.widths.get(source)
        if params and all(p.dim() == 1 and p.shape[0] == width for p in params):
            return name
        return None

    def _propagate(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sharded = [t for t in inputs if id(t) in self.labels]
        if not sharded:
            return
        sources = frozenset().union(*(self.labels[id(t)] for t in sharded))
        sources = sources - self._escapes(func, args, kwargs, out, sources)
        if not sources:
            return
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if len(sharded) == 1 and id(sharded[0]) in self.views and sharded[0] is inputs[0]:
            cut = self._segments(func, args, kwargs, sharded[0], outputs)
            if cut:
                for t, (source, tail) in zip(outputs, cut):
                    self.set_label(t, frozenset({source}) | (sources - {self.views[id(sharded[0])][0]}))
                    self._set_view(t, source, tail)
                return
        for t in outputs:
            self.set_label(t, sources)
        if len(outputs) != 1:
            return
        same = {self.views[id(t)] for t in sharded if id(t) in self.views and t.shape == outputs[0].shape}
        if len(same) == 1:  # elementwise (scaled, normalised, cast): the same features
            self._set_view(outputs[0], *same.pop())
        elif len(sharded) == 1 and id(sharded[0]) in self.views and func in _RESHAPES:
            self._reshaped(sharded[0], outputs[0])

    def _set_view(self, t: torch.Tensor, source: str, tail: tuple[int, ...]) -> None:
        self.views[id(t)] = (source, tail)
        if len(tail) >= 2:
            self.trace.heads.setdefault(source, int(tail[0]))

    def _reshaped(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """[.., D] reshaped keeps its features in order in the shortest trailing dims whose
        product is D; viewed as [.., n, D/n] it shows n heads."""
        source, tail = self.views.get(id(src), (None, None))
        if source is None or out.numel() != src.numel():
            return
        width = math.prod(tail)
        lead = src.dim() - len(tail)
        if out.dim() > lead and out.shape[:lead] == src.shape[:lead] and math.prod(out.shape[lead:]) == width:
            self._set_view(out, source, tuple(out.shape[lead:]))  # [.., D] -> [.., n, D/n], n may be 1
            return
        for k in range(1, out.dim() + 1):
            if math.prod(out.shape[out.dim() - k:]) == width:
                self._set_view(out, source, tuple(out.shape[out.dim() - k:]))
                return

    def _segments(self, func, args: tuple, kwargs: dict, src: torch.Tensor,
                  outputs: list[torch.Tensor]) -> list[tuple[str, tuple[int, ...]]] | None:
        """A cut of ``src`` along the first of its feature dims into parts: each part's
        (segment name, trailing dims), or None when the op is not such a cut."""
        source, tail = self.views[id(src)]
        axis = src.dim() - len(tail)  # the outermost feature dim
        stride = math.prod(tail[1:])
        blocks = None
        if func is torch.Tensor.__getitem__:
            picked = _picked_block(args[1], src.dim(), axis, tail[0])
            if picked is None:
                return None
            start, stop, keep_dim = picked
            blocks = [(start, stop, keep_dim)]
        elif func in _CUTS:
            narrow = func in (torch.Tensor.narrow, torch.narrow)
            position = 1 if narrow or func in (torch.Tensor.unbind, torch.unbind) else 2
            dim = kwargs.get("dim", args[position] if len(args) > position else 0)
            if not isinstance(dim, int) or dim % src.dim() != axis:
                return None
            if narrow:
                start = (args[2] if len(args) > 2 else kwargs["start"]) % tail[0]
                blocks = [(start, start + outputs[0].shape[axis], True)]
            elif func in (torch.Tensor.unbind, torch.unbind):
                blocks = [(i, i + 1, False) for i in range(len(outputs))]
            else:
                blocks, at = [], 0
                for t in outputs:
                    blocks.append((at, at + t.shape[axis], True))
                    at += t.shape[axis]
        if not blocks or len(blocks) != len(outputs) or all(b - a == tail[0] for a, b, _ in blocks):
            return None
        unit, base, _ = parse_source(source)
        base = base or 0
        cut = []
        for (a, b, keep), t in zip(blocks, outputs):
            name = segment_name(unit, base + a * stride, base + b * stride)
            self.trace.widths.setdefault(name, (b - a) * stride)
            part_tail = ((b - a), *tail[1:]) if keep else tuple(tail[1:])
            if not part_tail or math.prod(part_tail) != (b - a) * stride or tuple(t.shape[t.dim() - len(part_tail):]) != part_tail:
                return None
            cut.append((name, part_tail))
        return cut


def _picks_first(index: Any) -> bool:
    """``w[e]``: an integer (or a 0-d integer tensor) picking along dim 0, nothing else."""
    if isinstance(index, tuple):
        if len(index) != 1:
            return False
        index = index[0]
    if isinstance(index, torch.Tensor):
        return index.dim() == 0 and not index.is_floating_point()
    return isinstance(index, int) and not isinstance(index, bool)


def _picked_block(index: Any, ndim: int, axis: int, size: int) -> tuple[int, int, bool] | None:
    """The [start, stop) block an index picks along ``axis`` (whole slices elsewhere), and
    whether that dim stays; None for any other index."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1 or any(i is None for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (ndim - len(items))
    if len(items) != ndim:
        return None
    for d, item in enumerate(items):
        if d != axis and item != slice(None):
            return None
    item = items[axis]
    if isinstance(item, slice):
        if item.step not in (None, 1):
            return None
        start, stop, _ = item.indices(size)
        return (start, stop, True) if stop > start else None
    if isinstance(item, int) and not isinstance(item, bool):
        return (item % size, item % size + 1, False)
    if isinstance(item, list) and item and all(isinstance(i, int) for i in item):
        picked = [i % size for i in item]
        if picked == list(range(picked[0], picked[0] + len(picked))):
            return (picked[0], picked[-1] + 1, True)
    return None


def sample_inputs(model: nn.Module, seq_len: int = 6) -> dict[str, torch.Tensor]:
    """A tiny, fixed batch for the trace: batch 1, ``seq_len`` tokens inside the vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(1, min(vocab, 1000)), (1, seq_len), generator=gen)
    device = next(model.parameters()).device
    if device.type == "meta":  # mask code reads the mask's values, which meta tensors lack
        return {"input_ids": ids.to(device)}
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def weight_candidates(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter of two or more dims but embedding tables (full name -> parameter), and
    for the 2-D ``weight`` of a module, that module's name."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params, module_weights = {}, {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in tables and not isinstance(module, nn.Linear):
                continue
            full = f"{mname}.{pname}" if mname else pname
            params[full] = p
            if pname == "weight" and p.dim() == 2:
                module_weights[full] = mname
    return params, module_weights


def walk(model: nn.Module, forced: dict[str, Style], vocab_head: str | None) -> Trace:
    """Run one forward and classify every weight that it multiplies an activation by. A module
    whose 2-D weight is used but which does not return x W^T (+ b) (a router returning its top-k,
    say) has its weight treated as a parameter unit, and the forward runs again."""
    not_linear: set[str] = set()
    for _ in range(2):
        params, module_weights = weight_candidates(model)
        module_weights = {p: m for p, m in module_weights.items() if m not in not_linear}
        by_id: dict[int, tuple[str, torch.Tensor]] = {}
        for name, p in params.items():
            by_id.setdefault(id(p), (name, p))
        if vocab_head is not None and f"{vocab_head}.weight" in params:  # a tied lm_head is the head here
            by_id[id(params[f"{vocab_head}.weight"])] = (f"{vocab_head}.weight", params[f"{vocab_head}.weight"])
        trace = Trace()
        labeler = _Labeler(by_id, params, module_weights, forced, vocab_head, trace)
        hooks = _hooks(model, labeler, params, module_weights)
        names = {id(m): n for n, m in model.named_modules()}
        hooks.append(nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: labeler.stack.append((names.get(id(m), "?"), m)) and None))
        hooks.append(nn.modules.module.register_module_forward_hook(lambda m, a, o: labeler.stack.pop() and None))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), labeler:
                result = model(**sample_inputs(model), use_cache=False)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        if not labeler.not_linear:
            break
        not_linear |= labeler.not_linear
    return _finish(trace, labeler, result, forced)


def _finish(trace: Trace, labeler: _Labeler, result: Any, forced: dict[str, Style]) -> Trace:
    for t in _leaves(result):
        if id(t) in labeler.pending:
            trace.reductions.append(labeler.pending.pop(id(t)))
        for name in labeler.label(t) or ():
            trace.escaped.setdefault(parse_source(name)[0], "its sharded output reaches the model's output")
    fed = {parse_source(s)[0] for sources in trace.row_sources.values() for s in sources}
    for name, style in trace.styles.items():
        if style == Style.COLUMN and name not in fed and name not in forced:
            trace.escaped.setdefault(name, "its sharded output is never read by a row-parallel layer")
    return trace


def _hooks(model: nn.Module, labeler: _Labeler, params: dict[str, torch.Tensor],
           module_weights: dict[str, str]) -> list:
    """Forward hooks for the trace: a module whose 2-D weight is multiplied by something other
    than stock nn.Linear.forward must return x W^T (+ b) of its first input to be replaced by a
    parallel Linear (else it is recorded in ``not_linear``); a module owning parameter units
    returns their partial sums, reduced there."""
    hooks = []
    modules = dict(model.named_modules())
    for mname in set(module_weights.values()):
        module = modules[mname]
        if type(module).forward is not nn.Linear.forward:
            hooks.append(module.register_forward_hook(_LinearCheck(labeler, mname), with_kwargs=True))
    owners: dict[str, set[str]] = {}
    for pname in params:
        if pname not in module_weights:
            owners.setdefault(pname.rpartition(".")[0], set()).add(pname)
    for mname, names in owners.items():
        hook = lambda m, a, out, mname=mname, names=frozenset(names): labeler.module_output(mname, names, out)
        hooks.append(modules[mname].register_forward_hook(hook))
    return hooks


class _LinearCheck:
    def __init__(self, labeler: _Labeler, name: str) -> None:
        self.labeler, self.name = labeler, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        w = module.weight
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            self.labeler.not_linear.add(self.name)
            return
        bias = getattr(module, "bias", None)
        with torch._C.DisableTorchFunction():
            for weight in (w, w.t()):
                if weight.shape[-1] != x.shape[-1]:
                    continue
                b = bias if isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],) else None
                want = F.linear(x, weight, b)
                if want.shape == out.shape and (out.is_meta or _close(want, out)):
                    return  # on the meta device (a skeleton) only the shape can be checked
        self.labeler.not_linear.add(self.name)


def _close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal up to summation order; a skeleton's uninitialised weights may hold inf and NaN,
    which both computations then share."""
    want, got = torch.nan_to_num(want.float()), torch.nan_to_num(got.float())
    scale = want.abs().max().item() if want.numel() else 0.0
    return torch.allclose(want, got, rtol=1e-3, atol=1e-5 * (1.0 + scale))


def _leaves(result: Any) -> Iterator[torch.Tensor]:
    values = result.values() if hasattr(result, "values") else result
    return (t for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor))
