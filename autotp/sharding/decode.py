"""How a sharded model decodes: the switches autotp sets on a model for ``generate``.

With ``Runtime.compile`` (``AUTOTP_COMPILE=1``) ``generate`` keeps the KV cache in a static,
preallocated cache (transformers' ``StaticCache``: shapes stay fixed from step to step) and
runs each decoding step through ``torch.compile`` (inductor): the norms, rotary embedding,
residual adds, casts and cache writes of a step become a few fused C++ loops, and the Python
of the modules runs once, at tracing, instead of every token. The graph is called through
inductor's C++ wrapper (``cpp_wrapper``), not its Python one: the few hundred kernel and op
calls of a step cost no Python each (measured on an AMD EPYC Zen 4, llama-1b shape, 2 ranks x
1 thread, interleaved in one process: 2.5-6 ms less per step; its first compilation takes
about twice as long, then it is cached like the rest); autotp's own ops in it are called as
C functions, not through the dispatcher (autotp.kernels.shims), and its inputs are held by C++
references while the model decodes (:func:`hold_in_cpp`). The model's ``forward`` routes
each call: a decoding step (one new position per sequence over a static cache: greedy,
sampling and beam search alike; transformers' own compilation covers only the first two) to
the compiled function, anything else (the prompt) to the eager forward. autotp's own ops (the GEMMs, the shared-memory all-reduce and all-gather) are custom
ops with shape functions, so a compiled step calls them without breaking the graph.

Compilation happens on the first decoding step of a new shape (about 20-50 s for a 1 B model
on two cores; a second shape makes the graph dynamic) and is cached on disk by inductor
(``TORCHINDUCTOR_CACHE_DIR``), so later processes compile in a few seconds.
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from autotp import kernels
from autotp.kernels import pages, shims
from autotp.runtime import Runtime
from autotp.sharding import attention
from autotp.sharding.siblings import merge_siblings


# Inductor's checks, before every call of a compiled step, of the size, stride, alignment and
# scalar values of each of its inputs (a 1 B model's step takes about 300: every weight) and of
# each extern op's output, off: dynamo's guards already check the inputs that may change (the
# ids, the cache; _inputs_only), the weights do not change while a model decodes, and autotp's
# ops are tested against their shape functions. On an AMD EPYC Zen 4 (2 ranks x 1 thread, a
# 16-layer Llama with tiny weights, so that a step is nearly all overhead) a step took 1.35-1.64
# ms without them against 1.54-1.88 ms with them, in alternating runs.
_NO_RUNTIME_ASSERTS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` from transformers 5.25 on
    (where ``past_key_values`` still works but warns that it goes in 5.40), ``past_key_values``
    in the 5.x releases before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def given_cache(kwargs: dict):
    """The KV cache a forward call was given (``cache``, or ``past_key_values`` before
    transformers 5.25), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def returned_cache(out):
    """The KV cache a forward returned (its ``cache`` field, ``past_key_values`` before
    transformers 5.25), or None."""
    if "cache" in out:
        return out["cache"]
    return out.get("past_key_values")


def compiled_decoding(model: nn.Module) -> bool:
    """Whether ``generate`` on ``model`` decodes with a static cache and a compiled step."""
    gen = getattr(model, "generation_config", None)
    return bool(gen is not None and gen.cache_implementation == "static"
                and getattr(model, "_autotp_compiled_step", None) is not None)


_NAMES_SDPA = re.compile(r"_attn_implementation\s*(?:==|!=|in|not in)\s*[^\n]*[\"']sdpa[\"']")


def _takes_attention_functions(model: nn.Module) -> bool:
    """Whether ``model`` calls its attention only through transformers' AttentionInterface, so
    that another registered function can stand in for SDPA. Not when the class cannot change
    its implementation (Falcon computes attention itself; transformers only warns), nor when
    its code branches on the name "sdpa" (Falcon again; DeepSeek-V3.2's and GLM-5's sparse
    masks): under another name such code takes a path meant for other kernels, over a mask
    made for SDPA."""
    cls = type(model)
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False
    return _NAMES_SDPA.search(source) is None


