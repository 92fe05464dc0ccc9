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
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from autotp.plan import Style
from autotp.policies import ops
from autotp.policies.candidates import sample_inputs, weight_candidates
from autotp.policies.module_hooks import trace_hooks
from autotp.policies.trace import Trace, Unit, parse_source, segment_name

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
        name = ops.T_PROPERTIES.get(func, "")
        if func in ops.TRANSPOSES or name:
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
        elif func in ops.SAME_WEIGHT:
            pass
        elif func is torch.Tensor.__getitem__ and ops.picks_first(args[1]):
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
        spec = ops.MATMULS.get(func)
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
        plain_sum = (func in ops.SUMS and kwargs.get("alpha", 1) == 1) or func in ops.IDENTITIES
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
            (func in ops.MOVES and id(inputs[0]) in self.partial)
            or (func in ops.SCALES and len(held) == 1 and len(inputs) <= 2)
            or (func in ops.SUMS and not others)
            or (func in ops.INDEX_ADDS and held and held[-1] is inputs[-1])
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
        if (func in ops.REDUCTIONS or func in ops.NORMS) and isinstance(x, torch.Tensor) and id(x) in self.labels:
            dim = None
            if func in ops.REDUCTIONS:
                dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
                if func in (torch.topk, torch.Tensor.topk):
                    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            dims = range(x.dim()) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
            if func in ops.NORMS or any(isinstance(d, int) and d % max(x.dim(), 1) == x.dim() - 1 for d in dims):
                for name in self.labels[id(x)]:
                    if self.trace.widths.get(name) != x.shape[-1]:
                        continue
                    norm = self._norm_module(name) if func in ops.SPLITTABLE_REDUCTIONS else None
                    if norm is not None:
                        self.trace.norms[norm] = name
                        continue
                    why = f"its sharded output is reduced across its whole width by {getattr(func, '__name__', func)}"
                    self.trace.escaped.setdefault(parse_source(name)[0], why)
                    if func in ops.CHOICES:
                        self.trace.routers.add(parse_source(name)[0])
                    broken.add(name)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        widest = max((t.shape[-1] for t in outputs if t.dim()), default=0)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) in self.labels and t.dim() and t.shape[-1] == 1 < widest \
                    and func not in ops.MATMULS:
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
        elif len(sharded) == 1 and id(sharded[0]) in self.views and func in ops.RESHAPES:
            self._reshaped(sharded[0], outputs[0])

    def _set_view(self, t: torch.Tensor, source: str, tail: tuple[int, ...]) -> None:
        self.views[id(t)] = (source, tail)
        if len(tail) >= 2:
            seen = self.trace.heads.setdefault(source, int(tail[0]))
            # viewed per head first and then in blocks of heads (Falcon-40B in transformers 5.25:
            # [.., heads, hd] then [.., kv groups, -1, hd]): the blocks are what a rank must keep whole
            if 1 < tail[0] < seen and seen % tail[0] == 0 and len(tail) >= 3:
                self.trace.heads[source] = int(tail[0])

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
            picked = ops.picked_block(args[1], src.dim(), axis, tail[0])
            if picked is None:
                return None
            start, stop, keep_dim = picked
            blocks = [(start, stop, keep_dim)]
        elif func in ops.CUTS:
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
        hooks = trace_hooks(model, labeler, params, module_weights)
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


def _leaves(result: Any) -> Iterator[torch.Tensor]:
    values = result.values() if hasattr(result, "values") else result
    return (t for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor))
