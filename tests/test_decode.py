"""The decoding fast path (autotp.sharding.attention, autotp.sharding.decode): autotp's attention
function against transformers' SDPA function, the runtime switches, and the compiled step with
the attention function on real ranks against plain transformers."""
from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import autotp
from autotp import kernels
from autotp.sharding import attention
from autotp.sharding.decode import (_NAMES_SDPA, _takes_attention_functions, cache_keyword, compiled_decoding,
                                    prepare_decoding, returned_cache)
from dist_helper import RankChecks
import zoo


class Stub(torch.nn.Module):
    """What the attention functions read of an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def tensors(heads: int, kv_heads: int, rows: int = 1, length: int = 12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, rows, 16, generator=gen).to(dtype)
    k = torch.randn(2, kv_heads, length, 16, generator=gen).to(dtype)
    v = torch.randn(2, kv_heads, length, 16, generator=gen).to(dtype)
    mask = torch.ones(2, 1, rows, length, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding of the second sequence
    mask[..., -2:] = False  # slots of a static cache not written yet
    return q, k, v, mask


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
@pytest.mark.parametrize("kind", ["bool", "additive", "none"])
def test_decode_attention_equals_sdpa_and_a_wrong_scale_is_seen(kv_heads, kind):
    q, k, v, mask = tensors(8, kv_heads)
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif kind == "none":
        mask = None
    module = Stub(8 // kv_heads)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, weights = attention.decode_attention(module, q, k, v, mask, scaling=0.3)
    assert weights is None and got.shape == ref.shape == (2, 1, 8, 16)
    assert (got - ref).abs().max().item() < 1e-5
    wrong, _ = attention.decode_attention(module, q, k, v, mask, scaling=0.6)  # negative control
    assert (wrong - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not kernels.native_enabled(torch.bfloat16), reason=f"native kernels off: {kernels.status()[1]}"))])
def test_decode_attention_accumulates_bf16_in_float32(native, monkeypatch):
    """Over a bf16 cache, through the torch ops and through the native op."""
    monkeypatch.setattr(attention, "_native_isa", kernels.isa() if native else None)
    q, k, v, mask = tensors(8, 2, dtype=torch.bfloat16)
    module = Stub(4)
    exact, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask, scaling=0.25)
    got, _ = attention.decode_attention(module, q, k, v, mask, scaling=0.25)
    assert got.dtype == torch.bfloat16
    assert (got.double() - exact).abs().max().item() <= 2 ** -8 * exact.abs().max().item()  # one bf16 rounding


@pytest.mark.parametrize("case", ["prompt", "softcap"])
def test_other_calls_go_to_sdpa_unchanged(case):
    q, k, v, mask = tensors(8, 2, rows=5 if case == "prompt" else 1)
    extra = {"softcap": 30.0} if case == "softcap" else {}
    module = Stub(4)
    if case == "softcap":  # transformers' SDPA refuses softcapping: the call reached it
        with pytest.raises(ValueError, match="softcap"):
            attention.decode_attention(module, q, k, v, mask, **extra)
        return
    assert torch.equal(attention.decode_attention(module, q, k, v, mask)[0],
                       sdpa_attention_forward(module, q, k, v, mask)[0])


def test_the_switches_set_the_model_up_and_leave_it_alone_when_off():
    model = zoo.build("llama")
    assert model.config._attn_implementation == "sdpa" and not compiled_decoding(model)
    prepare_decoding(model, autotp.Runtime(attention="sdpa"))
    assert model.config._attn_implementation == "sdpa" and not compiled_decoding(model)
    prepare_decoding(model, autotp.Runtime(compile=True))
    assert model.config._attn_implementation == attention.NAME and compiled_decoding(model)
    assert model.generation_config.cache_implementation == "static"
    assert autotp.Runtime.from_env({"AUTOTP_COMPILE": "1", "AUTOTP_ATTENTION": "sdpa"}) == \
        autotp.Runtime(compile=True, attention="sdpa")
    with pytest.raises(ValueError, match="AUTOTP_ATTENTION"):
        autotp.Runtime.from_env({"AUTOTP_ATTENTION": "flash"})


def test_the_name_check_finds_code_that_branches_on_sdpa():
    assert _NAMES_SDPA.search('        if self.config._attn_implementation == "sdpa" and not output_attentions:')
    assert _NAMES_SDPA.search("if self.config._attn_implementation in ('eager', 'sdpa'):")
    assert not _NAMES_SDPA.search("fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, e)")


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_the_cache_keyword_continues_the_cache_without_a_warning(family):
    """cache_keyword names the argument the installed transformers takes the KV cache by, and
    returned_cache finds it in the output: a step fed that way continues the prompt as one
    forward over the whole does, with no deprecation warning. Negative control: a step without
    the cache sees only its own position and differs."""
    import warnings

    model, inputs = zoo.build(family), zoo.batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        whole = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True,
                     **{cache_keyword(model): returned_cache(out)}).logits[:, -1]
        alone = model(input_ids=ids[:, -1:]).logits[:, -1]
    assert (step - whole).abs().max() <= 1e-4
    assert (alone - whole).abs().max() > 1e-2

    class Older(torch.nn.Module):  # a forward of transformers before 5.25
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return {"past_key_values": "kv"}

    assert cache_keyword(Older()) == "past_key_values" and returned_cache(Older()(None)) == "kv"


@pytest.mark.parametrize("family", ["falcon", "falcon_40b", "bloom", "llama"])
def test_the_switch_keeps_every_models_logits(family):
    """Switched where the model calls attention only through the interface (Llama; Falcon from
    transformers 5.25 on), else left on its own attention (BLOOM; Falcon up to 5.24, which read
    ``_attn_implementation == "sdpa"`` and under another name added the SDPA mask as floats).
    Either way the logits stay. Where a model branches on the name, forcing it is the negative
    control: the logits move."""
    model, inputs = zoo.build(family), zoo.batch()
    with torch.no_grad():
        before = model(**inputs).logits
        prepare_decoding(model, autotp.Runtime())
        after = model(**inputs).logits
        switched = model.config._attn_implementation == attention.NAME
        assert switched == _takes_attention_functions(model)
        assert switched or family != "llama"
        assert (after - before).abs().max() <= 1e-5
        source = inspect.getsource(sys.modules[type(model).__module__])
        if _NAMES_SDPA.search(source) and type(model)._can_set_attn_implementation() is False:
            attention.register()  # the name's mask function exists, as after any switched model
            model.config._attn_implementation = attention.NAME
            assert (model(**inputs).logits - before).abs().max() > 1e-2


def test_each_model_compiles_its_own_step():
    """Three models of one class (two of the same shape, one deeper), each compiled: each gets
    its own graph, and each generates what it does uncompiled."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    inputs = zoo.batch()
    for seed, layers in [(0, 2), (1, 2), (2, 3)]:
        model = zoo.build("llama", seed=seed, num_hidden_layers=layers)
        ref = copy.deepcopy(model)
        prepare_decoding(model, autotp.Runtime(compile=True))
        with torch.no_grad():
            want = ref.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
            got = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want), (seed, layers)
    assert counters["stats"]["unique_graphs"] - before == 3


