"""Render a Plan as a readable table; identical decoder layers are folded into one `*` row."""
from __future__ import annotations

import re
from typing import Any

# No import of autotp.plan (which imports this module): entries and plans are read by their
# fields only.
Entry = Plan = Any


def _pattern(entry: Entry) -> str:
    if entry.layer is None:
        return entry.name
    return re.sub(rf"\.{entry.layer}\.", ".*.", entry.name, count=1)


def _fold(module: str) -> str:
    return re.sub(r"\.\d+(\.|$)", r".*\1", module, count=1)


def _short(name: str, beside: str) -> str:
    """``name`` without the module path it shares with ``beside``."""
    a, b = name.split("."), beside.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return ".".join(a[common:])


def _row(entry: Entry, world_size: int) -> list[str]:
    sizes = "/".join(str(entry.local_size(r)) for r in range(world_size)) if entry.ranges else "-"
    heads = "/".join(str(h) for h in entry.heads) if entry.heads else ""
    note = f"tied to {entry.tied_to}" if entry.tied_to else ""
    reduce = "all-reduce" if entry.all_reduce else ("all-gather" if entry.group == "lm_head" else "")
    if entry.fuses:
        reduce += " of " + " + ".join(_short(n, entry.name) for n in entry.fuses + [entry.name])
    if entry.deferred_to:
        reduce = f"summed into {_short(entry.deferred_to, entry.name)}"
    return [_pattern(entry), entry.style.value, sizes, heads, reduce, note]


def format_plan(plan: Plan) -> str:
    header = ["module", "style", "shard sizes per rank", "heads per rank", "collective", "note"]
    rows: list[list[str]] = []
    seen: dict[str, list[str]] = {}
    layers: set[int] = set()
    for entry in plan.entries.values():
        row = _row(entry, plan.world_size)
        if entry.layer is not None:
            layers.add(entry.layer)
        key = row[0]
        if key in seen:
            if seen[key] != row:
                row[0] = entry.name  # a layer that differs from the others is listed on its own
                rows.append(row)
            continue
        seen[key] = row
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [f"autotp plan: {plan.architecture}, world_size={plan.world_size}, "
             f"{len(layers)} decoder layers ('*' = every layer)"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    per_layer = sorted(set(plan.collectives_per_layer.values()))
    lines.append(f"all-reduces per decoder layer: {'/'.join(map(str, per_layer)) or 0}")
    shown: set[str] = set()
    for edit in plan.attrs:
        line = f"local attribute: {_fold(edit.module)}.{edit.attr} = {edit.values}"
        if line not in shown:
            shown.add(line)
            lines.append(line)
    for hs in {_fold(h.module): h for h in plan.head_slices}.values():
        lines.append(f"position bias: {_fold(hs.module)}({hs.kwarg}=...) sliced to each rank's heads")
    return "\n".join(lines)
