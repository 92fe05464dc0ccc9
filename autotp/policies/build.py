"""Turn a model and a world size into a Plan: walk the data flow, group the layers that share
a sharded activation, split each group on whole heads, add the per-architecture edits."""
from __future__ import annotations

import fnmatch
from typing import Mapping

from torch import nn

from autotp.plan import AttrEdit, Entry, HeadSlice, Plan, ShardingError, Style
from autotp.policies import overrides as table
from autotp.policies.verify import verify_plan
from autotp.policies.walker import Trace, sample_inputs, walk
from autotp.sharding.math import assign_heads, contiguous, split_sizes, unit_ranges

_OVERRIDE_HINT = "pass overrides={{'{pattern}': 'replicate'}} (or 'column' / 'row') to autotp.plan / autotp.shard"


def build_plan(model: nn.Module, world_size: int, overrides: Mapping[str, str | Style] | None = None,
               strict: bool = True, verify: bool = True, fuse_allreduce: bool = True) -> Plan:
    """Classify every Linear of ``model`` from its data flow and split it for ``world_size`` ranks;
    with ``fuse_allreduce``, row layers whose partial sums are added before anything reads them
    share one all-reduce; with ``verify``, check the result on simulated ranks of one decoder layer."""
    if world_size < 1:
        raise ShardingError(f"world_size must be at least 1, got {world_size}")
    modules = dict(model.named_modules())
    layers = _decoder_layers(model)
    forced = _match_overrides(modules, overrides or {})
    vocab_in = _name_of(modules, model.get_input_embeddings())
    vocab_out = _name_of(modules, model.get_output_embeddings())
    trace = _walk_to_fixpoint(model, forced, vocab_out, layers, strict)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    plan = Plan(world_size=world_size, architecture=arch)
    _add_vocab(plan, modules, vocab_in, vocab_out, trace)
    for cols, rows in _groups(trace):
        _add_group(plan, modules, trace, sorted(cols), sorted(rows), layers)
    if fuse_allreduce:
        _fuse_reductions(plan, trace)
    order = {name: i for i, name in enumerate(modules)}
    plan.entries = dict(sorted(plan.entries.items(), key=lambda kv: order[kv[0]]))
    for name, module in modules.items():
        if isinstance(module, nn.Linear) and name not in plan.entries:
            if strict and _layer_of(name, layers) is not None and name not in forced:
                reason = trace.conflicts.get(name, "the trace never saw it run through "
                                            "torch.nn.functional.linear (a custom forward?)")
                raise ShardingError(f"autotp cannot place Linear '{name}': {reason}; "
                                    + _OVERRIDE_HINT.format(pattern=_pattern(name, layers)))
            plan.entries[name] = Entry(name, Style.REPLICATE, _layer_of(name, layers))
    if strict and not any(e.style in (Style.COLUMN, Style.ROW) for e in plan.entries.values()):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if any(p.dim() == 2 for p in m.parameters(recurse=False))})
        raise ShardingError(
            f"autotp found no nn.Linear layer to shard in the decoder layers of {arch} "
            f"(its weights sit in {kinds[:8]}); layers such as GPT-2's Conv1D are not supported")
    if verify and layers is not None and next(model.parameters()).device.type != "meta":
        verify_plan(model, plan, layers, sample_inputs(model))
    return plan


