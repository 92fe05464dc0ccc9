"""Transparent huge pages for the weights a decoding step streams.

A decoding step reads every weight once from memory. On 4 KiB pages the CPU's hardware
prefetchers stop at each page boundary and every 4 KiB costs a TLB walk; on 2 MiB pages a
GEMV streams further ahead. Measured on an AMD EPYC Zen 4 VM (one thread, a bf16 GEMV over
400 MB of weights, 4 KiB and 2 MiB pages interleaved in one process): 1.34-1.59x the bytes per
second, with one process or two at once (``tools/bench_pages.py``).

torch allocates with ``malloc`` (huge pages only where the system's mode is ``always`` or
``THP_MEM_ALLOC_ENABLE=1`` was set before torch started). Here a weight is copied once, after
loading and packing, into an anonymous mapping aligned to the huge page size and marked
``MADV_HUGEPAGE`` before it is first written, so the kernel backs it with huge pages whenever
the mode is ``madvise`` or ``always``. Where there are none (not Linux, mode ``never``, a
Python without ``mmap.MADV_HUGEPAGE``) nothing moves; the values never change either way.
"""
from __future__ import annotations

import functools
import mmap
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

THP = Path("/sys/kernel/mm/transparent_hugepage")


@functools.lru_cache(maxsize=None)
def huge_page_size() -> int | None:
    """The transparent huge page size in bytes, or None where this process cannot ask for them."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        mode = (THP / "enabled").read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def empty(nbytes: int) -> torch.Tensor | None:
    """An uninitialised uint8 tensor of ``nbytes`` whose memory starts on a huge page boundary
    and is marked for huge pages before its first write; None where there are none."""
    size = huge_page_size()
    if size is None or nbytes <= 0:
        return None
    span = -(-nbytes // size) * size
    region = mmap.mmap(-1, span + size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while it lives
    start = -whole.data_ptr() % size  # a multiple of the base page: mmap returns page-aligned memory
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError:
        return None
    return whole[start:start + nbytes]


def copy_to_huge_pages(tensor: torch.Tensor) -> torch.Tensor | None:
    """A contiguous copy of ``tensor`` on huge pages (same dtype, shape and values), or None."""
    raw = empty(tensor.numel() * tensor.element_size())
    if raw is None:
        return None
    out = raw.view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


def _independent(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of one storage that no other of them overlaps (a weight and a view of it
    must keep sharing memory, so neither moves; disjoint slices of one file mapping can)."""
    spans = sorted((t.storage_offset() * t.element_size(), (t.storage_offset() + t.numel()) * t.element_size(), i)
                   for i, t in enumerate(tensors))
    clash = set()
    for (a0, a1, i), (b0, b1, j) in zip(spans, spans[1:]):
        if b0 < a1:
            clash.update((i, j))
    return [t for i, t in enumerate(tensors) if i not in clash]


_ARENAS: set[int] = set()  # storages whose tensors stay where they are (every Arena's)
_ALIGN = 64  # bytes between two tensors of an arena (a cache line: the kernels' vector loads)


def place_on_huge_pages(model: nn.Module, min_bytes: int = 1 << 20) -> int:
    """Move each contiguous parameter and buffer of ``model`` of at least ``min_bytes`` onto huge
    pages: one arena for all of them (a mapping per tensor would round each up to a whole huge
    page), filled one tensor at a time so that the old memory goes as each is replaced (unless
    something else holds it). Tied weights stay tied (a Parameter moves once, for all its
    modules). Returns the bytes moved; 0 where the system has no huge pages."""
    if huge_page_size() is None:
        return 0
    by_storage: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.device.type != "cpu" or not t.is_contiguous():
            continue
        seen.add(id(t))
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    chosen = [t for ptr, group in by_storage.items() if ptr not in _ARENAS for t in _independent(group)
              if t.numel() * t.element_size() >= min_bytes]
    return _into_one_arena(chosen, lambda i, place: setattr(chosen[i], "data", place))


class Arena:
    """One buffer handed out in order, each piece at a cache line (``take``); its storage is
    kept where it is: :func:`place_on_huge_pages` moves none of its tensors (pieces that must
    stay views of it, autotp.sharding.siblings, or that are on huge pages already)."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw, self.offset = raw, 0
        _ARENAS.add(raw.untyped_storage().data_ptr())

    @classmethod
    def new(cls, nbytes: int, huge_pages: bool = True) -> "Arena":
        """An arena of ``nbytes``: on huge pages where asked and offered, else from the allocator."""
        raw = empty(nbytes) if huge_pages else None
        return cls(raw if raw is not None else torch.empty(nbytes, dtype=torch.uint8))

    @staticmethod
    def span(nbytes: int) -> int:
        """Bytes a piece of ``nbytes`` takes, up to the next piece."""
        return -(-nbytes // _ALIGN) * _ALIGN

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next piece, uninitialised, as a tensor of ``shape`` and ``dtype``."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out = self.raw[self.offset:self.offset + nbytes].view(dtype).view(shape)
        self.offset += self.span(nbytes)
        return out


def _into_one_arena(tensors: list[torch.Tensor], put: Callable[[int, torch.Tensor], None]) -> int:
    """Copies of ``tensors`` in one new huge-page arena, each handed to ``put(i, copy)`` as soon
    as it is made (so that the caller can drop tensor i before the next is copied). Returns the
    arena's bytes; 0 (and no call) where there are no huge pages."""
    raw = empty(sum(Arena.span(t.numel() * t.element_size()) for t in tensors))
    if raw is None:
        return 0
    arena = Arena(raw)
    for i, t in enumerate(tensors):
        place = arena.take(tuple(t.shape), t.dtype)
        place.copy_(t.detach())
        put(i, place)
    return arena.offset


def place_cache_on_huge_pages(cache) -> int:
    """Move the keys and values a KV cache's layers have allocated (transformers' static cache
    does so at its first forward, with ``torch.zeros``) onto huge pages, as
    :func:`place_on_huge_pages` does for weights: one arena, one tensor at a time, values
    unchanged, each new tensor marked as a static address as the cache marks its own. A
    decoding step reads the whole filled cache (measured on an AMD EPYC Zen 4, one thread,
    GPT-J-1B's shape, 75 MB per rank at 4 beams over 288 positions: decode attention 3.81 ms on
    4 KiB pages, 3.56 on huge pages; tools/bench_attention.py). Tensors already in an arena
    stay. Returns the bytes moved; 0 where the system has no huge pages."""
    if huge_page_size() is None:
        return 0
    chosen = []
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if (getattr(layer, "is_initialized", False) and isinstance(t, torch.Tensor) and t.device.type == "cpu"
                    and t.is_contiguous() and t.untyped_storage().data_ptr() not in _ARENAS):
                chosen.append((layer, name, t))

    def put(i: int, place: torch.Tensor) -> None:
        layer, name, _ = chosen[i]
        setattr(layer, name, place)
        torch._dynamo.mark_static_address(place)

    return _into_one_arena([t for _, _, t in chosen], put)


def huge_bytes(tensor: torch.Tensor) -> int:
    """How many bytes of the mappings holding ``tensor``'s first and last bytes the kernel
    backs with huge pages (``AnonHugePages`` in /proc/self/smaps; 0 where it cannot be read)."""
    first = tensor.data_ptr()
    last = first + max(tensor.numel() * tensor.element_size() - 1, 0)
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= first < hi or lo <= last < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
