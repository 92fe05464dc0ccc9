"""Beam search over a static cache (autotp.sharding.decode): the native row reorder against a
gather, the cache reorder against transformers' own, the lineage that copies only where beams
part, and the prompt of repeated rows run once per distinct row."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import autotp
from autotp import kernels
from autotp.sharding.decode import prepare_decoding
import zoo

needs_extension = pytest.mark.skipif(not kernels.available_isas(autotp.Runtime.from_env()),
                                     reason=f"extension unavailable: {kernels.status()[1]}")


def gathered(tensor: torch.Tensor, sources: torch.Tensor, length: int) -> torch.Tensor:
    """The reference reorder: every row gathered into a new tensor over the first ``length`` positions."""
    out = tensor.clone()
    out[:, :, :length] = tensor[sources][:, :, :length]
    return out


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reorder_rows_equals_a_gather_for_every_mapping_of_up_to_four_rows(dtype):
    """Every map of B rows onto B rows (B = 1..4: 288 maps, cycles and swaps among them), on two
    tensors of different shapes at once: each equals the gather; positions past ``length`` and
    the storage stay; the negative control, another map's gather, differs."""
    for rows in range(1, 5):
        gen = torch.Generator().manual_seed(rows)
        k = torch.randn(rows, 3, 7, 5, generator=gen).to(dtype)
        v = torch.randn(rows, 2, 9, 4, generator=gen).to(dtype)
        for sources in itertools.product(range(rows), repeat=rows):
            src = torch.tensor(sources)
            kk, vv = k.clone(), v.clone()
            addresses = kk.data_ptr(), vv.data_ptr()
            kernels.reorder_rows_([kk, vv], src, 6)
            assert torch.equal(kk, gathered(k, src, 6)) and torch.equal(vv, gathered(v, src, 6)), sources
            assert (kk.data_ptr(), vv.data_ptr()) == addresses
            assert torch.equal(kk[:, :, 6:], k[:, :, 6:]) and torch.equal(vv[:, :, 6:], v[:, :, 6:])
            other = (src + 1) % rows
            if rows > 1:
                assert not torch.equal(kk, gathered(k, other, 6)), sources


