"""Turn a model and a world size into a Plan: walk the data flow, group the layers that share
a sharded activation, split each group on whole heads, add the per-architecture edits."""
from __future__ import annotations

import fnmatch
from typing import Mapping

from torch import nn

from autotp.plan import AttrEdit, Entry, ExpertSlice, HeadSlice, Plan, ShardingError, Style
from autotp.policies import overrides as table
from autotp.policies.verify import verify_plan
from autotp.policies.trace import Trace, parse_source
from autotp.policies.candidates import sample_inputs, weight_candidates
from autotp.policies.walker import walk
from autotp.sharding.math import assign_heads, contiguous, merge_ranges, split_sizes, unit_ranges

_OVERRIDE_HINT = "pass overrides={{'{pattern}': 'replicate'}} (or 'column' / 'row') to autotp.plan / autotp.shard"


EXPERTS = ("tensor", "expert")


def build_plan(model: nn.Module, world_size: int, overrides: Mapping[str, str | Style] | None = None,
               strict: bool = True, verify: bool = True, fuse_allreduce: bool = True,
               experts: str = "tensor") -> Plan:
    """Classify every Linear of ``model`` from its data flow and split it for ``world_size`` ranks;
    with ``fuse_allreduce``, row layers whose partial sums are added before anything reads them
    share one all-reduce; with ``verify``, check the result on simulated ranks of one decoder layer.
    ``experts="tensor"`` splits every expert like a dense MLP; ``"expert"`` gives each rank whole
    experts (expert parallelism), where they divide evenly over the ranks."""
    if world_size < 1:
        raise ShardingError(f"world_size must be at least 1, got {world_size}")
    if experts not in EXPERTS:
        raise ShardingError(f"experts={experts!r}: pass one of {EXPERTS}")
    modules = dict(model.named_modules())
    layers = _decoder_layers(model)
    forced = _match_overrides(model, overrides or {})
    vocab_in = _name_of(modules, model.get_input_embeddings())
    vocab_out = _name_of(modules, model.get_output_embeddings())
    trace = _walk_to_fixpoint(model, forced, vocab_out, layers, strict)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    plan = Plan(world_size=world_size, architecture=arch)
    _add_vocab(plan, modules, vocab_in, vocab_out, trace)
    for sources, rows in _groups(trace):
        _add_group(plan, modules, trace, sorted(sources), sorted(rows), layers)
    if fuse_allreduce:
        _fuse_reductions(plan, trace)
    if experts == "expert":
        _whole_experts(plan, modules)
    _replicate_the_rest(plan, model, trace, layers, forced, strict)
    order = {name: i for i, name in enumerate(_names_in_order(model))}
    plan.entries = dict(sorted(plan.entries.items(), key=lambda kv: order.get(kv[0], len(order))))
    if strict and not any(e.style in (Style.COLUMN, Style.ROW) for e in plan.entries.values()):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if any(p.dim() == 2 for p in m.parameters(recurse=False))})
        raise ShardingError(
            f"autotp found no weight to shard in the decoder layers of {arch} (its weights sit in "
            f"{kinds[:8]}, and no operation of the traced forward multiplied an activation by one)")
    if verify and layers is not None and next(model.parameters()).device.type != "meta":
        verify_plan(model, plan, layers, sample_inputs(model))
    return plan