def test_the_compiled_step_is_cached_under_the_extensions_build(monkeypatch):
    """inductor keys its caches by a graph's text, where an op's defaulted arguments do not show:
    a step cached by an older extension would call changed ops with old arguments. Each
    compiled call runs with the build's name (a hash of the C++ sources) in the cache key tag,
    the user's own tag kept in front, and the tag restored after. (torch.compile replaced by a
    recorder that runs the step eagerly.)"""
    seen = []

    def recorder(fn, **options):
        def step(*args, **kwargs):
            seen.append(torch.compiler.config.cache_key_tag)
            return fn(*args, **kwargs)
        return step

    monkeypatch.setattr(torch, "compile", recorder)
    inputs = zoo.batch()
    model = zoo.build("llama")
    with torch.compiler.config.patch(cache_key_tag="users-"):
        prepare_decoding(model, autotp.Runtime(compile=True))
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.compiler.config.cache_key_tag == "users-"
    assert seen and set(seen) == {f"users-autotp:{kernels.build_tag()}"}, seen
    assert kernels.build_tag().startswith("autotp_kernels_") and kernels.build_tag(True) != kernels.build_tag()


def test_the_routing_forward_keeps_the_signature_generate_reads():
    """generate reads the model's forward signature: with the compiled step's routing forward in
    place it still passes ``logits_to_keep=1`` to the prompt forward (the lm_head sees one
    position per row, not the whole prompt), and the logits of a left-padded batch equal plain
    transformers'. Negative control: a routing forward that hides the signature makes the
    lm_head run over all 7 prompt positions."""
    inputs = zoo.batch()
    model = zoo.build("llama")
    ref = copy.deepcopy(model)
    prepare_decoding(model, autotp.Runtime(compile=True))
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(**inputs, **kwargs)
        got = model.generate(**inputs, **kwargs)
    assert rows[0] == 1, rows
    for a, b in zip(want.logits, got.logits):
        assert (a - b).abs().max() <= 1e-4
    routed = model.forward
    model.forward = lambda *args, **kw: routed(*args, **kw)  # the signature hidden
    rows.clear()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert rows[0] == inputs["input_ids"].shape[1], rows


