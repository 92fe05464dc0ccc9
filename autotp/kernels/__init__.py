"""The native kernels: a C++ extension compiled on first use, and the choice between it and torch.

``Runtime.kernels`` (``AUTOTP_KERNELS``) picks the side:
  ``auto`` (default)  native where it pays (bf16 or int8 weights, a vector path: AVX2 or
                      AVX-512, allowed by ``Runtime.isa``, the extension built), else torch,
                      saying once why native is off;
  ``native``          native, and an error naming the cause where it cannot run;
  ``torch``           always ``F.linear`` on plain weights.

The extension is compiled with the machine's g++ against the installed torch
(``torch.utils.cpp_extension.load``, cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); ranks starting together wait on the same build lock. Every
source compiles on any architecture (each ISA's file holds code only where its architecture
can run it), and the instruction sets it holds are listed best first (``csrc/kernel_list.cpp``).
The one piece of state here is the handle of that extension: built or not, which ISAs this CPU
runs, which the first-use self-check switched off (``autotp.kernels.selfcheck``), and what it
has said.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# weight-only INT4: its definition and layouts (re-exported here beside INT8's)
from autotp.kernels.int4 import (GROUP_N, dequantize_int4, group_major, group_view, linear_int4,  # noqa: F401
                                 pack_int4, pair_major, prepack_int4, quantize_int4, ungroup_major, unpack_int4,
                                 unpair_major, unprepack_int4)
from autotp.kernels.selfcheck import check_paths
from autotp.runtime import ENV_NAMES, ISAS, Runtime, put_on_path, resolve

ENV = ENV_NAMES["kernels"]
FAST_ISAS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")  # paths Runtime(kernels="auto") uses; "generic" is the spec, run when forced


def _ensure_ninja_on_path() -> None:
    """torch's JIT build runs ``ninja``; a venv that installed the ninja wheel has it beside
    its python, which is not on PATH unless the venv is activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]
        candidates.append(Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            put_on_path(folder)
            return


PORTABLE_FLAG = "-DAUTOTP_PORTABLE_ONLY"  # csrc/kernel_table.h: leave the x86 tables out


def build_name(csrc: Path, cflags: list[str], portable: bool) -> str:
    """The build's name, which is also its cache folder under torch's extensions directory: the
    sources' folder and contents, the flags and torch's version hashed into it. Two checkouts
    (whose build files name different source paths), or two versions of the sources, keep
    separate builds instead of recompiling over each other's on every switch; a checkout whose
    sources are unchanged finds its build again."""
    digest = hashlib.sha256(f"{csrc.resolve()} {torch.__version__} {' '.join(cflags)}".encode())
    for path in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"autotp_kernels{'_portable' if portable else ''}_{digest.hexdigest()[:12]}"


CSRC = Path(__file__).parent / "csrc"


def _cflags(portable: bool) -> list[str]:
    return ["-O3", "-fopenmp", *([PORTABLE_FLAG] if portable else [])]


@functools.lru_cache(maxsize=None)
def build_tag(portable: bool = False) -> str:
    """The name of the extension build these sources make (:func:`build_name`). Code compiled
    against the extension's ops (the compiled decoding step, autotp.sharding.decode) is cached
    under it, so that a cached step never calls ops whose signatures have changed since."""
    return build_name(CSRC, _cflags(portable), portable)


def _build(verbose: bool = False, portable: bool = False) -> list[str]:
    """Compile (or find cached) and load the extension; returns the ISAs it holds that this CPU
    runs, best first. ``portable`` builds the generic code only (what a CPU architecture without
    x86 tables gets), under its own name so that both builds stay cached. Raises with the
    compiler's message when the build fails."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    sources = sorted(CSRC.glob("*.cpp"))
    cflags = _cflags(portable)
    load(name=build_tag(portable), sources=[str(p) for p in sources], extra_cflags=cflags,
         extra_ldflags=["-fopenmp", "-lrt"], is_python_module=False, verbose=verbose)
    return list(torch.ops.autotp.cpu_isas())


class Extension:
    """The handle of the C++ extension: built once per process, on first need, and what it has
    already warned about (so each reason is said once)."""

    def __init__(self, build: Callable[[bool, bool], list[str]] = _build,
                 check: Callable[[list[str]], dict[str, str]] = check_paths) -> None:
        self._build, self._check = build, check
        self._lock = threading.Lock()
        self.built: bool | None = None  # None: not tried yet
        self.cpu_isas: list[str] = []  # what this CPU runs, best first, less what the self-check switched off
        self.disabled: dict[str, str] = {}  # ISA -> why the self-check switched it off
        self.error = ""
        self.portable = False  # built with the portable code only (Runtime.portable_build)
        self.said: set[str] = set()

    def load(self, verbose: bool = False, portable: bool = False) -> bool:
        """Build and load on the first call (``portable``: the generic code only); later calls
        return whether that worked."""
        disabled: dict[str, str] = {}  # what this call's first load switched off, to say once
        with self._lock:
            if self.built is None:
                try:
                    isas = self._build(verbose, portable)
                    self.built, self.portable = True, portable
                except Exception as exc:  # a missing compiler, headers, ninja: the message says which
                    self.built, self.error = False, f"the C++ extension did not build or load: {exc}"
                if self.built:
                    _register_fakes()
                    self.disabled = disabled = self._check(isas)
                    self.cpu_isas = [i for i in isas if i not in self.disabled]
        for name, why in disabled.items():
            self.warn_once(f"autotp: the {name} kernels are switched off on this CPU: {why}; running the next "
                           f"path down. Please report this with your CPU model (lscpu).")
        return bool(self.built)

    def warn_once(self, message: str) -> None:
        with self._lock:
            if message in self.said:
                return
            self.said.add(message)
        warnings.warn(message, stacklevel=3)


_EXTENSION = Extension()


def extension_loaded(runtime: Runtime | None = None) -> bool:
    """Whether the C++ extension built and loaded (the shared-memory all-reduce and the read
    probe need only this; the GEMM also needs an instruction set it has code for). Builds on
    first call."""
    rt = resolve(runtime)
    return _EXTENSION.load(rt.verbose_build, rt.portable_build)


def _op(name: str) -> Any:
    """The extension's op ``name``, building the extension first where this process has not yet
    (so that any call may come first); a clear error where it cannot be built."""
    if _EXTENSION.built is None:
        extension_loaded()
    if not _EXTENSION.built:
        raise RuntimeError(f"autotp.kernels: {name} needs the C++ extension, which is not available here "
                           f"({_EXTENSION.error}); see autotp.kernels.status() and the README's 'Native BF16 kernels' section")
    return getattr(torch.ops.autotp, name)


def available_isas(runtime: Runtime | None = None) -> list[str]:
    """The instruction sets native code may use under ``runtime``, best first: those this CPU
    runs (and the self-check kept) up to ``Runtime.isa``; empty when the extension is not built."""
    rt = resolve(runtime)
    if not extension_loaded(rt):
        return []
    cap = len(ISAS) if rt.isa == "auto" else ISAS.index(rt.isa) + 1
    return [i for i in _EXTENSION.cpu_isas if ISAS.index(i) < cap]


def isa(runtime: Runtime | None = None) -> str:
    """The instruction set native code runs with under ``runtime``: the best of
    :func:`available_isas`; "" when the extension is not built."""
    isas = available_isas(runtime)
    return isas[0] if isas else ""


def status(runtime: Runtime | None = None) -> tuple[bool, str]:
    """(whether the native GEMM runs under ``runtime``, which ISA / why not). With
    ``kernels="auto"`` only the vector paths count (the generic one is the spec, slower than
    torch); with ``kernels="native"`` the generic path counts too. Builds on first call."""
    rt = resolve(runtime)
    if not extension_loaded(rt):
        return False, _EXTENSION.error
    chosen = isa(rt)
    if chosen in FAST_ISAS or (chosen and rt.kernels == "native"):
        return True, chosen
    if _EXTENSION.portable:
        return False, (f"the extension was built from its portable code only ({ENV_NAMES['portable_build']}=1): its "
                       f"generic GEMM runs with {ENV}=native")
    if any(i in FAST_ISAS for i in _EXTENSION.cpu_isas):
        return False, (f"{ENV_NAMES['isa']}={rt.isa} caps native code at {chosen}, which only runs with "
                       f"{ENV}=native (it is the spec the vector paths are checked against, not faster than torch)")
    return False, ("this CPU has neither AVX2 + FMA nor AVX-512, which the fast native GEMMs need (the generic "
                   f"one runs with {ENV}=native)")


def native_enabled(dtype: torch.dtype = torch.bfloat16, runtime: Runtime | None = None) -> bool:
    """Whether layers with weights of ``dtype`` should use the native GEMM under ``runtime``
    (``Runtime.kernels``). Warns once (``auto``) or raises (``native``) when the native side
    cannot run."""
    rt = resolve(runtime)
    if rt.kernels == "torch":
        return False
    if dtype not in (torch.bfloat16, torch.int8, torch.uint8):  # uint8: INT4, two values per byte
        if rt.kernels == "native":
            _EXTENSION.warn_once(f"autotp: {ENV}=native covers bfloat16, int8 and int4 weights; {dtype} layers run "
                                 "on torch")
        return False
    ok, why = status(rt)
    if ok:
        return True
    if rt.kernels == "native":
        raise RuntimeError(f"autotp: {ENV}=native but the native kernels cannot run: {why}. "
                           f"Unset {ENV} (or set it to torch) to run on torch kernels.")
    _EXTENSION.warn_once(f"autotp: native kernels off, running on torch: {why}")
    return False


def read_probe(buffer: torch.Tensor, runtime: Runtime | None = None) -> int:
    """Read every byte of ``buffer`` once on ATen's threads (a measure of read bandwidth, for
    benchmarks) with the loads of ``runtime``'s ISA (portable ones with ``isa="generic"``).
    Needs the extension built (:func:`extension_loaded`); returns the XOR of every 8-byte word
    (the same on every path)."""
    return _op("read_probe")(buffer, isa(runtime))


def weight_prefetch(on: bool | None = None) -> bool:
    """Whether the native GEMM tiles that only stream their weights prefetch them in software,
    after setting it to ``on`` (None: leave it): the AVX512-BF16 bf16 tile, and the INT8 and
    bf16 tiles of at most 2 activation rows (tiles of more rows, INT4's and AMX's always
    prefetch), and decode attention's read-ahead of the KV cache (csrc/attention_tiles.h). One
    switch for the whole process; the results are the same either way, only
    the speed differs. The default is the CPU's: off on AMD CPUs with AVX-512, where the
    hardware prefetchers keep ahead of such a stream and the extra instructions cost time (AMD
    EPYC Zen 4, 2 ranks: 0.80-1.00x the time off), on elsewhere, AMD Zen 1-3 included, whose
    AVX2 tiles gain from it (Zen 3: bf16 1.06x at 4 pairs ahead, :func:`weight_prefetch_pairs`;
    INT8 1.08-1.14x) (csrc/kernel_table.h).
    ``tools/bench_prefetch.py`` measures both on the machine at hand. Needs the extension
    built (:func:`extension_loaded`)."""
    return bool(_op("weight_prefetch")(-1 if on is None else int(bool(on))))


def weight_prefetch_pairs(pairs: int | None = None) -> int:
    """How many K pairs of packed weight ahead (rows of 256 bytes) the AVX2 and AVX-512 bf16
    GEMM tiles of at most 2 activation rows prefetch when they do (:func:`weight_prefetch`),
    after setting it to ``pairs`` (None: leave it; 0-256); more rows, INT8 and the other tiles
    keep their own distances. The default is the CPU's: 4 on AMD CPUs without AVX-512 (Zen
    1-3), 16 elsewhere (csrc/kernel_table.h). Results are the same at any distance. Needs the
    extension built (:func:`extension_loaded`)."""
    return int(_op("weight_prefetch_pairs")(-1 if pairs is None else int(pairs)))


OP_KINDS = ("gemm", "collective", "attention")


def op_clock(on: bool | None = None) -> dict[str, tuple[float, int]]:
    """Seconds spent inside autotp's ops and calls made, by kind, since the last read (which
    resets them), then starts (``on=True``) or stops (``on=False``) the clock (None: leaves it).
    Kinds (OP_KINDS): ``gemm`` (linear_bf16 / int8 / int4: the lm_head too, where autotp runs
    it), ``collective`` (the shared-memory all-reduce and all-gather, waiting for the other ranks
    included), ``attention`` (decode_attention). The clock is off until started; while off the
    ops add nothing. Needs the extension built (:func:`extension_loaded`)."""
    read = _op("op_clock")(-1 if on is None else int(bool(on)))
    return {kind: (read[2 * i] * 1e-9, int(read[2 * i + 1])) for i, kind in enumerate(OP_KINDS)}


def reorder_rows_(tensors: list[torch.Tensor], sources: torch.Tensor, length: int,
                  starts: torch.Tensor | None = None) -> None:
    """Beam search's cache reorder, in place: row ``b`` (dim 0) of every contiguous
    ``[batch, heads, positions, dim]`` tensor becomes what row ``sources[b]`` held, over the first
    ``length`` positions (from position ``starts[b]`` on, where given: the caller knows the rows
    agree before it); rows that keep their content are not touched, the tensors keep their
    storage. Needs the extension built (:func:`extension_loaded`)."""
    _op("reorder_rows_")(tensors, sources, length, starts)


def decode_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                     scale: float, isa: str = "") -> torch.Tensor:
    """Attention of one query position over a bfloat16 KV cache in float32 math, without a
    float32 copy of the cache: ``q`` float32 or bfloat16 [batch, kv_heads, group, dim] (the group
    of query heads sharing a KV head; a bf16 model's query is best given as it is: AVX512-BF16
    then multiplies its bf16 pairs directly where a KV head serves 4 or more query heads), ``key`` / ``value`` bfloat16 [batch, kv_heads, length, dim],
    ``bias`` float32 [batch, 1 or kv_heads * group, length] added to the scores (0 / -inf for a
    boolean mask; positions at -inf for every head are not read) or None; returns float32
    [batch, kv_heads, group, dim]. Needs the extension built (:func:`extension_loaded`)."""
    return _op("decode_attention")(q, key, value, bias, scale, isa)


def serving_isa(isa: str, weight: str = "bf16", x_dtype: torch.dtype = torch.bfloat16, rows: int = 1) -> str:
    """The kernel table that serves a GEMM started at ``isa`` ("" the best this CPU runs) with
    ``weight`` ("bf16", "int8" or "int4") weights, activations of ``x_dtype`` and ``rows`` rows: a table
    that serves only bf16 activations, or only from some number of rows (AMX), hands the rest
    to the one below it. ``weight="attention"``: the table that serves :func:`decode_attention`
    (a table without its own, such as AVX512-VNNI, hands it down). Needs the extension built."""
    return _op("serving_isa")(isa, weight, x_dtype, rows)


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weight [N, K] -> the packed layout [ceil(N/64), ceil(K/2), 128] the GEMM reads:
    element (g, p, 32 j + 2 i + s) = W[64 g + 16 j + i, 2 p + s], zero past N or K."""
    return _op("prepack_bf16")(weight)


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """Shape of the packed form of an [out_features, in_features] weight."""
    return (-(-out_features // GROUP_N), -(-in_features // 2), 2 * GROUP_N)


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The plain [N, K] weight back from its packed layout."""
    return _op("unpack_bf16")(packed, out_features, in_features)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           out_dtype: torch.dtype | None = None, isa: str = "") -> torch.Tensor:
    """x @ W^T + bias with W packed by :func:`prepack`; fp32 accumulation, output in
    ``out_dtype`` (default: x's dtype), on the kernels of ``isa`` ("" the best this CPU runs)."""
    return _op("linear_bf16")(x, packed, bias, out_features, out_dtype, isa)


# -- weight-only INT8 ------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor, group_size: int | None = None, group_offset: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight-only INT8 of an [N, K] weight: per output row and group of
    ``group_size`` input columns (None: the whole row), scale = absmax / 127 (1 for an all-zero
    group) and Q = round(W / scale) in [-127, 127]. Returns (Q [N, K] int8, scales [N, KG]
    float32). With ``group_offset`` O the first group holds only G - O columns (column k is in
    group (k + O) // G): quantizing a slice of the whole with O = its start % G gives the
    slice of the quantized whole whenever the slice's first and last groups are complete in it."""
    n, k = weight.shape
    w, g = group_view(weight, group_size, group_offset)
    groups = w.shape[1]
    absmax = w.abs().amax(-1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8).view(n, groups * g)
    return q[:, group_offset:group_offset + k].contiguous(), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
                    group_offset: int = 0) -> torch.Tensor:
    """float32 Q * S, each product rounded once: the weight an INT8 layer stands for (the
    native GEMM multiplies Q by int16 activations and scales per segment: :func:`int8_segments`)."""
    k = q.shape[1]
    g = max(k, 1) if group_size is None else group_size
    per_column = scales.repeat_interleave(g, dim=1)[:, group_offset:group_offset + k]
    return q.float() * per_column


INT8_SEGMENT_K = 256  # K per segment at most (csrc/kernel_table.h: kInt8SegmentK)
INT8_X_MAX = 32767  # the int16 activations' range: scale = max |x| / this
INT8_X_MAX8 = 127  # the same for 8-bit activations (activation_bits=8)
ACTIVATION_BITS = {"int16": 16, "int8": 8}  # Runtime.int8_activations -> linear_int8's activation_bits


def int8_segments(in_features: int, group_size: int | None = None, group_offset: int = 0
                  ) -> list[tuple[int, int, int]]:
    """The segments the native INT8 GEMM cuts K into, in K order: (start, end, scale group) for
    each run of columns within one scale group and one chunk of INT8_SEGMENT_K columns."""
    g = max(in_features, 1) if group_size is None else group_size
    out, ks = [], 0
    while ks < in_features:
        t = (ks + group_offset) // g
        ke = min(in_features, (t + 1) * g - group_offset, (ks // INT8_SEGMENT_K + 1) * INT8_SEGMENT_K)
        out.append((ks, ke, t))
        ks = ke
    return out


def int8_activations(x: torch.Tensor, group_size: int | None = None, group_offset: int = 0,
                     activation_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The native INT8 GEMM's activations, by their definition (csrc/kernel_table.h): for each
    row of x [M, K] and each of :func:`int8_segments`, xs = max |x| / 32767 (127 with
    ``activation_bits=8``) in float32 and X = round-half-even(x / xs) (the quotient in float64)
    as int16; X and xs are 0 where xs is 0, X is 0 and xs NaN where the segment holds a NaN or an
    infinity. Returns (X [M, K] int16, xs [M, segments] float32). The GEMM is then, per segment,
    the exact integer sum of X * Q times xs * S (float32), the segments' terms added in K order."""
    if activation_bits not in (16, 8):
        raise ValueError(f"autotp.kernels.int8_activations: activation_bits must be 16 or 8, got {activation_bits!r}")
    x_max = INT8_X_MAX if activation_bits == 16 else INT8_X_MAX8
    x = x.float().reshape(-1, x.shape[-1])
    segments = int8_segments(x.shape[1], group_size, group_offset)
    xq = torch.zeros(x.shape, dtype=torch.int16)
    xs = torch.zeros(x.shape[0], len(segments))
    for e, (ks, ke, _) in enumerate(segments):
        part = x[:, ks:ke]
        scale = (part.abs().amax(1).double() / x_max).float()  # = the fp32 division (53 >= 2 * 24 + 2 bits)
        bad = ~part.isfinite().all(1)
        good = (scale > 0) & ~bad
        q = torch.round(part.double() / scale.double()[:, None]).clamp(-x_max, x_max)
        xq[:, ks:ke] = torch.where(good[:, None], q, 0).to(torch.int16)
        xs[:, e] = torch.where(bad, torch.nan, torch.where(good, scale, 0))
    return xq, xs


def prepack_int8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [N, K] int8, S [N, KG] fp32) -> the layouts linear_int8 reads: Q as [ceil(N/64),
    ceil(K/2), 128] with element (g, p, 2 c + r) = Q[64 g + c, 2 p + r] (each column's pair of K
    side by side), S as [ceil(N/64), KG, 64] with element (g, t, c) = S[64 g + c, t]; zero past N
    or K."""
    return pair_major(q), group_major(scales.float())


def unpack_int8(qpacked: torch.Tensor, spacked: torch.Tensor, out_features: int, in_features: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [N, K], S [N, KG]) back from the layouts of :func:`prepack_int8`."""
    return unpair_major(qpacked, out_features, in_features), ungroup_major(spacked, out_features)


def linear_int8(x: torch.Tensor, qpacked: torch.Tensor, spacked: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, group_size: int, group_offset: int = 0,
                out_dtype: torch.dtype | None = None, isa: str = "", activation_bits: int = 16) -> torch.Tensor:
    """x @ (Q S)^T + bias with Q, S packed by :func:`prepack_int8`, x taken as int16 per segment
    (:func:`int8_activations`: within max |x| / 65534 of x), or with ``activation_bits=8`` as
    int8 (within max |x| / 254: AVX512-VNNI then multiplies bytes, twice the products per
    instruction), and exact integer products; output in ``out_dtype`` (default: x's dtype), on
    the kernels of ``isa``. ``group_size`` and ``group_offset`` are as in :func:`quantize_int8`
    (``None`` there is ``group_size=K`` here)."""
    return _op("linear_int8")(x, qpacked, spacked, bias, out_features, group_size, group_offset,
                                        out_dtype, isa, activation_bits)


def _register_fakes() -> None:
    """Shape functions, so the ops trace under torch.compile / FakeTensor (and pass opcheck).
    Called once, by the extension handle, right after the extension loads."""

    @torch.library.register_fake("autotp::prepack_bf16")
    def _(weight):
        return weight.new_empty(packed_shape(*weight.shape))

    @torch.library.register_fake("autotp::unpack_bf16")
    def _(packed, out_features, in_features):
        return packed.new_empty((out_features, in_features))

    @torch.library.register_fake("autotp::linear_bf16")
    def _(x, packed, bias, out_features, out_dtype=None, isa=""):
        return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)

    @torch.library.register_fake("autotp::linear_int8")
    def _(x, qpacked, spacked, bias, out_features, group_size, group_offset=0, out_dtype=None, isa="",
          activation_bits=16):
        return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)

    @torch.library.register_fake("autotp::linear_int4")
    def _(x, qpacked, spacked, zpacked, bias, out_features, group_size, group_offset=0, out_dtype=None, isa=""):
        return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)

    @torch.library.register_fake("autotp::decode_attention")
    def _(q, key, value, bias, scale, isa=""):
        return torch.empty_like(q, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.library.register_fake("autotp::shm_all_reduce")
    def _(tensor, comm):
        return torch.empty_like(tensor, memory_format=torch.contiguous_format)

    @torch.library.register_fake("autotp::shm_all_gather_last_dim")
    def _(tensor, comm, sizes):
        return tensor.new_empty((*tensor.shape[:-1], sum(sizes)))