def _names_in_order(model: nn.Module) -> list[str]:
    """Module names, each followed by its own parameters' full names."""
    names = []
    for mname, module in model.named_modules():
        names.append(mname)
        names += [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
    return names


def _replicate_the_rest(plan: Plan, model: nn.Module, trace: Trace, layers: str | None,
                        forced: dict[str, Style], strict: bool) -> None:
    """Every weight of two or more dims the plan does not split gets an entry saying every rank
    holds it whole; a Linear inside the decoder layers that the trace never saw is an error."""
    params, module_weights = weight_candidates(model)
    modules = dict(model.named_modules())
    for pname in params:
        module = module_weights.get(pname)
        if pname in plan.entries or module is not None and module in plan.entries:
            continue
        unit = trace.units.get(module) if module is not None else None
        name = module if module is not None and (unit is not None or pname not in trace.units) else pname
        if strict and isinstance(modules.get(name), nn.Linear) and _layer_of(name, layers) is not None \
                and name not in forced and name not in trace.units:
            reason = trace.conflicts.get(name, "the trace never saw an operation multiply an activation by "
                                               "its weight")
            raise ShardingError(f"autotp cannot place Linear '{name}': {reason}; "
                                + _OVERRIDE_HINT.format(pattern=_pattern(name, layers)))
        is_param = name == pname and module != name
        plan.entries[name] = Entry(name, Style.REPLICATE, _layer_of(name, layers),
                                   transposed=bool(unit and unit.transposed),
                                   param_dim=0 if is_param else None)


def _walk_to_fixpoint(model: nn.Module, forced: dict[str, Style], vocab_out: str | None,
                      layers: str | None, strict: bool) -> Trace:
    """Re-walk with escaped column layers replicated until nothing else escapes."""
    forced = dict(forced)
    for _ in range(8):
        trace = walk(model, forced, vocab_out)
        if trace.conflicts:
            name, why = next(iter(trace.conflicts.items()))
            raise ShardingError(f"autotp cannot place {_kind(trace, name)} '{name}': {why}; "
                                + _OVERRIDE_HINT.format(pattern=_pattern(name, layers)))
        new = {n: why for n, why in trace.escaped.items() if n not in forced}
        if not new:
            return trace
        routers = [n for n in new if n in trace.routers]
        quiet = routers or [n for n in new if _layer_of(n, layers) is None]
        if quiet:  # routers (a softmax / top-k / max over the whole output, a one-output gate)
            # first, then what feeds the layers: replicated, and the rest walked again
            forced.update({n: Style.REPLICATE for n in quiet})
            continue
        stuck = sorted(new)
        if strict:
            first = stuck[0]
            others = f" (and {len(stuck) - 1} more: {stuck[1:4]})" if len(stuck) > 1 else ""
            raise ShardingError(f"autotp cannot place {_kind(trace, first)} '{first}'{others}: {new[first]}; "
                                + _OVERRIDE_HINT.format(pattern=_pattern(first, layers)))
        for name in new:
            forced[name] = Style.REPLICATE
    raise ShardingError("autotp: the walker did not settle after 8 passes; pass explicit overrides")


def _whole_experts(plan: Plan, modules: dict[str, nn.Module]) -> None:
    """Expert parallelism: each experts block's parameter entries cut their expert dim (0)
    instead, whole experts per rank. Only blocks that follow transformers' experts interface
    (they take routing indices and treat an index >= num_experts as "not here") qualify."""
    owners: dict[str, list[Entry]] = {}
    for entry in plan.entries.values():
        if entry.is_param and entry.style in (Style.COLUMN, Style.ROW):
            owners.setdefault(entry.name.rpartition(".")[0], []).append(entry)
    if not owners:
        raise ShardingError("experts='expert' asks for expert parallelism, but this model has no experts block "
                            "whose tensors the plan splits; leave experts='tensor'")
    ws = plan.world_size
    for owner, entries in owners.items():
        module = modules[owner]
        n = getattr(module, "num_experts", None)
        if not hasattr(module, "_is_expert_parallel") or not isinstance(n, int):
            raise ShardingError(f"'{owner}' ({type(module).__name__}) does not follow transformers' experts "
                                "interface (num_experts, routing indices): it cannot be split by whole experts; "
                                "leave experts='tensor'")
        if n % ws:
            raise ShardingError(f"'{owner}' has {n} experts, which do not divide evenly over {ws} ranks; use a "
                                f"world size dividing {n}, or experts='tensor'")
        spans = [[s] for s in contiguous(split_sizes(n, ws))]
        for entry in entries:
            entry.param_dim, entry.ranges, entry.heads, entry.unit = 0, spans, [], 1
        plan.expert_slices.append(ExpertSlice(owner, n, spans))


def _kind(trace: Trace, name: str) -> str:
    unit = trace.units.get(name)
    return "weight" if unit is not None and not unit.module_level else "Linear"


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


def _add_group(plan: Plan, modules: dict[str, nn.Module], trace: Trace, sources: list[str],
               rows: list[str], layers: str | None) -> None:
    """Split the sources (column units, or segments of one) that feed ``rows`` and the rows
    themselves: on whole heads where the sources have heads, evenly otherwise. A unit whose
    output is cut into segments keeps each segment's local rows, concatenated in order."""
    ws = plan.world_size
    units = trace.units
    unit_names = sorted({parse_source(s)[0] for s in sources})
    owner = _common_parent(unit_names + rows)
    layer = _layer_of(owner + ".", layers) if owner else None
    heads = {s: trace.heads[s] for s in sources if s in trace.heads}
    local: dict[str, list] = {}  # source -> per-rank ranges in the source's own features
    if not heads:  # an MLP: features split evenly, no head structure
        widths = {trace.widths[s] for s in sources} | {units[r].in_features for r in rows}
        if len(widths) != 1:
            raise ShardingError(f"autotp cannot split '{owner}': its layers {sources + rows} disagree on "
                                f"the sharded width ({sorted(widths)}); pass overrides for them")
        width = widths.pop()
        # expert tensors go to grouped matmuls that want 16-byte aligned strides: cut them in
        # blocks of 8 features where the width allows
        align = 8 if width % 8 == 0 and any(not units[u].module_level for u in unit_names + rows) else 1
        spans = [[(a * align, b * align)] for a, b in contiguous(split_sizes(width // align, ws))]
        local = {s: spans for s in sources}
        row_ranges, row_unit, row_heads = spans, 1, []
        head_unit: dict[str, int] = {}
    else:
        sizes = {trace.widths[s] // n for s, n in heads.items()}
        if len(sizes) == 1:  # a part never viewed per head (multi-query k, v): whole heads of that size
            size = sizes.pop()
            heads.update({s: trace.widths[s] // size for s in sources
                          if s not in heads and trace.widths[s] % size == 0})
        missing = [s for s in sources if s not in heads]
        n_q, n_kv = max(heads.values()), min(heads.values())
        odd = [s for s, n in heads.items() if n not in (n_q, n_kv)]
        if missing or odd:
            raise ShardingError(
                f"autotp cannot split the heads of '{owner}': {missing or odd} do not share the head "
                f"layout of the other projections; " + _OVERRIDE_HINT.format(pattern=_pattern(owner, layers)))
        if ws > n_q:
            raise ShardingError(f"world_size {ws} is larger than the {n_q} attention heads of '{owner}' (or blocks of "
                                f"heads its fused layout keeps together): they are split whole, so use a world "
                                f"size of at most {n_q}")
        assigned = assign_heads(n_q, n_kv, ws)
        head_unit = {}
        for s in sources:
            per_rank = assigned.q_heads if heads[s] == n_q else assigned.kv_heads
            head_unit[s] = trace.widths[s] // heads[s]
            local[s] = [unit_ranges(h, head_unit[s]) for h in per_rank]
        row_unit, rest = divmod(units[rows[0]].in_features, n_q)
        for r in rows:
            if units[r].in_features != row_unit * n_q or rest:
                raise ShardingError(f"autotp cannot split '{r}': {units[r].in_features} inputs do not "
                                    f"divide into {n_q} heads")
        row_ranges = [unit_ranges(h, row_unit) for h in assigned.q_heads]
        row_heads = [len(h) for h in assigned.q_heads]
    for name in unit_names:
        unit = units[name]
        parts = sorted((parse_source(s)[1] or 0, s) for s in sources if parse_source(s)[0] == name)
        at = 0
        for start, s in parts:
            if start != at:
                break
            at += trace.widths[s]
        if at != unit.out_features:
            raise ShardingError(f"autotp cannot split '{name}': its output is cut into parts "
                                f"{[s for _, s in parts]} that do not cover its {unit.out_features} features "
                                "once each; " + _OVERRIDE_HINT.format(pattern=_pattern(name, layers)))
        ranges = [merge_ranges([(start + a, start + b) for start, s in parts for a, b in local[s][r]])
                  for r in range(ws)]
        first = parts[0][1]
        per_rank_heads = [sum(b - a for a, b in local[first][r]) // head_unit[first] for r in range(ws)] \
            if first in head_unit else []
        plan.entries[name] = Entry(name, Style.COLUMN, layer, owner, head_unit.get(first, 1), per_rank_heads,
                                   ranges, transposed=unit.transposed,
                                   param_dim=None if unit.module_level else unit.out_dim)
    for r in rows:
        unit = units[r]
        plan.entries[r] = Entry(r, Style.ROW, layer, owner, row_unit, row_heads, row_ranges, all_reduce=True,
                                transposed=unit.transposed, param_dim=None if unit.module_level else unit.in_dim)
    for norm, source in trace.norms.items():
        if source in local:
            plan.entries[norm] = Entry(norm, Style.COLUMN, layer, owner, 1, [], local[source],
                                       all_reduce=True, norm_width=trace.widths[source])  # of its sums
    if heads:
        _add_attrs(plan, owner, modules[owner], n_q, n_kv, row_unit, assigned)


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
            elif names is table.HEAD_ATTRS and attr in names and value > n_q and value % n_q == 0:
                # the units split are blocks of heads (Falcon-40B's KV groups): heads scale with them
                plan.attrs.append(AttrEdit(owner, attr, [n * (value // n_q) for n in per_rank]))
    config = vars(module).get("config")
    if config is not None and hasattr(config, "to_dict"):  # forwards that read self.config.num_attention_heads
        for names in (table.HEAD_ATTRS, table.KV_HEAD_ATTRS):
            global_value, per_rank = local[names]
            for attr in sorted(names):
                if getattr(config, attr, None) == global_value and per_rank != [global_value] * len(per_rank):
                    plan.attrs.append(AttrEdit(owner, f"config.{attr}", per_rank))
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


def _match_overrides(model: nn.Module, overrides: Mapping[str, str | Style]) -> dict[str, Style]:
    """Patterns (fnmatch) over the names a plan entry can have: modules holding a 2-D weight
    (Linear, Conv1D), and other weights of two or more dims (expert tensors)."""
    forced: dict[str, Style] = {}
    params, module_weights = weight_candidates(model)
    names = list(dict.fromkeys([module_weights.get(p, p) for p in params]))
    for pattern, style in overrides.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ShardingError(f"autotp override '{pattern}' matches no Linear layer or weight of the model; "
                                f"names look like {names[:3]}")
        for name in hits:
            forced[name] = Style.parse(style)
    return forced


def _decoder_layers(model: nn.Module) -> str | None:
    """The path of the longest ModuleList of blocks that hold weights of two or more dims."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if any(p.dim() >= 2 for p in module.parameters()):
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