def _walk_to_fixpoint(model: nn.Module, forced: dict[str, Style], vocab_out: str | None,
                      layers: str | None, strict: bool) -> Trace:
    """Re-walk with escaped column layers replicated until nothing else escapes."""
    forced = dict(forced)
    for _ in range(8):
        trace = walk(model, forced, vocab_out)
        if trace.conflicts:
            name, why = next(iter(trace.conflicts.items()))
            raise ShardingError(f"autotp cannot place Linear '{name}': {why}; "
                                + _OVERRIDE_HINT.format(pattern=_pattern(name, layers)))
        new = {n: why for n, why in trace.escaped.items() if n not in forced}
        if not new:
            return trace
        outside = [n for n in new if _layer_of(n, layers) is None]
        if outside:  # fix what feeds the layers first: escapes inside may only follow from it
            forced.update({n: Style.REPLICATE for n in outside})
            continue
        stuck = sorted(new)
        if strict:
            first = stuck[0]
            others = f" (and {len(stuck) - 1} more: {stuck[1:4]})" if len(stuck) > 1 else ""
            raise ShardingError(f"autotp cannot place Linear '{first}'{others}: {new[first]}; "
                                + _OVERRIDE_HINT.format(pattern=_pattern(first, layers)))
        for name in new:
            forced[name] = Style.REPLICATE
    raise ShardingError("autotp: the walker did not settle after 8 passes; pass explicit overrides")


def _groups(trace: Trace) -> list[tuple[set[str], set[str]]]:
    """Row layers that share a column source, with all their sources, form one group."""
    groups: list[tuple[set[str], set[str]]] = []
    for row, sources in trace.row_sources.items():
        merged = (set(sources), {row})
        for g in [g for g in groups if g[0] & merged[0]]:
            groups.remove(g)
            merged[0].update(g[0])
            merged[1].update(g[1])
        groups.append(merged)
    return groups


def _fuse_reductions(plan: Plan, trace: Trace) -> None:
    """Row layers of one decoder layer whose partial sums always meet in the same additions
    (parallel attention and MLP) get one all-reduce, issued by the last of them to run."""
    places: dict[str, set[frozenset[str]]] = {}
    for rows in trace.reductions:
        for row in rows:
            places.setdefault(row, set()).add(rows)
    for rows in set(trace.reductions):
        entries = [plan.entries.get(r) for r in rows]
        if (len(rows) < 2 or any(len(places[r]) != 1 for r in rows)
                or any(e is None or e.style != Style.ROW for e in entries)
                or len({e.layer for e in entries}) != 1):
            continue
        order = sorted(rows, key=trace.row_order.index)
        last = order[-1]
        plan.entries[last].fuses = order[:-1]
        for row in order[:-1]:
            plan.entries[row].all_reduce = False
            plan.entries[row].deferred_to = last


def _add_group(plan: Plan, modules: dict[str, nn.Module], trace: Trace, cols: list[str],
               rows: list[str], layers: str | None) -> None:
    ws = plan.world_size
    owner = _common_parent(cols + rows)
    layer = _layer_of(owner + ".", layers) if owner else None
    heads = {c: trace.heads[c] for c in cols if c in trace.heads}
    if not heads:  # an MLP: features split evenly, no head structure
        widths = {modules[c].out_features for c in cols} | {modules[r].in_features for r in rows}
        if len(widths) != 1:
            raise ShardingError(f"autotp cannot split '{owner}': its layers {cols + rows} disagree on "
                                f"the sharded width ({sorted(widths)}); pass overrides for them")
        spans = [[s] for s in contiguous(split_sizes(widths.pop(), ws))]
        for name in cols + rows:
            style = Style.COLUMN if name in cols else Style.ROW
            plan.entries[name] = Entry(name, style, layer, owner, 1, [], spans, style == Style.ROW)
        return
    missing = [c for c in cols if c not in heads]
    n_q, n_kv = max(heads.values()), min(heads.values())
    odd = [c for c, n in heads.items() if n not in (n_q, n_kv)]
    if missing or odd:
        raise ShardingError(
            f"autotp cannot split the heads of '{owner}': {missing or odd} do not share the head "
            f"layout of the other projections; " + _OVERRIDE_HINT.format(pattern=_pattern(owner, layers)))
    if ws > n_q:
        raise ShardingError(f"world_size {ws} is larger than the {n_q} attention heads of '{owner}': "
                            f"heads are split whole, so use a world size of at most {n_q}")
    assigned = assign_heads(n_q, n_kv, ws)
    for c in cols:
        per_rank = assigned.q_heads if heads[c] == n_q else assigned.kv_heads
        unit = modules[c].out_features // heads[c]
        plan.entries[c] = Entry(c, Style.COLUMN, layer, owner, unit, [len(h) for h in per_rank],
                                [unit_ranges(h, unit) for h in per_rank])
    for r in rows:
        unit, rest = divmod(modules[r].in_features, n_q)
        if rest:
            raise ShardingError(f"autotp cannot split '{r}': {modules[r].in_features} inputs do not "
                                f"divide into {n_q} heads")
        plan.entries[r] = Entry(r, Style.ROW, layer, owner, unit, [len(h) for h in assigned.q_heads],
                                [unit_ranges(h, unit) for h in assigned.q_heads], all_reduce=True)
    head_dim = modules[rows[0]].in_features // n_q
    _add_attrs(plan, owner, modules[owner], n_q, n_kv, head_dim, assigned)


