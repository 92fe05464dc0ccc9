"""Who holds which weights: every parameter with two or more dims except embedding tables
(expert tensors, routers and projections outside the decoder blocks included), sorted by the
plan entry that covers it. What no entry covers is kept whole by every rank without the plan
saying so: the per-rank weight test requires there is none."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from autotp.plan import Plan, Style


def weights(model: nn.Module) -> dict[str, int]:
    """name -> numel of each parameter with >= 2 dims, embedding tables (and an lm_head tied to
    one) left out, each tensor once."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and id(p) not in tables}


@dataclass
class Census:
    sharded: int = 0     # in column / row / vocab entries: split over the ranks
    replicated: int = 0  # in entries the plan replicates on purpose
    unplanned: dict[str, int] = field(default_factory=dict)  # in no entry: every rank holds it whole

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + sum(self.unplanned.values())


def census(model: nn.Module, plan: Plan) -> Census:
    """The unsharded model's weights, by how ``plan`` treats them."""
    out = Census()
    for name, numel in weights(model).items():
        module = name.rsplit(".", 1)[0]
        entry = plan.entries.get(name)  # a parameter entry (an expert tensor), else its module's
        entry = entry if entry is not None and entry.is_param else plan.entries.get(module)
        if entry is None:
            out.unplanned[name] = numel
        elif entry.style == Style.REPLICATE:
            out.replicated += numel
        else:
            out.sharded += numel
    return out
