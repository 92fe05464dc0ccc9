"""4-bit checkpoints as Hugging Face stores them (GPTQ, AWQ), read as autotp's INT4.

A directory whose config.json has a ``quantization_config`` with ``quant_method`` "gptq" or
"awq" stores each quantized Linear ``<module>`` as packed int32 tensors instead of
``<module>.weight``. Both formats are (U - Z) * S per output column and group of G input
columns, U and Z 4-bit, S fp16: autotp's asymmetric INT4 (autotp.kernels.int4) with the zero
points stored as uint8 and the scales as fp32 (exact). What each format stores, for a weight
W [N, K] (out, in) with KG = K / G groups:

  GPTQ (AutoGPTQ, auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py: ``pack`` and the torch
  path of ``forward``; the "gptq" checkpoint format transformers loads through optimum):
    qweight int32 [K / 8, N]    bits 4j.. of qweight[r, n] = U[n, 8 r + j]
    qzeros  int32 [KG, N / 8]   bits 4j.. of qzeros[g, c]  = Z[8 c + j, g] - 1
    scales  fp16  [KG, N]       S[n, g]
    g_idx   int32 [K]           the group of each input column (k // G unless act-order)
  AWQ (AutoAWQ, awq/utils/packing_utils.py: ``unpack_awq``, ``reverse_awq_order``,
  ``dequantize_gemm``; "version": "gemm"):
    qweight int32 [K, N / 8]    bits 4i.. of qweight[k, c] = U[8 c + ORDER[i], k]
    qzeros  int32 [KG, N / 8]   bits 4i.. of qzeros[g, c]  = Z[8 c + ORDER[i], g]
    scales  fp16  [KG, N]       S[n, g]             ORDER = 0, 2, 4, 6, 1, 3, 5, 7

Each rank reads only what its slice needs: the columns (column-parallel) or the rows of whole
groups (row-parallel) of qweight and scales; qzeros (1/64 of the weight's bytes) whole.
Anything else is refused naming the field: other bit widths, act-order (a g_idx that is not
k // G), a quantized lm_head, AWQ versions other than "gemm" or without zero points, split
modules left unquantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from autotp.plan import CheckpointError, Ranges
from autotp.sharding.quantize import QuantLayout, QuantScheme, QuantShard
from autotp import kernels

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the AWQ "gemm" packing: nibble i holds column 8 c + AWQ_ORDER[i]
METHODS = ("gptq", "awq")
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)

# (tensor suffix, dim, ranges) -> those blocks of the stored tensor (dim None: all of it)
StoredReader = Callable[[str, int | None, Ranges | None], torch.Tensor]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> [..., C, 8]: nibble j of each word (bits 4j .. 4j + 3), as uint8."""
    return ((packed.to(torch.int32)[..., None] >> SHIFTS) & 15).to(torch.uint8)


