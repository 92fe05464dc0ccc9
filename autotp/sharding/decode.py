"""How a sharded model decodes: the switches autotp sets on a model for ``generate``.

With ``Runtime.compile`` (``AUTOTP_COMPILE=1``) ``generate`` keeps the KV cache in a static,
preallocated cache (transformers' ``StaticCache``: shapes stay fixed from step to step) and
runs each decoding step through ``torch.compile`` (inductor): the norms, rotary embedding,
residual adds, casts and cache writes of a step become a few fused C++ loops, and the Python
of the modules runs once, at tracing, instead of every token. The prompt's forward stays
eager. autotp's own ops (the GEMMs, the shared-memory all-reduce and all-gather) are custom
ops with shape functions, so a compiled step calls them without breaking the graph.

Compilation happens on the first decoding step of a new shape (about 20-50 s for a 1 B model
on two cores; a second shape makes the graph dynamic) and is cached on disk by inductor
(``TORCHINDUCTOR_CACHE_DIR``), so later processes compile in a few seconds.
"""
from __future__ import annotations

import torch
from torch import nn

from autotp.runtime import Runtime
from autotp.sharding import attention


def compiled_decoding(model: nn.Module) -> bool:
    """Whether ``generate`` on ``model`` decodes with a static cache and a compiled step."""
    gen = getattr(model, "generation_config", None)
    config = getattr(gen, "compile_config", None)
    return bool(gen is not None and gen.cache_implementation == "static"
                and getattr(config, "_compile_all_devices", False))


def prepare_decoding(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Set ``model`` up for the decoding ``runtime`` asks for: autotp's attention function
    (``runtime.attention``, autotp.sharding.attention) where the model runs transformers' SDPA
    one, and the compiled step of the module docstring (``runtime.compile``) where the model
    has a generation config and supports a static cache."""
    config = getattr(model, "config", None)
    if runtime.attention == "auto" and getattr(config, "_attn_implementation", None) == "sdpa":
        attention.register()
        model.set_attn_implementation(attention.NAME)
        for module in model.modules():  # private config copies the plan gave some modules (AttrEdit)
            own = getattr(module, "config", None)
            if own is not config and getattr(own, "_attn_implementation", None) == "sdpa":
                own._attn_implementation = attention.NAME
    if not runtime.compile:
        return model
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(model, "_can_compile_fullgraph", True):
        return model
    from transformers import CompileConfig

    # The guards on module attributes and parameters (checked before every step: ~1.5 ms for a
    # 1 B model) are skipped: a sharded model's modules do not change while it decodes (weights
    # changed in place are still read).
    config = CompileConfig(fullgraph=False, dynamic=None, mode=None,
                           options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    config._compile_all_devices = True  # transformers compiles on CPU only when asked to
    gen.compile_config = config
    gen.cache_implementation = "static"
    return model