def _add_attrs(plan: Plan, owner: str, module: nn.Module, n_q: int, n_kv: int, head_dim: int,
               assigned) -> None:
    q = [len(h) for h in assigned.q_heads]
    local = {
        table.HEAD_ATTRS: (n_q, q),
        table.KV_HEAD_ATTRS: (n_kv, [len(h) for h in assigned.kv_heads]),
        table.GROUP_ATTRS: (n_q // n_kv, list(assigned.groups)),
        table.WIDTH_ATTRS: (n_q * head_dim, [n * head_dim for n in q]),
    }
    for attr, value in vars(module).items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        for names, (global_value, per_rank) in local.items():
            if attr in names and value == global_value:
                plan.attrs.append(AttrEdit(owner, attr, per_rank))
    kwarg = table.POSITION_BIAS_KWARGS.get(type(module).__name__)
    if kwarg:
        plan.head_slices.append(HeadSlice(owner, kwarg, n_q, [unit_ranges(h, 1) for h in assigned.q_heads]))


def _add_vocab(plan: Plan, modules: dict[str, nn.Module], vocab_in: str | None, vocab_out: str | None,
               trace: Trace) -> None:
    ws = plan.world_size
    emb = modules.get(vocab_in) if vocab_in else None
    if isinstance(emb, nn.Embedding):
        spans = [[s] for s in contiguous(split_sizes(emb.num_embeddings, ws))]
        plan.entries[vocab_in] = Entry(vocab_in, Style.VOCAB, None, "embedding", 1, [], spans, all_reduce=True)
    head = modules.get(vocab_out) if vocab_out else None
    if isinstance(head, nn.Linear) and trace.styles.get(vocab_out) == Style.VOCAB:
        spans = [[s] for s in contiguous(split_sizes(head.out_features, ws))]
        tied = vocab_in if isinstance(emb, nn.Embedding) and head.weight is emb.weight else None
        plan.entries[vocab_out] = Entry(vocab_out, Style.VOCAB, None, "lm_head", 1, [], spans, tied_to=tied)


def _match_overrides(modules: dict[str, nn.Module], overrides: Mapping[str, str | Style]) -> dict[str, Style]:
    forced: dict[str, Style] = {}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    for pattern, style in overrides.items():
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ShardingError(f"autotp override '{pattern}' matches no Linear layer of the model; "
                                f"Linear layers look like {linears[:3]}")
        for name in hits:
            forced[name] = Style.parse(style)
    return forced


def _decoder_layers(model: nn.Module) -> str | None:
    """The path of the longest ModuleList of blocks that hold Linear layers."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if any(isinstance(m, nn.Linear) for m in module.modules()):
                best, best_len = name, len(module)
    return best


def _layer_of(name: str, layers: str | None) -> int | None:
    if layers is None or not name.startswith(layers + "."):
        return None
    index = name[len(layers) + 1:].split(".")[0]
    return int(index) if index.isdigit() else None


def _pattern(name: str, layers: str | None) -> str:
    layer = _layer_of(name, layers)
    return name if layer is None else name.replace(f"{layers}.{layer}", f"{layers}.*", 1)


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _name_of(modules: dict[str, nn.Module], target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in modules.items() if m is target), None)
