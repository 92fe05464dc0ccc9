"""Merged sibling layers (autotp.sharding.siblings): column-parallel layers that read one input
multiplied as one GEMM give the bits each gives alone, in every family of the zoo, bf16, INT8 and
INT4, eager and compiled, on 1 and 2 ranks; their weights are views of one buffer (no byte held
twice, the state dict unchanged); a layer called with another input, or with its input written
since, multiplies its own weights."""
from __future__ import annotations

import copy

import pytest
import torch

import autotp
import zoo
from autotp import kernels
from autotp.runtime import Runtime
from autotp.sharding import siblings as sib
from autotp.sharding.layers import ColumnParallelLinear
from dist_helper import RankChecks

needs_extension = pytest.mark.skipif(not kernels.available_isas(Runtime.from_env()),
                                     reason=f"extension unavailable: {kernels.status()[1]}")
pytestmark = needs_extension


def sharded(family: str, quantize: str | None, merge: bool, **runtime) -> torch.nn.Module:
    """``family`` sharded on 1 rank with its layers on the native kernels (the generic table too,
    which is all a CPU without x86 tables has): merging applies to packed weights only."""
    model = zoo.build(family, torch.bfloat16)
    return autotp.shard(model, 1, quantize=quantize, runtime=Runtime.from_env().replace(kernels="native", merge_siblings=merge, **runtime))


def groups(model) -> list[list[str]]:
    names = {m: n for n, m in model.named_modules()}
    seen = {id(m.siblings): m.siblings for m in model.modules()
            if isinstance(m, ColumnParallelLinear) and m.siblings is not None}
    return [[names[m] for m in g.called] for g in seen.values()]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**zoo.batch()).logits


# the families whose column layers are separate modules that read one input (the others fuse q,
# k and v in one Linear already: nothing to merge)
MERGED = {"llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          "gptj": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"],  # parallel block: one norm feeds all four
          "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_merged_layers_give_the_bits_each_gives_alone(family, quantize):
    """Logits with siblings merged equal those with every layer alone, bit for bit (every kernel
    sums a column the same way whatever the other columns); where a family has separate q, k, v
    (and gate / up) projections they are merged, in the order the forward calls them."""
    alone, merged = sharded(family, quantize, False), sharded(family, quantize, True)
    assert groups(alone) == []
    assert torch.equal(logits(alone), logits(merged))
    found = groups(merged)
    if family in MERGED:
        first_layer = [g for g in found if ".0." in g[0] or ".h.0." in g[0]]
        assert any([n.split(".0.")[-1] for n in g] == MERGED[family] for g in first_layer), found
    if family == "llama":  # two groups a layer: attention's and the MLP's
        assert len(found) == 2 * 2 and ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in found


def test_a_wrong_column_offset_is_seen():
    """Negative control of the comparison above: a group whose second layer takes its columns one
    place off gives other logits."""
    alone, merged = sharded("llama", "int8", False), sharded("llama", "int8", True)
    group = merged.model.layers[0].self_attn.k_proj.siblings
    start, width = group.columns[id(group.called[1])]
    group.columns[id(group.called[1])] = (start + 1, width)
    assert not torch.equal(logits(alone), logits(merged))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_members_are_views_of_one_buffer_and_the_state_dict_is_unchanged(quantize):
    """After merging (and the move onto huge pages that follows it in autotp.shard) each group's
    layers hold views of one buffer per tensor, in call order; the model holds as many parameter
    bytes as unmerged and its state dict has the same keys and values."""
    alone, merged = sharded("llama", quantize, False), sharded("llama", quantize, True)
    a, m = alone.state_dict(), merged.state_dict()
    assert list(a) == list(m) and all(torch.equal(a[k], m[k]) for k in a)
    nbytes = [sum(p.numel() * p.element_size() for p in model.parameters()) for model in (alone, merged)]
    assert nbytes[0] == nbytes[1]
    attn = merged.model.layers[0].self_attn
    group = attn.q_proj.siblings
    assert group is attn.k_proj.siblings is attn.v_proj.siblings and group.called == [attn.q_proj, attn.k_proj,
                                                                                          attn.v_proj]
    for name in ("weight", "weight_scale") if quantize else ("weight",):
        whole = getattr(group.whole, name)
        row = 0
        for layer in group.called:
            part = getattr(layer, name)
            assert part.data_ptr() == whole[row:].data_ptr(), (name, layer)
            row += part.shape[0]
        assert row == whole.shape[0]