@needs_extension
def test_reorder_rows_from_given_starts_copies_only_from_there():
    """With per-row starts, every map of 3 rows (cycles included) and random starts: row b takes
    its source's positions [starts[b], length) and keeps its own before them; the negative
    control, a copy of the whole length, differs wherever a start is past 0 and the rows differ."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(3, 2, 9, 4, generator=gen)
    for sources in itertools.product(range(3), repeat=3):
        src = torch.tensor(sources)
        starts = torch.randint(0, 7, (3,), generator=gen)
        kk = k.clone()
        kernels.reorder_rows_([kk], src, 6, starts)
        want = k.clone()
        for b in range(3):
            want[b, :, starts[b]:6] = k[src[b], :, starts[b]:6]
        assert torch.equal(kk, want), (sources, starts)
        if any(src[b] != b and starts[b] > 0 for b in range(3)):
            assert not torch.equal(kk, gathered(k, src, 6)), (sources, starts)
    with pytest.raises(RuntimeError, match="start 7 of row 1"):
        kernels.reorder_rows_([k.clone()], torch.tensor([0, 1, 2]), 6, torch.tensor([0, 7, 0]))


@needs_extension
@pytest.mark.parametrize("case", ["out_of_range", "negative", "float_sources", "not_contiguous", "too_long",
                                  "other_batch"])
def test_reorder_rows_refuses_bad_input_and_leaves_the_tensors(case):
    t = torch.randn(3, 2, 5, 4)
    tensors, sources, length = [t.clone()], torch.tensor([2, 0, 1]), 5
    if case == "out_of_range":
        sources = torch.tensor([0, 3, 1])
    elif case == "negative":
        sources = torch.tensor([0, -1, 1])
    elif case == "float_sources":
        sources = sources.float()
    elif case == "not_contiguous":
        tensors = [torch.randn(3, 5, 2, 4).transpose(1, 2)]
    elif case == "too_long":
        length = 6
    elif case == "other_batch":
        tensors.append(torch.randn(2, 2, 5, 4))
    before = [x.clone() for x in tensors]
    with pytest.raises(RuntimeError, match="autotp::reorder_rows_"):
        kernels.reorder_rows_(tensors, sources, length)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


@needs_extension
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_reorder_cache_equals_transformers_reorder_of_a_static_cache(family):
    """autotp's reorder hook against the cache's own reorder_cache on a StaticCache filled to 6 of
    10 positions (gemma2: sliding-window layers too, a window of 5 filled and rolled): the same
    states, each layer kept in its own storage; a different beam_idx differs."""
    from transformers import AutoConfig, StaticCache

    from autotp.sharding.decode import reorder_cache

    config = AutoConfig.for_model(**zoo.CONFIGS[family], **zoo.COMMON)
    if family == "gemma2":
        config.sliding_window = 5
    cache = StaticCache(config=config, max_cache_len=10)
    gen = torch.Generator().manual_seed(0)
    for i in range(config.num_hidden_layers):
        for length in (4, 2):  # the prompt, then two steps
            k, v = (torch.randn(4, config.num_key_value_heads, length, 8, generator=gen) for _ in range(2))
            cache.update(k, v, i)
    beam_idx = torch.tensor([1, 1, 3, 0])
    want, other = copy.deepcopy(cache), copy.deepcopy(cache)
    want.reorder_cache(beam_idx)
    other.reorder_cache(torch.tensor([1, 1, 3, 2]))
    addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    assert reorder_cache(cache, beam_idx) is cache
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses
    for got, ref, wrong in zip(cache.layers, want.layers, other.layers):
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
        assert not torch.equal(got.keys, wrong.keys)
    if family == "gemma2":
        assert {type(layer).__name__ for layer in cache.layers} == {"StaticLayer", "StaticSlidingWindowLayer"}


@needs_extension
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_reorders_over_many_steps_copy_only_where_beams_part(family):
    """Beam search over a shared prompt, step after step: each decoding step writes a new
    position for every row, then a random beam_idx reorders. autotp's hook, which copies each
    row only from where it parts from its source (the prompt's rows set as shared, as
    prompt_once leaves them), keeps every layer equal to transformers' own reorder of a twin
    cache at every step; after the prompt no row is copied over it. Negative control: a lineage
    that claims rows agree where they do not leaves the cache wrong."""
    from transformers import AutoConfig, StaticCache

    from autotp.sharding.decode import Lineage, reorder_cache

    config = AutoConfig.for_model(**zoo.CONFIGS[family], **zoo.COMMON)
    if family == "gemma2":
        config.sliding_window = 5
    gen = torch.Generator().manual_seed(3)
    prompt, rows, steps = 4, 4, 8

    def run(lie: bool) -> bool:
        cache = StaticCache(config=config, max_cache_len=prompt + steps)
        twin = StaticCache(config=config, max_cache_len=prompt + steps)
        for i in range(config.num_hidden_layers):
            k, v = (torch.randn(1, config.num_key_value_heads, prompt, 8, generator=gen).expand(rows, -1, -1, -1)
                    for _ in range(2))
            cache.update(k.clone(), v.clone(), i)
            twin.update(k.clone(), v.clone(), i)
        setattr(cache, Lineage.ATTR, Lineage(torch.zeros(rows, prompt + steps, dtype=torch.long), prompt))
        equal = True
        for step in range(steps):
            for i in range(config.num_hidden_layers):
                k, v = (torch.randn(rows, config.num_key_value_heads, 1, 8, generator=gen) for _ in range(2))
                cache.update(k.clone(), v.clone(), i)
                twin.update(k.clone(), v.clone(), i)
            beam_idx = torch.randint(0, rows, (rows,), generator=gen)
            if lie:  # the lineage says every row equals every other over all that is filled
                getattr(cache, Lineage.ATTR).ids.zero_()
                getattr(cache, Lineage.ATTR).filled = prompt + step + 1
            starts = Lineage.parting(copy.deepcopy(cache), beam_idx, prompt + step + 1, prompt + steps)
            assert lie or bool((starts >= prompt).all()), starts
            reorder_cache(cache, beam_idx)
            twin.reorder_cache(beam_idx)
            equal &= all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                         for a, b in zip(cache.layers, twin.layers))
        return equal

    assert run(lie=False)
    assert not run(lie=True)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_prompt_of_repeated_rows_runs_once_per_distinct_row(family):
    """Two prompts (one left-padded) repeated 3 times each, as beam search repeats them: the
    forward sees 2 rows; the logits and every cache layer (gemma2: sliding-window layers over a
    prompt longer than the window) equal the whole batch's prompt forward, cumulative lengths
    included. Rows all distinct, a dynamic cache, or an input it does not know: the caller runs
    the batch as it is (None)."""
    from transformers import DynamicCache, StaticCache

    from autotp.sharding.decode import Lineage, prompt_once

    model = zoo.build(family)
    if family == "gemma2":
        model.config.sliding_window = 5
    inputs = {k: v.repeat_interleave(3, dim=0) for k, v in zoo.batch().items()}
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        want = model(**inputs, cache=StaticCache(config=model.config, max_cache_len=10))
        got = prompt_once(model.forward, dict(inputs, cache=StaticCache(config=model.config, max_cache_len=10)))
    assert seen == [6, 2]
    assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=0)
    assert not torch.allclose(got.logits, want.logits.roll(1, 0), atol=1e-5, rtol=0)  # the rows differ
    for a, b in zip(got.past_key_values.layers, want.past_key_values.layers):
        assert type(a) is type(b) and a.keys.shape == b.keys.shape
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
        assert int(a.cumulative_length) == int(b.cumulative_length) and int(a.get_seq_length()) == 7
        assert getattr(a, "cumulative_length_int", None) == getattr(b, "cumulative_length_int", None)
    if family == "gemma2":
        assert {type(layer).__name__ for layer in got.past_key_values.layers} == {"StaticLayer",
                                                                                   "StaticSlidingWindowLayer"}
    lineage = getattr(got.past_key_values, Lineage.ATTR)  # rows of one prompt share its 7 positions
    ids = lineage.ids[:, :7]
    assert lineage.filled == 7 and (ids == ids[:, :1]).all()
    assert torch.equal(ids[:3], ids[:1].expand(3, -1)) and torch.equal(ids[3:], ids[3:4].expand(3, -1))
    assert not torch.equal(ids[0], ids[3])
    distinct = zoo.batch()
    assert prompt_once(model.forward, dict(distinct, cache=StaticCache(config=model.config, max_cache_len=10))) is None
    assert prompt_once(model.forward, dict(inputs, cache=DynamicCache(config=model.config))) is None
    assert prompt_once(model.forward, dict(inputs, output_hidden_states=True,
                                           cache=StaticCache(config=model.config, max_cache_len=10))) is None
    assert seen == [6, 2]  # none of these ran a forward


@needs_extension
def test_the_compiled_step_brings_the_reorder_hook_and_keeps_a_models_own():
    from autotp.sharding.decode import reorder_cache

    model = zoo.build("llama")
    prepare_decoding(model, autotp.Runtime(compile=True))
    assert model._reorder_cache is reorder_cache
    plain = zoo.build("llama")
    prepare_decoding(plain, autotp.Runtime(compile=False))
    assert not hasattr(plain, "_reorder_cache")
    own = zoo.build("llama")

    def own_reorder(cache, beam_idx):
        return cache

    own.__class__ = type("OwnReorder", (type(own),), {"_reorder_cache": staticmethod(own_reorder)})
    prepare_decoding(own, autotp.Runtime(compile=True))
    assert own._reorder_cache is own_reorder
