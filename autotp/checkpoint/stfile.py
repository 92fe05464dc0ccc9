"""safetensors files, one tensor at a time.

The format: 8 bytes of little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, optional "__metadata__"), then the tensors' bytes back to back. We read
headers ourselves so that a rank can (a) map its own file and use the tensors in place, with
no copy, and (b) read only a slice of a source tensor with positioned reads, leaving no mapping
of the rest resident; and we write rank files tensor by tensor, hashing as we go.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from autotp.plan import CheckpointError, Ranges

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (name -> TensorInfo) and its string metadata. Whatever
    the bytes, the result is a header whose every tensor lies inside the file with exactly
    shape x element size bytes, no two overlapping, or a CheckpointError naming the file and
    the field; nothing larger than the header is read or allocated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a complete safetensors file (truncated or corrupt header); "
                                  "re-create or re-download it")
        raw = f.read(length)
    header = parse_header(raw, str(path))
    infos = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(name, entry, 8 + length, size, str(path))
        infos[name] = info
        spans.append((info.start, info.end, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors '{first}' and '{second}' overlap (field data_offsets); the file "
                                  "is corrupt: re-create or re-download it")
    return infos, header.get("__metadata__") or {}


def parse_header(raw: bytes, where: str) -> dict:
    """The JSON object of a safetensors header, with a well-formed ``__metadata__`` (string to
    string) if present; anything else is a CheckpointError."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise CheckpointError(f"{where} has an unreadable safetensors header (not JSON); re-create it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header must be a JSON object, got {type(header).__name__}; "
                              "re-create it")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{where}: field __metadata__ of the safetensors header must map strings to strings; "
                              "re-create it")
    return header


def _tensor_info(name: str, entry: object, data_start: int, size: int, where: str) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative integers, and
    data_offsets [begin, end] inside the file holding exactly the tensor's bytes."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: tensor '{name}' has {why} (field {field}); the file is corrupt or "
                               "not a safetensors file: re-create or re-download it")

    if not isinstance(entry, dict):
        raise bad("the entry", f"a header entry that is not an object ({type(entry).__name__})")
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise bad("dtype", f"an unknown dtype {entry.get('dtype')!r} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape", f"a shape that is not a list of non-negative integers: {shape!r}")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad("data_offsets", f"data_offsets that are not two non-negative integers: {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise bad("data_offsets", f"data_offsets out of order: {begin} > {end}")
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if end - begin != nbytes:
        raise bad("data_offsets", f"{end - begin} bytes where shape {shape} of {entry['dtype']} needs {nbytes}")
    if data_start + end > size:
        raise CheckpointError(f"{where} is truncated: tensor '{name}' ends at byte {data_start + end} of {size}; "
                              "re-create or re-download it")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def map_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` as a view of one private memory map: nothing is read until used."""
    infos, _ = read_header(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=os.path.getsize(path))
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    return {name: _view(flat[i.start:i.end], i) for name, i in infos.items()}


def _view(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The bytes of one tensor as that tensor: a view where they are aligned to its element size
    (as every writer we know aligns them), else a copy."""
    if info.start % torch.empty(0, dtype=info.dtype).element_size():
        raw = raw.clone()
    return raw.view(info.dtype).reshape(info.shape)


class MappedRegions:
    """Address ranges of private file maps made by :func:`map_tensors`, so that a tensor known to
    lie inside one can hand its pages back once it has been copied elsewhere (packed, say)."""

    MADV_DONTNEED = 4

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for t in tensors.values():
            storage = t.untyped_storage()
            self.ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
            return  # every tensor of one map shares its storage

    def release(self, tensor: torch.Tensor) -> None:
        """Drop this process's pages under ``tensor`` if it is a view of one of the maps (the file
        is untouched: the map is private and never written, so a later read faults them back
        in). Partial pages at either end are kept: they may hold a neighbour's bytes."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), self.MADV_DONTNEED)


def _read_into(f: BinaryIO, offset: int, out: torch.Tensor) -> None:
    """Fill ``out`` from byte ``offset`` of ``f`` with positioned reads straight into its memory."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{f.name} ended early while reading at byte {offset + done}; re-create it")
        done += got


def read_slice(f: BinaryIO, info: TensorInfo, dim: int | None, ranges: Ranges | None) -> torch.Tensor:
    """Read the [start, stop) blocks of ``info`` along ``dim`` (all of it when ``dim`` is None),
    concatenated, with positioned reads into the result: no temporary copies."""
    shape = info.shape
    if dim is None or not ranges:
        out = torch.empty(shape, dtype=info.dtype)
        _read_into(f, info.start, out)
        return out
    row_bytes = (info.end - info.start) // max(shape[0], 1)
    if dim == 0:
        out = torch.empty((sum(b - a for a, b in ranges), *shape[1:]), dtype=info.dtype)
        at = 0
        for a, b in ranges:
            _read_into(f, info.start + a * row_bytes, out[at:at + b - a])
            at += b - a
        return out
    if dim != 1 or len(shape) != 2:
        raise CheckpointError(f"cannot slice '{info.name}' of shape {shape} along dim {dim}")
    out = torch.empty((shape[0], sum(b - a for a, b in ranges)), dtype=info.dtype)
    size = out.element_size()
    raw = memoryview(out.view(torch.uint8).numpy()).cast("B")
    local_row = out.shape[1] * size
    for row in range(shape[0]):  # each row's column blocks, read in place
        at = row * local_row
        buffers = []
        for a, b in ranges:
            buffers.append(raw[at:at + (b - a) * size])
            at += (b - a) * size
        for (a, b), buf in zip(ranges, buffers):
            if os.preadv(f.fileno(), [buf], info.start + row * row_bytes + a * size) != len(buf):
                raise CheckpointError(f"{f.name} ended early in tensor '{info.name}'; re-create it")
    return out


class ShardFileWriter:
    """Writes one safetensors file whose tensors are known in advance, in that order, one call
    per tensor; returns size and sha256 on close. Larger elements come first, so every tensor
    starts aligned to its element size and can be used in place from a memory map."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        self.specs = sorted(specs, key=lambda s: -torch.empty(0, dtype=s[1]).element_size())
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in self.specs:
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.next, self.sha = Path(path), 0, hashlib.sha256()
        self.file = open(path, "wb")
        self._emit(len(raw).to_bytes(8, "little") + raw)

    @property
    def order(self) -> list[str]:
        return [name for name, _, _ in self.specs]

    def _emit(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.specs[self.next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
        self._emit(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> tuple[int, str]:
        if self.next != len(self.specs):
            raise AssertionError(f"{self.path}: {len(self.specs) - self.next} tensors were never written")
        self.file.close()
        return self.path.stat().st_size, self.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()


def sha256_of(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            sha.update(chunk)
    return sha.hexdigest()
