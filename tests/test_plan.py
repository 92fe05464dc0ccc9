"""Plans without processes: the walker's classification on every supported family, the
collectives it promises, the table, JSON round trip, overrides and errors."""
import pytest
import torch

import autotp
from autotp.plan import Plan, ShardingError, Style
import zoo

ATTENTION_AND_MLP_ROWS = {"o_proj", "out_proj", "dense", "down_proj", "fc_out", "fc2", "dense_4h_to_h", "c_proj"}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_walker_classifies_from_data_flow(family):
    model = zoo.build(family)
    plan = autotp.plan(model, 2)
    in_layers = {n: e for n, e in plan.entries.items() if e.layer is not None and e.norm_width is None}
    assert in_layers
    for name, entry in in_layers.items():
        if entry.style == Style.REPLICATE:  # only a MoE router (one output per expert) or a 1-output gate
            weight = model.get_parameter(name) if entry.is_param else model.get_submodule(name).weight
            assert family in zoo.MOE and weight.shape[0] in (1, experts(model)), (name, weight.shape)
        else:
            assert entry.style in (Style.COLUMN, Style.ROW), name
    # the leaf names are only read here, by the test, to check what the data flow decided
    rows = {n for n, e in in_layers.items() if e.style == Style.ROW}
    assert {n.rsplit(".", 1)[1] for n in rows} <= ATTENTION_AND_MLP_ROWS
    per_layer = 1 if family in zoo.PARALLEL_RESIDUAL else 3 if family in zoo.SHARED_EXPERT else 2
    per_layer += 2 if family in zoo.SHARDED_NORMS else 0
    assert plan.collectives_per_layer == {0: per_layer, 1: per_layer}
    assert plan.entries[model_name(model, model.get_input_embeddings())].style == Style.VOCAB


def experts(model) -> int:
    c = model.config
    return next(getattr(c, k) for k in ("num_local_experts", "num_experts", "moe_num_experts") if hasattr(c, k))


def model_name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_llama_plan_uneven_gqa_and_table():
    plan = autotp.plan(zoo.build("llama"), 3)
    q, k = plan.entries["model.layers.0.self_attn.q_proj"], plan.entries["model.layers.0.self_attn.k_proj"]
    assert q.heads == [4, 2, 2] and k.heads == [2, 1, 1]  # 4 KV groups of 2 on 3 ranks
    assert [q.local_size(r) for r in range(3)] == [32, 16, 16]
    down = plan.entries["model.layers.1.mlp.down_proj"]
    assert down.style == Style.ROW and down.all_reduce and [down.local_size(r) for r in range(3)] == [34, 33, 33]
    text = str(plan)
    assert "model.layers.*.self_attn.q_proj" in text and "all-reduces per decoder layer: 2" in text


def test_bloom_fused_qkv_is_split_on_whole_interleaved_heads():
    plan = autotp.plan(zoo.build("bloom"), 3)
    qkv = plan.entries["transformer.h.0.self_attention.query_key_value"]
    assert qkv.unit == 3 * 8 and qkv.heads == [3, 3, 2]  # one head = its q, k and v rows together
    assert qkv.ranges[1] == [(72, 144)]
    assert plan.head_slices and plan.head_slices[0].kwarg == "alibi"
    assert plan.entries["lm_head"].tied_to == "transformer.word_embeddings"


def test_projections_outside_the_layers_are_replicated():
    """OPT-350m projects embeddings 32 -> 64 before the layers: a column split there would
    reach a LayerNorm, so the walker keeps project_in / project_out whole."""
    plan = autotp.plan(zoo.build("opt_proj"), 3)
    assert plan.entries["model.decoder.project_in"].style == Style.REPLICATE
    assert plan.entries["model.decoder.project_out"].style == Style.REPLICATE
    assert plan.entries["model.decoder.layers.0.fc1"].style == Style.COLUMN


def test_plan_json_round_trip():
    plan = autotp.plan(zoo.build("llama_kv2"), 3)
    again = Plan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()
    assert again.collectives_per_layer == plan.collectives_per_layer


def test_world_size_larger_than_heads_is_an_error():
    with pytest.raises(ShardingError, match="larger than the 8 attention heads"):
        autotp.plan(zoo.build("llama"), 9)


