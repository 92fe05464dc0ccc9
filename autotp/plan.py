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

from autotp.plan_table import format_plan

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

# Which dim of each parameter a style cuts (None: every rank holds it whole). Y = X A^T + b with
# A [out, in]: COLUMN and VOCAB keep rows of A (and of b), ROW keeps columns of A and adds b
# once after the all-reduce. The layers, the checkpoint writer and the loaders all read this.
CUT_DIMS: dict[Style, dict[str, int | None]] = {
    Style.COLUMN: {"weight": 0, "bias": 0},
    Style.ROW: {"weight": 1, "bias": None},
    Style.VOCAB: {"weight": 0, "bias": 0},
    Style.REPLICATE: {},
}


def cut_dim(style: Style | None, param: str) -> int | None:
    """The dim of parameter ``param`` ('weight', 'bias', ...) that ``style`` cuts, None for whole."""
    return None if style is None else CUT_DIMS[style].get(param)


@dataclass
class Entry:
    """One module's share of the plan.

    ``ranges[r]`` lists the blocks of the split dimension that rank r keeps (out features for
    COLUMN and VOCAB, in features for ROW); blocks may repeat when KV heads are replicated.
    ``all_reduce`` marks a ROW entry whose output is summed across ranks. In a block whose
    attention and MLP outputs are added before anything reads them, the earlier row layer is
    ``deferred_to`` the later one, which lists it in ``fuses`` and all-reduces both at once.

    Most entries name a module (a Linear, or a layer that computes one: GPT-2's Conv1D stores
    its weight [in, out], ``transposed``). An entry with ``param_dim`` set names one parameter
    instead (a 3-D expert tensor [experts, out, in], say): its ranges cut that dim of it, and a
    ROW parameter's partial sums are all-reduced where the module owning it returns. A COLUMN
    entry with ``norm_width`` is a norm over a column-sharded activation of that global width
    (OLMo2's q_norm across all heads): its weights are cut like the activation, and its mean
    over the features becomes a local sum plus one all-reduce.
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
    transposed: bool = False
    param_dim: int | None = None
    norm_width: int | None = None

    def local_size(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.ranges[rank])

    @property
    def is_param(self) -> bool:
        """This entry names a parameter, not a module."""
        return self.param_dim is not None

    def cut_dim(self, param: str) -> int | None:
        """The dim of this module's parameter ``param`` (of the parameter itself, ``""``, for a
        parameter entry) that the entry's ranges cut; None: every rank holds it whole."""
        if self.is_param:
            return self.param_dim if param == "" and self.style in (Style.COLUMN, Style.ROW) else None
        if self.transposed and param == "weight" and self.style in (Style.COLUMN, Style.ROW):
            return 1 - CUT_DIMS[self.style]["weight"]
        return CUT_DIMS[self.style].get(param)


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
class ExpertSlice:
    """Expert parallelism for ``module`` (an experts block called as transformers' experts
    interface: hidden states, top-k expert indices, top-k weights): rank r holds whole experts
    ``ranges[r]`` of ``num_experts``; routing indices of the others become "not here"."""

    module: str
    num_experts: int
    ranges: list[Ranges]


