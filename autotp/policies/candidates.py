"""Where a walk starts: the tiny fixed batch it runs the model on, and the weights it may
classify (every parameter of two or more dims but embedding tables)."""
from __future__ import annotations

import torch
from torch import nn


def sample_inputs(model: nn.Module, seq_len: int = 6) -> dict[str, torch.Tensor]:
    """A tiny, fixed batch for the trace: batch 1, ``seq_len`` tokens inside the vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(1, min(vocab, 1000)), (1, seq_len), generator=gen)
    device = next(model.parameters()).device
    if device.type == "meta":  # mask code reads the mask's values, which meta tensors lack
        return {"input_ids": ids.to(device)}
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def weight_candidates(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter of two or more dims but embedding tables (full name -> parameter), and
    for the 2-D ``weight`` of a module, that module's name."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params, module_weights = {}, {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in tables and not isinstance(module, nn.Linear):
                continue
            full = f"{mname}.{pname}" if mname else pname
            params[full] = p
            if pname == "weight" and p.dim() == 2:
                module_weights[full] = mname
    return params, module_weights