def test_a_norm_across_heads_that_cannot_be_split_names_the_module_and_override():
    """OLMo2's q_norm normalises across all heads; split with its weights it is a sharded norm.
    A norm whose weight is not of that width (here: a module holding one more parameter) cannot
    be split with the activation: the walker refuses, naming the projection and the override."""
    model = zoo.build("olmo2")
    assert plan_norms(autotp.plan(model, 2)) == 4  # q_norm and k_norm of 2 layers
    for layer in model.model.layers:
        layer.self_attn.q_norm.register_parameter("extra", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ShardingError, match="q_proj.*reduced across its whole width by mean.*overrides="):
        autotp.plan(model, 2)


def plan_norms(plan) -> int:
    return sum(e.norm_width is not None for e in plan.entries.values())


def test_unplaceable_linear_names_module_and_override():
    model = zoo.build("llama")
    # o_proj forced whole while it reads the sharded heads: q/k/v have nowhere to go
    with pytest.raises(ShardingError) as info:
        autotp.plan(model, 2, overrides={"model.layers.*.self_attn.o_proj": "replicate"})
    message = str(info.value)
    assert "Linear 'model.layers.0.self_attn.k_proj'" in message and "self_attn.q_proj" in message
    assert "read by 'model.layers.0.self_attn.o_proj'" in message
    assert "overrides={'model.layers.*.self_attn.k_proj': 'replicate'}" in message


def test_non_strict_replicates_what_cannot_stay_sharded():
    plan = autotp.plan(zoo.build("llama"), 2, overrides={"model.layers.*.self_attn.o_proj": "replicate"},
                       strict=False)
    attn = [e for n, e in plan.entries.items() if ".self_attn." in n]
    assert attn and all(e.style == Style.REPLICATE for e in attn)
    assert plan.entries["model.layers.0.mlp.down_proj"].style == Style.ROW
    assert plan.collectives_per_layer == {0: 1, 1: 1}