FAST = ["llama", "gptj", "phi3"]
CHECKS = RankChecks({2: {f: ("compare_fast_decoding", (f,)) for f in FAST}})


@pytest.mark.parametrize("family", FAST)
def test_compiled_step_and_attention_function_give_the_plain_tokens(family):
    """2 ranks, float32: greedy (6 rows) and 3-beam (2 x 3 rows) tokens of the sharded model,
    decoding through a compiled step and autotp's attention function, equal the unsharded
    model's on plain transformers; one compiled graph served both (same rows, same cache), the
    attention function's decode path and autotp's in-place cache reorder did run, and beam
    search's prompt ran over the distinct rows only."""
    for rank, r in enumerate(CHECKS(2, family)):
        assert r["greedy_equal"] and r["beam_equal"], (rank, r["tokens"])
        assert r["prompt_rows"] == [6, 2], r  # greedy's 6 rows; beam search's 6 ran as their 2 distinct ones
        assert r["reorders"] > 0, r  # beam search reordered the static cache through autotp's hook
        assert r["graphs"] == 1 and r["decode_calls"] > 0 and r["attn"] == attention.NAME, r


needs_extension = pytest.mark.skipif(not kernels.available_isas(autotp.Runtime.from_env()),
                                     reason=f"extension unavailable: {kernels.status()[1]}")


@needs_extension
def test_register_sends_bf16_decoding_to_the_native_op_unless_the_kernels_are_torch(monkeypatch):
    calls = []
    op = torch.ops.autotp.decode_attention
    monkeypatch.setattr(torch.ops.autotp, "decode_attention", lambda *a: calls.append(a) or op(*a), raising=False)
    q, k, v, mask = tensors(8, 2, dtype=torch.bfloat16)
    try:
        attention.register(autotp.Runtime(kernels="torch"))
        torch_ops, _ = attention.decode_attention(Stub(4), q, k, v, mask, scaling=0.25)
        assert not calls
        attention.register(autotp.Runtime(kernels="native"))
        native, _ = attention.decode_attention(Stub(4), q, k, v, mask, scaling=0.25)
        assert len(calls) == 1
    finally:
        attention.register()
    assert (native.float() - torch_ops.float()).abs().max().item() <= 2 ** -7 * torch_ops.float().abs().max().item()


@needs_extension
def test_a_compiled_steps_inputs_are_held_by_cpp_references_renewed_with_each_prompt(monkeypatch):
    """Every tensor a compiled step takes (parameters, buffers, the merged siblings' buffers, the
    static cache's keys, values and lengths) has a second C++ reference while the model
    decodes, so inductor's wrapper, running without the GIL, never takes the GIL back to
    release one (autotp.sharding.decode.hold_in_cpp). A Python list of the same tensors adds
    none (the negative control: the count can tell). Taken anew with each prompt: a buffer
    added since is held, a buffer removed since is let go. (torch.compile replaced by a
    recorder that runs the step eagerly: what is held does not depend on the graph.)"""
    from autotp.runtime import Runtime

    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    runtime = Runtime.from_env().replace(kernels="native", merge_siblings=True)
    model = autotp.shard(zoo.build("llama", torch.bfloat16), 1, runtime=runtime)
    prepare_decoding(model, runtime.replace(compile=True))
    groups = {id(m.siblings): m.siblings for m in model.modules() if getattr(m, "siblings", None) is not None}
    assert groups  # q, k and v merged
    inputs = zoo.batch()

    def generate():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)

    generate()
    held = model._autotp_step_inputs
    wanted = [*model.parameters(), *model.buffers(), *(t for g in groups.values() for t in g.tensors())]
    assert {id(t) for t in wanted} <= {id(t) for t in held}
    cache_layers = [t for t in held if t.dim() == 4]  # keys and values: [batch, kv heads, length, dim]
    assert len(cache_layers) == 2 * model.config.num_hidden_layers
    counts = [t._use_count() for t in wanted + cache_layers]
    assert min(counts) >= 2, counts
    python_list = list(wanted)  # no C++ reference: the counts stay
    assert [t._use_count() for t in python_list] == counts[:len(python_list)]
    del held
    model._autotp_step_inputs = None
    assert [t._use_count() for t in wanted] == [c - 1 for c in counts[:len(wanted)]]

    model.register_buffer("added", torch.zeros(3))
    generate()
    assert model.added._use_count() == 2
    added = model.added
    del model.added
    generate()
    assert added._use_count() == 1 and all(t is not added for t in model._autotp_step_inputs)
    copied = copy.deepcopy(model._autotp_step_inputs)  # a copied model's holder holds nothing
    assert not list(copied) and [t._use_count() for t in wanted[:3]] == counts[:3]