def prepare_decoding(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Set ``model`` up for the decoding ``runtime`` asks for: autotp's attention function
    (``runtime.attention``, autotp.sharding.attention) where the model runs transformers' SDPA
    one, and the compiled step of the module docstring (``runtime.compile``) where the model
    has a generation config and supports a static cache. First the column-parallel layers that
    read one input are merged (``runtime.merge_siblings``, autotp.sharding.siblings) and the
    weights move onto huge pages (``runtime.huge_pages``, autotp.kernels.pages): a step streams
    them all."""
    if runtime.merge_siblings:
        merge_siblings(model, runtime)
    if runtime.huge_pages:
        pages.place_on_huge_pages(model)
    config = getattr(model, "config", None)
    if (runtime.attention == "auto" and getattr(config, "_attn_implementation", None) == "sdpa"
            and _takes_attention_functions(model)):
        attention.register(runtime)
        model.set_attn_implementation(attention.NAME)
    if getattr(config, "_attn_implementation", None) == attention.NAME:
        for module in model.modules():  # private config copies the plan gave some modules (AttrEdit)
            own = getattr(module, "config", None)
            if own is not config and getattr(own, "_attn_implementation", None) == "sdpa":
                own._attn_implementation = attention.NAME
    if not runtime.compile:
        return model
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(model, "_can_compile_fullgraph", True):
        return model
    why = _static_cache_fails(model)
    if why:
        warnings.warn(f"autotp: {type(model).__name__} does not generate over a static KV cache ({why}); "
                      "AUTOTP_COMPILE leaves it decoding eagerly on its dynamic cache", stacklevel=3)
        return model
    gen.cache_implementation = "static"
    forward = model.forward  # the class's, bound
    options = {"guard_filter_fn": _inputs_only, "cpp_wrapper": True, **_NO_RUNTIME_ASSERTS}
    if kernels.extension_loaded(runtime):  # autotp's ops called as C functions (autotp.kernels.shims)
        options["aot_inductor.custom_ops_to_c_shims"] = shims.c_shims()
    compiled = torch.compile(_own_step(forward), dynamic=None, options=options)
    # inductor's caches key a graph by its text, in which an op's defaulted arguments do not
    # appear: a step cached before the extension's op signatures changed would call them with
    # the old arguments (a crash). The build's name, a hash of its sources, goes into the key.
    tag = f"{torch.compiler.config.cache_key_tag}autotp:{kernels.build_tag(runtime.portable_build)}"

    # the forward's signature kept (functools.wraps): generate reads it, e.g. to pass
    # logits_to_keep=1 to the prompt forward (without it, the lm_head runs over every prompt
    # position and the ranks gather all of their logits)
    from transformers import StaticCache

    @functools.wraps(forward)
    def decode_or_prompt(*args, **kwargs):
        if _decoding_step(args, kwargs) and not torch.compiler.is_compiling():
            with torch.compiler.config.patch(cache_key_tag=tag):
                return compiled(*args, **kwargs)
        cache = given_cache(kwargs)
        if Lineage.ATTR in getattr(cache, "__dict__", {}):  # a prompt's rows share no past (but prompt_once's)
            delattr(cache, Lineage.ATTR)
        out = prompt_once(forward, kwargs) if not args and not torch.compiler.is_compiling() else None
        if out is None:
            out = forward(*args, **kwargs)
        if isinstance(cache, StaticCache) and not torch.compiler.is_compiling():
            if runtime.huge_pages:
                pages.place_cache_on_huge_pages(cache)  # allocated by its first forward; every step reads it
            model._autotp_step_inputs = hold_in_cpp(model, cache)  # the steps to come read them
        return out

    model.forward = decode_or_prompt  # an instance attribute: nn.Module.__call__ finds it first
    model._autotp_compiled_step = compiled
    if not hasattr(type(model), "_reorder_cache") and kernels.extension_loaded(runtime):
        model._reorder_cache = reorder_cache  # generate's beam search calls it when the model has one
    return model


class HeldInCpp:
    """C++ references to tensors (``refs``: TorchScript's list, a ``c10::List`` of them), held
    while this object is. A copy or pickle of it holds nothing (a copied model's tensors are
    other tensors; its next prompt takes its own)."""

    __slots__ = ("refs",)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        script_list = getattr(torch._C, "ScriptList", None)  # absent: a Python list, no C++ reference
        self.refs = script_list(tensors) if script_list is not None else list(tensors)

    def __iter__(self):
        return iter(self.refs)

    def __deepcopy__(self, memo: dict) -> "HeldInCpp":
        return HeldInCpp([])

    def __reduce__(self):
        return HeldInCpp, ([],)


def hold_in_cpp(model: nn.Module, cache) -> HeldInCpp:
    """A C++ reference to each tensor a compiled step of ``model`` over ``cache`` takes as an
    input (the parameters and buffers, the merged siblings' tensors, the cache layers' keys,
    values and lengths), held while the result is. In torch 2.13 a tensor that only Python
    holds increfs its Python object when a C++ reference to it is taken and decrefs it when
    the count falls back to one, under the GIL; inductor's C++ wrapper runs a step with the GIL
    released and drops each input's reference after its last use, so each of the ~150 inputs
    of a 1 B model's step took the GIL back once a step, its lines cold after a GEMM's weight
    stream (``ConcretePyInterpreterVTable::decref`` under ``aoti_torch_delete_tensor_object``:
    about 1% of a llama-1b bf16 step's samples on a Xeon with AMX, 2 ranks x 1 thread). With a
    second C++ reference held here, the wrapper's never move a count to or from one. Taken
    again with every prompt (tensors may have been replaced since), so a replaced tensor is
    kept until the next ``generate`` at most (one replaced during a ``generate``: a cache layer
    that transformers' own beam reorder copies, where autotp's in-place one does not serve)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        group = getattr(module, "siblings", None)
        if group is not None and module.sibling_index == 0:
            tensors.extend(group.tensors())
    for layer in getattr(cache, "layers", None) or []:
        tensors.extend(t for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return HeldInCpp(tensors)


def reorder_cache(cache, beam_idx: torch.Tensor):
    """Beam search's reorder of ``cache`` (row ``b`` takes row ``beam_idx[b]``'s states),
    returning it, as transformers' ``_reorder_cache`` hook does. A static cache's layers (full
    and sliding-window) are reordered in place over their filled positions only, and only the
    rows that change (autotp.kernels.reorder_rows_): transformers' own reorder gathers every row
    over the whole preallocated length into new tensors each step (measured on an AMD EPYC Zen 4,
    one thread, 4 beams, 16 layers, 256 of 288 positions filled: 6.4 ms for GPT-J-1B's 75 MB of
    cache per rank). Full-attention layers copy a row only from the position where it parts from
    its source (:class:`Lineage`): beams share their prompt and what they decoded together.
    Other caches and layers of other kinds reorder as transformers does."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, StaticCache) or layers is None:
        cache.reorder_cache(beam_idx)
        return cache
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}  # (filled, full attention) -> tensors
    for layer in layers:
        if (type(layer) in (StaticLayer, StaticSlidingWindowLayer) and layer.is_initialized
                and layer.keys.is_contiguous() and layer.values.is_contiguous()
                and layer.keys.shape[0] == beam_idx.numel()):
            filled = min(int(layer.get_seq_length()), layer.keys.shape[2])  # a full window: all of it
            groups.setdefault((filled, type(layer) is StaticLayer), []).extend((layer.keys, layer.values))
        else:
            layer.reorder_cache(beam_idx)
    sources = beam_idx.cpu()
    full = [(filled, tensors) for (filled, is_full), tensors in groups.items() if is_full]
    starts = Lineage.parting(cache, sources, full[0][0], full[0][1][0].shape[2]) if len(full) == 1 else None
    for (length, is_full), tensors in groups.items():
        kernels.reorder_rows_(tensors, sources, length, starts if is_full else None)
    return cache


class Lineage:
    """Which rows of a static cache hold the same states where: ``ids[b, j]`` names what wrote
    row ``b``'s position ``j``, so that rows with equal ids up to a position hold equal keys and
    values there in every full-attention layer (the same tokens went in). Kept on the cache (its
    ``_autotp_lineage``): set by :func:`prompt_once` (beam search's rows share one prompt),
    dropped by every other prompt forward (the routing forward of prepare_decoding), advanced
    by :func:`reorder_cache`; where there is none, every row counts as its own."""

    ATTR = "_autotp_lineage"

    def __init__(self, ids: torch.Tensor, filled: int) -> None:
        self.ids, self.filled = ids, filled
        self.next_id = int(ids[:, :filled].max()) + 1 if filled and ids.numel() else 0

    @classmethod
    def parting(cls, cache, sources: torch.Tensor, filled: int, length: int) -> torch.Tensor:
        """For the reorder of ``cache``'s rows to ``sources`` over ``filled`` positions: the first
        position where each row differs from its source (``filled`` where it does not), the
        lineage then advanced to the reordered rows. Positions written since the last call
        count as each row's own."""
        rows = sources.numel()
        lineage = getattr(cache, cls.ATTR, None)
        if (lineage is None or lineage.ids.shape[0] != rows or lineage.ids.shape[1] < filled
                or filled < lineage.filled):
            lineage = cls(torch.zeros(rows, length, dtype=torch.long), 0)  # nothing known: all positions new
        new = filled - lineage.filled
        if new > 0:  # written by each row for itself
            lineage.ids[:, lineage.filled:filled] = lineage.next_id + torch.arange(rows * new).view(rows, new)
            lineage.next_id += rows * new
        moved = lineage.ids[sources]
        differs = moved[:, :filled] != lineage.ids[:, :filled]
        starts = torch.where(differs.any(1), differs.to(torch.uint8).argmax(1), filled)
        lineage.ids, lineage.filled = moved, filled
        setattr(cache, cls.ATTR, lineage)
        return starts


_ROW_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_OTHER_INPUTS = ("cache", "past_key_values", "use_cache", "return_dict", "cache_position", "logits_to_keep")


def prompt_once(forward: Callable, kwargs: dict):
    """The prompt forward of a batch whose rows repeat (beam search: ``generate`` repeats each
    prompt once per beam before the prompt runs) over each distinct row only, its static cache
    and logits then copied to every row; None where that does not apply, and the caller runs
    the whole batch. Applies to a fresh StaticCache of full-attention and sliding-window
    layers, input ids with at most the per-row inputs of ``_ROW_INPUTS`` (a 2-D or 4-D mask
    included) beside the call's plain options: a prompt of N rows repeated k times costs the
    forward of N rows, not N * k (measured on an AMD EPYC Zen 4, llama-1b shape, 2 ranks x 1
    thread, beam 4, prompt 256: the first token 4.2 s before). Every rank decides alike: the
    inputs are the same on every rank."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = given_cache(kwargs)
    ids = kwargs.get("input_ids")
    if (not isinstance(cache, StaticCache) or not isinstance(ids, torch.Tensor) or ids.dim() != 2
            or ids.shape[0] < 2 or any(k not in _ROW_INPUTS + _OTHER_INPUTS for k in kwargs)
            or any(type(layer) not in (StaticLayer, StaticSlidingWindowLayer) or layer.is_initialized
                   for layer in cache.layers)):
        return None
    rows = {k: kwargs[k] for k in _ROW_INPUTS if kwargs.get(k) is not None}
    if any(not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != ids.shape[0] for t in rows.values()):
        return None  # a mask given as a dict of masks, position ids laid out per axis first (mrope), ...
    key = torch.cat([t.reshape(t.shape[0], -1).to(torch.float64) for t in rows.values()], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return None
    first = torch.full((distinct.shape[0],), ids.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0]), reduce="amin")
    own = copy.deepcopy(cache)  # the same layers, not yet allocated
    args = dict(kwargs, **{k: t.index_select(0, first) for k, t in rows.items()})
    args["cache" if "cache" in kwargs else "past_key_values"] = own
    out = forward(**args)
    for layer, filled in zip(cache.layers, own.layers):
        layer.lazy_initialization(filled.keys[:1].expand(ids.shape[0], -1, -1, -1),
                                  filled.values[:1].expand(ids.shape[0], -1, -1, -1))
        torch.index_select(filled.keys, 0, inverse, out=layer.keys)
        torch.index_select(filled.values, 0, inverse, out=layer.values)
        layer.cumulative_length.copy_(filled.cumulative_length)
        if hasattr(filled, "cumulative_length_int"):
            layer.cumulative_length_int = filled.cumulative_length_int
    full = [layer for layer in cache.layers if type(layer) is StaticLayer]
    if full:  # the rows that repeat a prompt hold the same states over it
        length = full[0].keys.shape[2]
        ids = inverse[:, None].expand(-1, length).contiguous()
        setattr(cache, Lineage.ATTR, Lineage(ids, min(int(full[0].get_seq_length()), length)))
    for name, value in list(out.items()):
        if value is own:
            out[name] = cache
        elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == distinct.shape[0]:
            out[name] = value.index_select(0, inverse)
    return out


def _static_cache_fails(model: nn.Module) -> str | None:
    """Why ``generate`` over a StaticCache differs from the default cache on ``model`` (two
    tokens after a batch of two 4-token prompts, one left-padded; eager), or None. Every rank runs it at once (collectives)."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[3, 4, 5, 6], [0, 0, 5, 6]]).clamp(max=vocab - 1)  # the second left-padded
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2,
                  do_sample=False, num_beams=1, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    try:
        with torch.no_grad():
            plain = model.generate(**kwargs)
            static = model.generate(cache_implementation="static", **kwargs)
    except Exception as exc:  # a family whose forward cannot take a static cache
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    for a, b in zip(plain.logits, static.logits):
        if (a.float() - b.float()).abs().max() > 0.05 * a.float().abs().max() + 1e-6:
            return "its logits differ"
    return None


def _decoding_step(args: tuple, kwargs: dict) -> bool:
    """Whether a forward call is one decoding step over a static cache: one new position per
    sequence (greedy, sampling and beam search alike), the cache a StaticCache."""
    from transformers import StaticCache

    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = given_cache(kwargs)
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1 and isinstance(cache, StaticCache)


def _own_step(forward: Callable) -> Callable:
    """``forward(...)`` through a function with a code object of its own, so that the compiled
    graphs dynamo keeps on that code object are this model's only: dynamo keys its cache on
    code objects, and two models of one class would otherwise share entries (told apart by
    guards on their modules)."""
    def step(*args, **kwargs):
        return forward(*args, **kwargs)

    step.__code__ = step.__code__.replace()  # a new code object, not shared with other models
    return step


def _inputs_only(entries: list) -> list[bool]:
    """Guards kept for a compiled step: all but those on the model's modules and parameters,
    which dynamo would otherwise check before every step (about 1.5 ms for a 1 B model). The
    graph belongs to one model (_own_step), whose modules do not change while it decodes;
    weights changed in place are still read, the inputs and the cache are still guarded."""
    return ["._modules[" not in e.name and "._parameters[" not in e.name and "._buffers[" not in e.name
            for e in entries]
