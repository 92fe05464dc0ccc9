"""The extension's ops as C functions for a compiled decoding step (autotp.sharding.decode).

Inductor's C++ wrapper calls a custom op through the dispatcher: each call packs its arguments
into a stack of IValues, finds the op, passes torch's autograd fallback and is unboxed again
before it reaches the kernel. For an op listed in its ``aot_inductor.custom_ops_to_c_shims``
it calls a C function instead, ``aoti_torch_cpu_<op>`` with the C shim calling convention
(csrc/c_shims.cpp defines them). A decoding step makes about a hundred such
calls (every GEMM, all-reduce and attention), each after a GEMM's weight stream has evicted the
code it runs, so the shorter path is paid for in cache misses avoided, not only in instructions.

The compiled wrapper is a shared library of its own, loaded after the extension: it finds the
functions only if the extension's symbols are global, which :func:`c_shims` arranges (the
extension is loaded, by torch, with local symbols).
"""
from __future__ import annotations

import ctypes
import os

import torch

_T = "AtenTensorHandle"
# op -> its C shim declaration (what inductor declares extern "C" in the wrapper it generates)
DECLARATIONS = {
    "linear_bf16": f"AOTITorchError aoti_torch_cpu_linear_bf16({_T} x, {_T} packed, {_T}* bias, int64_t out_features, "
                   f"int32_t* out_dtype, const char* isa, {_T}* ret0)",
    "linear_int8": f"AOTITorchError aoti_torch_cpu_linear_int8({_T} x, {_T} qpacked, {_T} spacked, {_T}* bias, "
                   f"int64_t out_features, int64_t group_size, int64_t group_offset, int32_t* out_dtype, "
                   f"const char* isa, int64_t activation_bits, {_T}* ret0)",
    "linear_int4": f"AOTITorchError aoti_torch_cpu_linear_int4({_T} x, {_T} qpacked, {_T} spacked, {_T}* zpacked, "
                   f"{_T}* bias, int64_t out_features, int64_t group_size, int64_t group_offset, "
                   f"int32_t* out_dtype, const char* isa, {_T}* ret0)",
    "decode_attention": f"AOTITorchError aoti_torch_cpu_decode_attention({_T} q, {_T} key, {_T} value, {_T}* bias, "
                        f"double scale, const char* isa, {_T}* ret0)",
    "shm_all_reduce": f"AOTITorchError aoti_torch_cpu_shm_all_reduce({_T} tensor, int64_t comm, {_T}* ret0)",
    "shm_all_gather_last_dim": f"AOTITorchError aoti_torch_cpu_shm_all_gather_last_dim({_T} tensor, int64_t comm, "
                               f"const int64_t* sizes, int64_t sizes_len, {_T}* ret0)",
}

_GLOBAL: bool | None = None


class ShimTable(dict):
    """The op -> declarations dict inductor's config takes, pickled by op names: inductor keys its
    on-disk cache of compiled graphs by the pickled config, and an op object does not pickle
    (the cache was bypassed: the step compiled again in every process)."""

    def __reduce__(self):
        return (dict, (sorted((str(op), decls) for op, decls in self.items()),))


def _extension_path() -> str | None:
    for path in torch.ops.loaded_libraries:
        if os.path.basename(path).startswith("autotp_kernels"):
            return path
    return None


def c_shims() -> dict:
    """``aot_inductor.custom_ops_to_c_shims`` for the extension's ops (empty where the
    extension is not loaded or its symbols cannot be made global: the step then calls the ops
    through the dispatcher, as before)."""
    global _GLOBAL
    if _GLOBAL is None:
        path = _extension_path()
        try:
            if path is None:
                raise OSError("not loaded")
            lib = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
            _GLOBAL = all(hasattr(lib, decl.split("(")[0].split()[-1]) for decl in DECLARATIONS.values())
        except OSError:
            _GLOBAL = False
    if not _GLOBAL:
        return {}
    return ShimTable((getattr(torch.ops.autotp, name).default, [decl]) for name, decl in DECLARATIONS.items())
