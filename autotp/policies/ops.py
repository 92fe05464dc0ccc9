"""What the walker knows about torch operations: which multiply an activation by a weight (and
which operand is which), which only rename a weight's dims, which reduce, sum, scale, move,
reshape or cut a tensor; and how an index picks a block of one dim."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# an activation times a weight: (function, which argument is the activation, which the weight,
# whether the weight operand is [.., out, in] (F.linear) rather than [.., in, out])
MATMULS: dict[Any, tuple[int, int, bool]] = {
    F.linear: (0, 1, True), torch._C._nn.linear: (0, 1, True),
    torch.addmm: (1, 2, False), torch.Tensor.addmm: (1, 2, False),
    torch.mm: (0, 1, False), torch.Tensor.mm: (0, 1, False),
    torch.matmul: (0, 1, False), torch.Tensor.matmul: (0, 1, False), torch.Tensor.__matmul__: (0, 1, False),
    torch.bmm: (0, 1, False), torch.Tensor.bmm: (0, 1, False),
}
if hasattr(F, "grouped_mm"):
    MATMULS[F.grouped_mm] = (0, 1, False)
if hasattr(torch, "_grouped_mm"):
    MATMULS[torch._grouped_mm] = (0, 1, False)

# ops that only rename a weight's dims: a view of the parameter, used as an operand later
TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute}
T_PROPERTIES = {torch.Tensor.T.__get__: "T", torch.Tensor.mT.__get__: "mT"}
SAME_WEIGHT = {torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as}

# ops that combine values across a dim: over the whole sharded width they need every rank's part
REDUCTIONS = {
    torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.var, torch.Tensor.var,
    torch.std, torch.Tensor.std, torch.norm, torch.Tensor.norm, torch.linalg.vector_norm,
    torch.amax, torch.Tensor.amax, torch.logsumexp, torch.Tensor.logsumexp, torch.softmax,
    torch.Tensor.softmax, F.softmax, F.normalize, torch.topk, torch.Tensor.topk, torch.max, torch.Tensor.max,
    torch.argmax, torch.Tensor.argmax, torch.sort, torch.Tensor.sort,
}
NORMS = {F.layer_norm, F.rms_norm, F.group_norm}
CHOICES = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.topk, torch.Tensor.topk, torch.max, torch.Tensor.max,
            torch.argmax, torch.Tensor.argmax, torch.sort, torch.Tensor.sort}
# reductions a sharded norm computes as a partial sum and one all-reduce
SPLITTABLE_REDUCTIONS = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum}
# ops through which a partial sum stays a partial sum: sums (with replicated tensors too) and
# dropout, an identity at inference
SUMS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}
IDENTITIES = {F.dropout}
# ops linear in one partial-sum operand (the others replicated): an expert block's combine
# (routing weights, reordering, summing over the top-k) keeps its down projection's partial sums
SCALES = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
           torch.Tensor.__imul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__}
MOVES = {torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute,
          torch.Tensor.transpose, torch.transpose, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
          torch.Tensor.type_as, torch.index_select, torch.Tensor.index_select, torch.Tensor.squeeze,
          torch.Tensor.unsqueeze, torch.squeeze, torch.unsqueeze, torch.Tensor.flatten, torch.flatten,
          torch.Tensor.unflatten, torch.sum, torch.Tensor.sum, torch.Tensor.clone, torch.clone}
INDEX_ADDS = {torch.Tensor.index_add_, torch.Tensor.index_add, torch.index_add}
# reshapes: the trailing features keep their order
RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten,
             torch.Tensor.flatten, torch.flatten, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze,
             torch.squeeze, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.to,
             torch.Tensor.float, torch.Tensor.type_as}
# cuts along one dim into consecutive parts
CUTS = {torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.narrow, torch.narrow,
         torch.Tensor.tensor_split, torch.tensor_split, torch.Tensor.unbind, torch.unbind}


def picks_first(index: Any) -> bool:
    """``w[e]``: an integer (or a 0-d integer tensor) picking along dim 0, nothing else."""
    if isinstance(index, tuple):
        if len(index) != 1:
            return False
        index = index[0]
    if isinstance(index, torch.Tensor):
        return index.dim() == 0 and not index.is_floating_point()
    return isinstance(index, int) and not isinstance(index, bool)


def picked_block(index: Any, ndim: int, axis: int, size: int) -> tuple[int, int, bool] | None:
    """The [start, stop) block an index picks along ``axis`` (whole slices elsewhere), and
    whether that dim stays; None for any other index."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1 or any(i is None for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (ndim - len(items))
    if len(items) != ndim:
        return None
    for d, item in enumerate(items):
        if d != axis and item != slice(None):
            return None
    item = items[axis]
    if isinstance(item, slice):
        if item.step not in (None, 1):
            return None
        start, stop, _ = item.indices(size)
        return (start, stop, True) if stop > start else None
    if isinstance(item, int) and not isinstance(item, bool):
        return (item % size, item % size + 1, False)
    if isinstance(item, list) and item and all(isinstance(i, int) for i in item):
        picked = [i % size for i in item]
        if picked == list(range(picked[0], picked[0] + len(picked))):
            return (picked[0], picked[-1] + 1, True)
    return None