@dataclass(frozen=True)
class PrequantizedFormat:
    """A checkpoint's ``quantization_config``: ``method`` "gptq" or "awq", ``group_size``
    (0: one group per row)."""

    method: str
    group_size: int

    @classmethod
    def from_config(cls, config: Any, where: str) -> "PrequantizedFormat | None":
        """The format ``config.quantization_config`` describes (None: not quantized); what autotp
        does not read is a CheckpointError naming the field."""
        raw = getattr(config, "quantization_config", None)
        if raw is None:
            return None
        raw = raw if isinstance(raw, dict) else getattr(raw, "to_dict", lambda: {})()
        method = str(raw.get("quant_method", "")).lower()
        if method not in METHODS:
            raise CheckpointError(f"{where}: quantization_config.quant_method is {raw.get('quant_method')!r}; autotp "
                                  f"reads {METHODS} 4-bit checkpoints (or quantizes an unquantized checkpoint with "
                                  "quantize='int8' / 'int4')")
        bits = raw.get("bits", raw.get("w_bit"))
        if bits != 4:
            raise CheckpointError(f"{where}: quantization_config.bits is {bits!r}; autotp reads {method} checkpoints "
                                  "of 4 bits only")
        group = raw.get("group_size", raw.get("q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or group == 0 or group < -1:
            raise CheckpointError(f"{where}: quantization_config.group_size is {group!r}; expected a positive number "
                                  "of input columns or -1 (one group per row)")
        if raw.get("lm_head"):
            raise CheckpointError(f"{where}: quantization_config.lm_head is true; autotp reads {method} checkpoints "
                                  "whose lm_head is unquantized (it splits the vocabulary in the model's dtype)")
        if method == "gptq" and raw.get("checkpoint_format", "gptq") != "gptq":
            raise CheckpointError(f"{where}: quantization_config.checkpoint_format is "
                                  f"{raw.get('checkpoint_format')!r}; autotp reads the \"gptq\" format (zero points "
                                  "stored minus one)")
        if method == "awq":
            if str(raw.get("version", "gemm")).lower() != "gemm":
                raise CheckpointError(f"{where}: quantization_config.version is {raw.get('version')!r}; autotp reads "
                                      "AWQ's \"gemm\" packing")
            if raw.get("zero_point", True) is not True:
                raise CheckpointError(f"{where}: quantization_config.zero_point is {raw.get('zero_point')!r}; autotp "
                                      "reads AWQ checkpoints with zero points")
        return cls(method, 0 if group == -1 else group)

    def scheme(self) -> QuantScheme:
        return QuantScheme("int4-asym", self.group_size)

    # -- one layer -----------------------------------------------------------------------------
    def check_groups(self, module: str, read: StoredReader, in_features: int) -> None:
        """GPTQ's g_idx must be k // G: act-order checkpoints (desc_act) permute the groups."""
        if self.method != "gptq":
            return
        try:
            g_idx = read("g_idx", None, None)
        except KeyError:
            return
        g = self.group_size or in_features
        if not torch.equal(g_idx.long(), torch.arange(in_features) // g):
            raise CheckpointError(f"{module}.g_idx is not k // group_size: the checkpoint was quantized with "
                                  "act-order (quantization_config.desc_act), whose group order autotp does not "
                                  "read; use a checkpoint made with desc_act=False")

    def shard(self, read: StoredReader, layout: QuantLayout, out_features: int, in_features: int) -> QuantShard:
        """This rank's INT4 shard under ``layout`` (autotp.sharding.quantize), read from the
        stored tensors of one layer."""
        n_all, k_all = out_features, in_features
        g = layout.group_size
        dim, ranges = layout.read_dim, layout.read_ranges
        if dim == 0:  # output rows: columns of every stored tensor
            u = torch.cat([self._values_columns(read, a, b, k_all) for a, b in ranges], dim=0)
            s = torch.cat([read("scales", 1, [(a, b)]) for a, b in ranges], dim=1).t()
            zeros = self._zeros(read, n_all)
            z = torch.cat([zeros[a:b] for a, b in ranges], dim=0)
        else:  # input columns [start, end) of whole groups, or everything
            start, end = ranges[0] if dim == 1 else (0, k_all)
            first, last = start // g, -(-end // g)
            u = self._values_rows(read, start, end, n_all)
            s = read("scales", 0, [(first, last)]).t()
            z = self._zeros(read, n_all)[:, first:last]
        a, b = layout.keep or (0, u.shape[1])
        return QuantShard(kernels.pack_int4(u[:, a:b].contiguous()), s.float().contiguous(), g, layout.group_offset,
                          z.contiguous(), 4)

    def _zeros(self, read: StoredReader, n: int) -> torch.Tensor:
        """Z [N, KG] uint8 (GPTQ stores Z - 1)."""
        nib = _nibbles(read("qzeros", None, None))  # [KG, N / 8, 8]
        if self.method == "awq":
            nib = nib[..., list(_inverse(AWQ_ORDER))]
        z = nib.reshape(nib.shape[0], -1)[:, :n].t()
        return z + 1 if self.method == "gptq" else z

    def _values_columns(self, read: StoredReader, a: int, b: int, k: int) -> torch.Tensor:
        """U[a:b, :] [b - a, K]: output rows a..b of the weight."""
        if self.method == "gptq":  # qweight [K / 8, N]: the columns themselves
            nib = _nibbles(read("qweight", 1, [(a, b)]))  # [K / 8, b - a, 8]
            return nib.permute(1, 0, 2).reshape(b - a, -1)[:, :k]
        c0, c1 = a // 8, -(-b // 8)  # AWQ qweight [K, N / 8]: the words holding them
        nib = _nibbles(read("qweight", 1, [(c0, c1)]))[..., list(_inverse(AWQ_ORDER))]  # [K, words, 8]
        return nib.reshape(nib.shape[0], -1)[:, a - 8 * c0:b - 8 * c0].t()

    def _values_rows(self, read: StoredReader, start: int, end: int, n: int) -> torch.Tensor:
        """U[:, start:end] [N, end - start]: input columns start..end of the weight."""
        if self.method == "gptq":  # qweight [K / 8, N]: the words holding them
            r0, r1 = start // 8, -(-end // 8)
            nib = _nibbles(read("qweight", 0, [(r0, r1)]))  # [words, N, 8]
            u = nib.permute(1, 0, 2).reshape(nib.shape[1], -1)
            return u[:, start - 8 * r0:end - 8 * r0]
        nib = _nibbles(read("qweight", 0, [(start, end)]))[..., list(_inverse(AWQ_ORDER))]  # [rows, N / 8, 8]
        return nib.reshape(nib.shape[0], -1)[:, :n].t()


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The nibble that holds column j, for each j: the inverse permutation of ``order``."""
    out = [0] * len(order)
    for nibble, column in enumerate(order):
        out[column] = nibble
    return tuple(out)


STORED = ("qweight", "qzeros", "scales")  # a quantized layer's tensors (and GPTQ's g_idx)