def test_a_member_given_another_input_multiplies_its_own_weights():
    """The first layer called multiplies the whole group and keeps the others' columns; a later
    layer given another tensor, or the same tensor written in place since, computes its own
    product (the kept columns would be wrong: the negative control)."""
    alone, merged = sharded("llama", "int8", False), sharded("llama", "int8", True)
    a, m = alone.model.layers[0].self_attn, merged.model.layers[0].self_attn
    x, other = torch.randn(3, 64).bfloat16(), torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(m.q_proj(x), a.q_proj(x))
        assert torch.equal(m.k_proj(other), a.k_proj(other))  # another input
        assert torch.equal(m.v_proj(x), a.v_proj(x))  # the kept columns, still good
        assert torch.equal(m.q_proj(x), a.q_proj(x))
        kept = m.q_proj.siblings._outputs[1]
        x.mul_(2)  # written since: the kept columns are stale
        assert not torch.equal(kept, a.k_proj(x))
        assert torch.equal(m.k_proj(x), a.k_proj(x))


def test_switched_off_nothing_is_merged_and_a_failing_probe_merges_nothing(monkeypatch):
    """``merge_siblings=False`` leaves every layer alone; a model whose probe forward fails (it
    needs more than ids) is left alone too, with the reason logged, not raised."""
    assert groups(sharded("llama", "int8", False)) == []
    model = sharded("llama", "int8", False)

    def broken(*args, **kwargs):
        raise TypeError("needs pixel_values")

    monkeypatch.setattr(model, "forward", broken)
    assert sib.merge_siblings(model, Runtime()) == 0
    assert groups(model) == []


TWO_RANKS = [("llama", None), ("llama", "int8"), ("gptj", "int8")]
CHECKS = RankChecks({2: {f"{f}-{q}": ("compare_merged_siblings", (f, q)) for f, q in TWO_RANKS}})


@pytest.mark.parametrize("family,quantize", TWO_RANKS)
def test_two_ranks_compiled_give_the_same_tokens_merged(family, quantize):
    """2 ranks, bf16 or INT8: logits, greedy tokens and 3-beam tokens through the compiled
    decoding step are the same with siblings merged as with each layer alone, and every rank
    merged the same groups."""
    results = CHECKS(2, f"{family}-{quantize}")
    for rank, r in enumerate(results):
        assert r["logits_equal"] and r["greedy_equal"] and r["beam_equal"], (rank, r)
        assert r["groups"] and r["groups_when_off"] == [], r
    assert results[0]["groups"] == results[1]["groups"]


def test_a_replaced_weight_breaks_the_group_up():
    """A layer whose tensor is replaced after merging (load_state_dict with assign=True) no longer
    matches the group's buffer: the group dissolves and every layer multiplies its own weights,
    so the outputs follow the new weight (the unmerged model given the same state agrees; the
    old outputs, which the stale buffer would give, differ)."""
    alone, merged = sharded("llama", None, False), sharded("llama", None, True)
    before = logits(merged)
    state = {k: v.clone() for k, v in alone.state_dict().items()}
    key = "model.layers.0.self_attn.k_proj.weight"
    state[key] = -state[key]  # other keys
    alone.load_state_dict(state, assign=True)
    merged.load_state_dict(state, assign=True)
    assert merged.model.layers[0].self_attn.k_proj.siblings is not None
    after = logits(merged)
    assert torch.equal(logits(alone), after) and not torch.equal(before, after)
    assert groups(merged) == []
