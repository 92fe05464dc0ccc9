"""Weights on transparent huge pages (autotp.kernels.pages): values unchanged, tied weights still
tied, views left alone, and the kernel really backs the copies with huge pages (read back from
/proc/self/smaps, with a negative control: memory marked MADV_NOHUGEPAGE shows none)."""
from __future__ import annotations

import mmap

import pytest
import torch

import autotp
import zoo
from autotp.kernels import pages
from autotp.sharding.decode import prepare_decoding

SIZE = pages.huge_page_size()
needs_huge_pages = pytest.mark.skipif(SIZE is None, reason="no transparent huge pages here (not Linux, or "
                                      "/sys/kernel/mm/transparent_hugepage/enabled is [never])")


@needs_huge_pages
def test_a_copy_is_aligned_equal_and_backed_by_huge_pages():
    source = torch.randn(3 * SIZE // 4 + 5, dtype=torch.float32)  # 3 huge pages and a bit
    copy = pages.copy_to_huge_pages(source)
    assert copy is not None and copy.dtype == source.dtype and copy.shape == source.shape
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    assert copy.data_ptr() % SIZE == 0
    assert pages.huge_bytes(copy) >= 2 * SIZE  # the kernel may leave a page small under pressure


@needs_huge_pages
def test_negative_control_memory_refused_huge_pages_shows_none():
    region = mmap.mmap(-1, 4 * SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    plain = torch.frombuffer(region, dtype=torch.uint8)
    plain.fill_(1)
    assert pages.huge_bytes(plain) == 0


def _tied_llama() -> torch.nn.Module:
    model = zoo.build("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@needs_huge_pages
def test_placing_a_model_keeps_its_logits_and_ties_and_leaves_views_alone():
    model = _tied_llama()
    view_owner = model.model.layers[0].mlp.up_proj
    view_owner.register_buffer("alias", view_owner.weight.detach()[:4])  # a view of a weight: neither may move
    inputs = zoo.batch()
    with torch.no_grad():
        before = model(**inputs).logits
    up = view_owner.weight.data_ptr()
    small = model.model.norm.weight.data_ptr()
    moved = pages.place_on_huge_pages(model, min_bytes=1024)
    assert moved > 0
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert pages.huge_bytes(model.model.embed_tokens.weight) > 0
    assert view_owner.weight.data_ptr() == up  # it and its view stay together
    assert model.model.norm.weight.data_ptr() == small  # under min_bytes


def test_the_switch_leaves_weights_where_they_are():
    model = zoo.build("llama")
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    prepare_decoding(model, autotp.Runtime(huge_pages=False, attention="sdpa"))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == where
    assert autotp.Runtime.from_env({"AUTOTP_HUGE_PAGES": "0"}) == autotp.Runtime(huge_pages=False)


def test_without_huge_pages_nothing_moves(monkeypatch):
    monkeypatch.setattr(pages, "huge_page_size", lambda: None)
    model = zoo.build("llama")
    assert pages.empty(1 << 22) is None and pages.place_on_huge_pages(model, min_bytes=1) == 0


@needs_huge_pages
def test_a_static_cache_moves_once_with_its_values_and_decoding_goes_on_alike():
    """place_cache_on_huge_pages on a StaticCache after its first forward: every layer's keys and
    values move (new memory, huge pages, same values), a second call moves nothing, and the next
    step's logits equal those over a cache left in place (negative control: a cache whose keys
    were changed gives other logits)."""
    import copy

    from transformers import StaticCache

    from autotp.sharding.decode import cache_keyword

    model = zoo.build("llama")
    inputs = zoo.batch()
    rows, length = inputs["input_ids"].shape
    caches = [StaticCache(config=model.config, max_cache_len=length + 4) for _ in range(3)]
    key = cache_keyword(model)
    with torch.no_grad():
        for cache in caches:
            model(**inputs, **{key: cache}, use_cache=True)
    kept, moved, spoiled = caches
    before = [(layer.keys.data_ptr(), layer.keys.clone(), layer.values.clone()) for layer in moved.layers]
    nbytes = pages.place_cache_on_huge_pages(moved)
    assert nbytes >= sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in moved.layers)
    for layer, (ptr, keys, values) in zip(moved.layers, before):
        assert layer.keys.data_ptr() != ptr and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert pages.place_cache_on_huge_pages(moved) == 0
    assert pages.huge_bytes(moved.layers[0].keys) > 0 or nbytes < SIZE  # a cache below a huge page may stay small
    spoiled.layers[0].keys.mul_(2)
    step = dict(input_ids=inputs["input_ids"][:, -1:], attention_mask=torch.cat(
        [inputs["attention_mask"], torch.ones(rows, 1, dtype=inputs["attention_mask"].dtype)], 1),
        cache_position=torch.tensor([length]), use_cache=True)
    with torch.no_grad():
        logits = [model(**copy.copy(step), **{key: c}).logits for c in (kept, moved, spoiled)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])
