"""What one traced forward shows: the units (weights multiplied by activations), their styles,
the sources (a unit, or a segment ``unit[a:b]`` of its output) that feed each row unit, and why
some cannot stay sharded."""
from __future__ import annotations

from dataclasses import dataclass, field

from autotp.plan import Style


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
