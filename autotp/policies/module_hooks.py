"""Forward hooks the walker's trace needs around modules: a module whose 2-D weight is used
must be a linear map of its input to be replaced by a parallel Linear; a module owning
parameter units is where their partial sums are reduced."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def trace_hooks(model: nn.Module, labeler: Any, params: dict[str, torch.Tensor],
           module_weights: dict[str, str]) -> list:
    """Forward hooks for the trace: a module whose 2-D weight is multiplied by something other
    than stock nn.Linear.forward must return x W^T (+ b) of its first input to be replaced by a
    parallel Linear (else it is recorded in ``not_linear``); a module owning parameter units
    returns their partial sums, reduced there."""
    hooks = []
    modules = dict(model.named_modules())
    for mname in set(module_weights.values()):
        module = modules[mname]
        if type(module).forward is not nn.Linear.forward:
            hooks.append(module.register_forward_hook(_LinearCheck(labeler, mname), with_kwargs=True))
    owners: dict[str, set[str]] = {}
    for pname in params:
        if pname not in module_weights:
            owners.setdefault(pname.rpartition(".")[0], set()).add(pname)
    for mname, names in owners.items():
        hook = lambda m, a, out, mname=mname, names=frozenset(names): labeler.module_output(mname, names, out)
        hooks.append(modules[mname].register_forward_hook(hook))
    return hooks


class _LinearCheck:
    def __init__(self, labeler: Any, name: str) -> None:
        self.labeler, self.name = labeler, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        w = module.weight
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            self.labeler.not_linear.add(self.name)
            return
        bias = getattr(module, "bias", None)
        with torch._C.DisableTorchFunction():
            for weight in (w, w.t()):
                if weight.shape[-1] != x.shape[-1]:
                    continue
                b = bias if isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],) else None
                want = F.linear(x, weight, b)
                if want.shape == out.shape and (out.is_meta or _close(want, out)):
                    return  # on the meta device (a skeleton) only the shape can be checked
        self.labeler.not_linear.add(self.name)


def _close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal up to summation order; a skeleton's uninitialised weights may hold inf and NaN,
    which both computations then share."""
    want, got = torch.nan_to_num(want.float()), torch.nan_to_num(got.float())
    scale = want.abs().max().item() if want.numel() else 0.0
    return torch.allclose(want, got, rtol=1e-3, atol=1e-5 * (1.0 + scale))
