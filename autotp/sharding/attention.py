"""autotp's attention function, registered in transformers' attention interface as "autotp", so
that every family whose attention goes through that interface uses it.

A decoding step (one query position) over the cache is computed here with float32
accumulation from the cache's own dtype: scores = q K^T * scale, the mask, softmax, P V, with
the query heads of one KV head multiplied together (grouped-query attention without repeating
the cache). On CPUs torch's ``scaled_dot_product_attention`` runs one query position through
its blocked flash kernel, whose set-up costs far more than the few hundred kilobytes a step
reads (measured on an AMD EPYC Zen 4, one thread: about 720 us against 130 us eager and 100 us
compiled for 16 heads over 288 cached positions). Inside a compiled decoding step
(autotp.sharding.decode) inductor fuses these ops into vectorized loops for the machine's
instruction set. Over a bfloat16 cache, where the native kernels run, the step is one op
instead (autotp.kernels.decode_attention, threads over batch rows and KV heads, the kernel
layer's ISA paths): the same float32 math with the keys and values widened in registers, so
no float32 copy of the cache is written and read again each step (4x a bf16 cache's bytes:
on the AMD EPYC Zen 4, GPT-J-1B's shape at 4 beams over 288 positions, 75 MB of cache per
rank, that copy cost more than the reads), and cache positions masked for every head (the
unfilled end of a static cache) are not read. Every other call (a prompt, softcapping,
position biases, attention sinks, dropout in training, value heads of another width) is passed
to transformers' own SDPA function unchanged.
"""
from __future__ import annotations

import torch

NAME = "autotp"
_native_isa: str | None = None  # the ISA of the native decode op (None: the torch ops), set by register


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(attention output [batch, query, heads, head_dim], None), as transformers' attention
    functions return it; query [batch, heads, q, d], key / value [batch, kv_heads, length, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, rows, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    unusual = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if (rows != 1 or heads % kv_heads or value.shape[-1] != dim or unusual or kwargs.get("output_attentions")
            or (dropout and module.training)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    if _native_isa is not None and key.dtype == value.dtype == torch.bfloat16:
        bias = None
        if attention_mask is not None:
            mask = attention_mask[:, :, -1, :length]  # [batch, 1 or heads, length]
            bias = (torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                    else mask.float())
        # a bf16 query as it is: a compiled step's would otherwise be its rotary embedding in
        # float32, never rounded to bf16 (an eager step's is), and the op multiplies a bf16
        # query's pairs directly (AVX512-BF16)
        q = (query if query.dtype == torch.bfloat16 else query.float()).reshape(batch, kv_heads, group, dim)
        out = torch.ops.autotp.decode_attention(q, key, value, bias, scale, _native_isa)
        return out.reshape(batch, 1, heads, dim).to(query.dtype), None
    q = query.float().reshape(batch, kv_heads, group, dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [batch, kv_heads, group, length]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, :length]  # [batch, 1 or heads, length]
        mask = mask.reshape(batch, kv_heads, group, length) if mask.shape[1] == heads else mask[:, :, None, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float())  # [batch, kv_heads, group, dim]
    return out.reshape(batch, 1, heads, dim).to(query.dtype), None


def register(runtime=None) -> None:
    """Make "autotp" an attention implementation (with SDPA's masks) in transformers' interfaces;
    a bfloat16 cache's decoding steps go to the native op where ``runtime`` (autotp.Runtime,
    default from the environment) runs the native kernels (``AUTOTP_KERNELS=torch``: the torch ops)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from autotp import kernels

    global _native_isa
    _native_isa = kernels.isa(runtime) if kernels.native_enabled(torch.bfloat16, runtime) else None

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