def test_overrides_accept_hf_names_and_reject_unknown_patterns():
    plan = autotp.plan(zoo.build("llama"), 2, overrides={"lm_head": "replicated"})
    assert plan.entries["lm_head"].style == Style.REPLICATE
    with pytest.raises(ShardingError, match="matches no Linear"):
        autotp.plan(zoo.build("llama"), 2, overrides={"model.nothing.*": "colwise"})
    with pytest.raises(ValueError, match="unknown sharding style"):
        Style.parse("diagonal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_catches_a_wrong_plan(monkeypatch, dtype):
    """Negative control for the verifier: corrupt the head layout, verification must fail."""
    from autotp.policies import build as build_module

    original = build_module.assign_heads

    def shifted(n_q, n_kv, ws):
        a = original(n_q, n_kv, ws)
        return type(a)(a.q_heads[::-1], a.kv_heads, a.groups)  # queries paired with wrong KV heads

    autotp.plan(zoo.build("llama", dtype), 2)  # the unmodified plan verifies
    monkeypatch.setattr(build_module, "assign_heads", shifted)
    with pytest.raises(ShardingError, match="does not reproduce"):
        autotp.plan(zoo.build("llama", dtype), 2)


def test_init_distributed_without_torchrun_says_what_to_do(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        autotp.init_distributed()


def test_shard_without_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="init_distributed"):
        autotp.shard(zoo.build("llama"), 2)


@pytest.mark.parametrize("family", zoo.PARALLEL_RESIDUAL)
def test_parallel_residual_blocks_fuse_their_all_reduces(family):
    plan = autotp.plan(zoo.build(family), 3)
    reducers = [e for e in plan.entries.values() if e.fuses]
    assert len(reducers) == 2  # one per decoder layer
    for reducer in reducers:
        (deferred,) = reducer.fuses
        assert plan.entries[deferred].deferred_to == reducer.name and not plan.entries[deferred].all_reduce
        assert plan.entries[deferred].layer == reducer.layer
    assert "all-reduce of " in str(plan) and "summed into " in str(plan)
    off = autotp.plan(zoo.build(family), 3, fuse_allreduce=False)
    assert off.collectives_per_layer == {0: 2, 1: 2}
    assert not any(e.fuses or e.deferred_to for e in off.entries.values())


def test_fusion_follows_the_data_flow_not_the_architecture():
    """GPT-NeoX with use_parallel_residual=False adds attention to the residual before the MLP
    reads it: same classes, different data flow, two all-reduces."""
    assert autotp.plan(zoo.build("gpt_neox"), 2).collectives_per_layer == {0: 1, 1: 1}
    assert autotp.plan(zoo.build("gpt_neox_sequential"), 2).collectives_per_layer == {0: 2, 1: 2}


def test_concatenated_qkv_keeps_each_segments_local_rows():
    """Phi-3's qkv_proj is q | k | v (8 query heads, 4 KV heads of 8): on 3 ranks KV groups go
    2/1/1, so rank 1 has KV head 2 and query heads 4-5, i.e. q rows 32:48, k rows 64+16:24 and
    v rows 96+16:24. gate_up_proj is gate | up (100 each): rank 1 keeps rows 34:67 of each."""
    plan = autotp.plan(zoo.build("phi3"), 3)
    qkv = plan.entries["model.layers.0.self_attn.qkv_proj"]
    assert qkv.ranges[1] == [(32, 48), (80, 88), (112, 120)]
    assert plan.entries["model.layers.0.mlp.gate_up_proj"].ranges[1] == [(34, 67), (134, 167)]
    edits = {(a.module, a.attr): a.values for a in plan.attrs}
    assert edits[("model.layers.0.self_attn", "config.num_attention_heads")] == [4, 2, 2]


def test_conv1d_is_column_and_row_with_its_weight_stored_transposed():
    """GPT-2's c_attn (Conv1D, weight [64, 192]) splits q, k, v on whole heads (3/3/2 on 3
    ranks): rank 1 keeps heads 3-5 of each; the cut is along the stored weight's dim 1."""
    plan = autotp.plan(zoo.build("gpt2"), 3)
    c_attn, c_proj = plan.entries["transformer.h.0.attn.c_attn"], plan.entries["transformer.h.0.attn.c_proj"]
    assert c_attn.transposed and c_attn.ranges[1] == [(24, 48), (88, 112), (152, 176)]
    assert plan.cut("transformer.h.0.attn.c_attn.weight")[1] == 1
    assert c_proj.style == Style.ROW and plan.cut("transformer.h.0.attn.c_proj.weight")[1] == 0
    assert plan.cut("transformer.h.0.attn.c_proj.bias")[1] is None  # added once, after the all-reduce


def test_experts_are_split_like_mlps_and_routers_replicated():
    """Mixtral's gate_up_proj [4, 2 x 96, 64] is gate | up along dim 1, cut in blocks of 8
    features (96 = 12 blocks: 4/4/4 on 3 ranks); down_proj [4, 64, 96] along dim 2."""
    plan = autotp.plan(zoo.build("mixtral"), 3)
    gate_up = plan.entries["model.layers.0.mlp.experts.gate_up_proj"]
    down = plan.entries["model.layers.0.mlp.experts.down_proj"]
    assert (gate_up.style, gate_up.param_dim, gate_up.ranges[1]) == (Style.COLUMN, 1, [(32, 64), (128, 160)])
    assert (down.style, down.param_dim, down.ranges[1], down.all_reduce) == (Style.ROW, 2, [(32, 64)], True)
    assert plan.entries["model.layers.0.mlp.gate.weight"].style == Style.REPLICATE
    assert plan.collectives_per_layer == {0: 2, 1: 2}
    whole = autotp.plan(zoo.build("mixtral"), 2, experts="expert")
    assert whole.entries["model.layers.0.mlp.experts.down_proj"].param_dim == 0
    assert [x.ranges for x in whole.expert_slices][0] == [[(0, 2)], [(2, 4)]]
    with pytest.raises(ShardingError, match="4 experts, which do not divide evenly over 3"):
        autotp.plan(zoo.build("mixtral"), 3, experts="expert")
    again = Plan.from_dict(whole.to_dict())
    assert again.to_dict() == whole.to_dict()


def test_a_model_in_training_mode_plans_as_in_eval_mode():
    """A model fresh from from_config is in training mode; dropout (GPT-2: 0.1) must not make
    the verification on simulated ranks fail, nor may planning change the mode."""
    model = zoo.build("gpt2").train()
    assert autotp.plan(model, 3).to_dict() == autotp.plan(zoo.build("gpt2"), 3).to_dict()
    assert model.training


def test_a_sharded_norm_keeps_the_features_of_what_it_normalises():
    plan = autotp.plan(zoo.build("olmo2"), 3)
    q, q_norm = plan.entries["model.layers.0.self_attn.q_proj"], plan.entries["model.layers.0.self_attn.q_norm"]
    assert q_norm.norm_width == 64 and q_norm.ranges == q.ranges and q_norm.all_reduce
    k, k_norm = plan.entries["model.layers.0.self_attn.k_proj"], plan.entries["model.layers.0.self_attn.k_norm"]
    assert k_norm.norm_width == 32 and k_norm.ranges == k.ranges