@dataclass
class Plan:
    """The tensor-parallel plan of one model for one world size."""

    world_size: int
    architecture: str
    entries: dict[str, Entry] = field(default_factory=dict)
    attrs: list[AttrEdit] = field(default_factory=list)
    head_slices: list[HeadSlice] = field(default_factory=list)
    expert_slices: list[ExpertSlice] = field(default_factory=list)

    def cut(self, key: str) -> tuple[Entry | None, int | None]:
        """The entry covering state-dict ``key`` and the dim of it that entry cuts (None: whole)."""
        entry = self.entries.get(key)
        if entry is not None and entry.is_param:
            return entry, entry.cut_dim("")
        module, _, param = key.rpartition(".")
        entry = self.entries.get(module)
        if entry is None or entry.is_param:
            return None, None
        return entry, entry.cut_dim(param)

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
            "expert_slices": [asdict(x) for x in self.expert_slices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan ``to_dict`` wrote; malformed data raises ValueError (or KeyError / TypeError
        for a missing or mistyped field) instead of giving a plan that fails later."""
        def ranges(raw: list) -> list[Ranges]:
            return [[(_count(a), _count(b)) for a, b in per_rank] for per_rank in raw]

        entries = {}
        for raw in data["entries"]:
            raw = {**raw, "style": Style(raw["style"]), "ranges": ranges(raw["ranges"])}
            entries[raw["name"]] = Entry(**raw)
        plan = cls(
            world_size=_count(data["world_size"]),
            architecture=data["architecture"],
            entries=entries,
            attrs=[AttrEdit(**a) for a in data["attrs"]],
            head_slices=[HeadSlice(**{**h, "ranges": ranges(h["ranges"])}) for h in data["head_slices"]],
            expert_slices=[ExpertSlice(**{**x, "ranges": ranges(x["ranges"])}) for x in data.get("expert_slices", [])],
        )
        plan.check()
        return plan

    def check(self) -> None:
        """Raise ValueError unless every field has its type and every per-rank list has one
        item per rank (what ``apply_plan`` relies on)."""
        ws = self.world_size
        if not isinstance(self.architecture, str) or ws < 1:
            raise ValueError(f"plan: architecture must be a string and world_size positive, got "
                             f"{self.architecture!r}, {ws!r}")
        names = set(self.entries)
        for name, e in self.entries.items():
            where = f"plan entry {name!r}"
            if not isinstance(e.name, str) or not e.name or not all(isinstance(x, str) for x in [*e.fuses]):
                raise ValueError(f"{where}: name and fuses must be strings")
            if e.ranges and len(e.ranges) != ws or e.style != Style.REPLICATE and len(e.ranges) != ws:
                raise ValueError(f"{where}: ranges must list {ws} ranks, got {len(e.ranges)}")
            if any(a >= b for per_rank in e.ranges for a, b in per_rank):
                raise ValueError(f"{where}: every range must be [start, stop) with start < stop")
            for field_name in ("layer", "unit"):
                value = getattr(e, field_name)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise ValueError(f"{where}: {field_name} must be an integer")
            if e.norm_width is not None and (not isinstance(e.norm_width, int) or e.norm_width < 1):
                raise ValueError(f"{where}: norm_width must be a positive integer or null")
            if not isinstance(e.transposed, bool) or e.param_dim is not None and (
                    not isinstance(e.param_dim, int) or isinstance(e.param_dim, bool) or e.param_dim < 0):
                raise ValueError(f"{where}: transposed must be a boolean and param_dim a dim or null")
            if not isinstance(e.all_reduce, bool) or not isinstance(e.heads, list) \
                    or not all(isinstance(h, int) for h in e.heads):
                raise ValueError(f"{where}: all_reduce must be a boolean and heads a list of integers")
            for link in (e.tied_to, e.deferred_to, *e.fuses):
                if link is not None and link not in names:
                    raise ValueError(f"{where}: refers to {link!r}, which the plan does not have")
        for a in self.attrs:
            if not (isinstance(a.module, str) and isinstance(a.attr, str) and isinstance(a.values, list)
                    and len(a.values) == ws and all(isinstance(v, int) for v in a.values)):
                raise ValueError(f"plan attribute edit {a.module!r}.{a.attr!r}: needs one integer per rank")
        for x in self.expert_slices:
            if not (isinstance(x.module, str) and isinstance(x.num_experts, int) and len(x.ranges) == ws
                    and all(len(r) == 1 for r in x.ranges)):
                raise ValueError(f"plan expert slice of {x.module!r}: needs module, num_experts and one range "
                                 f"per rank for {ws} ranks")
        for h in self.head_slices:
            if not (isinstance(h.module, str) and isinstance(h.kwarg, str) and isinstance(h.num_heads, int)
                    and len(h.ranges) == ws):
                raise ValueError(f"plan head slice of {h.module!r}: needs module, kwarg, num_heads and {ws} ranges")

    # -- display -------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_plan(self)


def _count(value: Any) -> int:
    """A non-negative integer from JSON (not a bool, not a float, not a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


class ShardingError(ValueError):
    """A model, plan or world size autotp cannot shard correctly; the message says why and
    what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file, the
    field and what to do."""
