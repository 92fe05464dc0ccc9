"""The plan: what each module of a model becomes under tensor parallelism.

A plan is data. The walker (autotp.policies) produces it from a model's data flow,
``print(plan)`` shows it, and autotp.sharding applies it; online and offline paths read
the same entries, so they cannot drift apart.
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

Ranges = list[tuple[int, int]]  # [start, stop) blocks along one weight dim, concatenated in order


class Style(str, enum.Enum):
    """How a module is split across ranks."""

    COLUMN = "column"        # Y = X A^T with A's rows (output features) split; output stays sharded
    ROW = "row"              # input features split; partial outputs summed by an all-reduce
    VOCAB = "vocab"          # embedding / lm_head rows split over the vocabulary
    REPLICATE = "replicate"  # every rank holds the whole module

    @classmethod
    def parse(cls, value: "Style | str") -> "Style":
        """Accept our names and Hugging Face's tp_plan strings (the one boundary mapping)."""
        if isinstance(value, Style):
            return value
        key = str(value).lower()
        if key in _HF_STYLE_NAMES:
            return _HF_STYLE_NAMES[key]
        try:
            return cls(key)
        except ValueError:
            names = sorted({s.value for s in cls} | set(_HF_STYLE_NAMES))
            raise ValueError(f"unknown sharding style {value!r}; expected one of {names}") from None


_HF_STYLE_NAMES = {
    "colwise": Style.COLUMN,
    "rowwise": Style.ROW,
    "replicated": Style.REPLICATE,
    "vocab_parallel": Style.VOCAB,
}


@dataclass
class Entry:
    """One module's share of the plan.

    ``ranges[r]`` lists the blocks of the split dimension that rank r keeps (out features for
    COLUMN and VOCAB, in features for ROW); blocks may repeat when KV heads are replicated.
    ``all_reduce`` marks a ROW entry whose output is summed across ranks. In a block whose
    attention and MLP outputs are added before anything reads them, the earlier row layer is
    ``deferred_to`` the later one, which lists it in ``fuses`` and all-reduces both at once.
    """

    name: str
    style: Style
    layer: int | None = None
    group: str | None = None
    unit: int = 1
    heads: list[int] = field(default_factory=list)
    ranges: list[Ranges] = field(default_factory=list)
    all_reduce: bool = False
    tied_to: str | None = None
    deferred_to: str | None = None
    fuses: list[str] = field(default_factory=list)

    def local_size(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.ranges[rank])


@dataclass
class AttrEdit:
    """A module attribute the forward reads that must hold this rank's local value."""

    module: str
    attr: str
    values: list[int]


@dataclass
class HeadSlice:
    """A position bias passed to ``module`` as keyword ``kwarg`` with heads merged into dim 0
    (``[batch * heads, ...]``, as BLOOM's ALiBi); each rank keeps heads ``ranges[rank]``."""

    module: str
    kwarg: str
    num_heads: int
    ranges: list[Ranges]


@dataclass
class Plan:
    """The tensor-parallel plan of one model for one world size."""

    world_size: int
    architecture: str
    entries: dict[str, Entry] = field(default_factory=dict)
    attrs: list[AttrEdit] = field(default_factory=list)
    head_slices: list[HeadSlice] = field(default_factory=list)

    @property
    def collectives_per_layer(self) -> dict[int, int]:
        """Decoder-layer index -> number of all-reduces that layer issues in one forward."""
        counts: dict[int, int] = {}
        for entry in self.entries.values():
            if entry.layer is None:
                continue
            counts.setdefault(entry.layer, 0)
            if entry.all_reduce:
                counts[entry.layer] += 1
        return dict(sorted(counts.items()))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "architecture": self.architecture,
            "entries": [{**asdict(e), "style": e.style.value} for e in self.entries.values()],
            "attrs": [asdict(a) for a in self.attrs],
            "head_slices": [asdict(h) for h in self.head_slices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        def ranges(raw: list) -> list[Ranges]:
            return [[(int(a), int(b)) for a, b in per_rank] for per_rank in raw]

        entries = {}
        for raw in data["entries"]:
            raw = {**raw, "style": Style(raw["style"]), "ranges": ranges(raw["ranges"])}
            entries[raw["name"]] = Entry(**raw)
        return cls(
            world_size=int(data["world_size"]),
            architecture=data["architecture"],
            entries=entries,
            attrs=[AttrEdit(**a) for a in data["attrs"]],
            head_slices=[HeadSlice(**{**h, "ranges": ranges(h["ranges"])}) for h in data["head_slices"]],
        )

    # -- display -------------------------------------------------------------------------
    def __str__(self) -> str:
        from autotp.plan_table import format_plan

        return format_plan(self)


class ShardingError(ValueError):
    """A model, plan or world size autotp cannot shard correctly; the message says why and
    what to do."""
