"""Tiny random decoder models of many families, built from transformers configs (no downloads).

Sizes are chosen so that splits are uneven on 3 and 4 ranks: 8 heads, vocabulary 130,
MLP width 100.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=130, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "llama_kv2": dict(model_type="llama", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "gptj": dict(model_type="gptj", n_embd=64, n_head=8, n_layer=2, n_inner=100, rotary_dim=4),
    "bloom": dict(model_type="bloom", hidden_size=64, n_head=8, n_layer=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=100, num_hidden_layers=2,
                num_attention_heads=8, word_embed_proj_dim=64, max_position_embeddings=64),
    "opt_proj": dict(model_type="opt", hidden_size=64, ffn_dim=100, num_hidden_layers=2,  # OPT-350m shape
                     num_attention_heads=8, word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, rotary_pct=0.5),
    "starcoder2": dict(model_type="starcoder2", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4),
    "stablelm": dict(model_type="stablelm", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4),
    "stablelm_parallel": dict(model_type="stablelm", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=4, use_parallel_residual=True),
    "gpt_neox_sequential": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                num_attention_heads=8, rotary_pct=0.5, use_parallel_residual=False),
    "granite": dict(model_type="granite", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=8),
    "cohere": dict(model_type="cohere", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4),
}

# families the walker learned from the data flow in issue 16: concatenated q|k|v (Phi-3,
# GPT-BigCode multi-query, Falcon multi-query), Conv1D (GPT-2), Linear subclasses with their own
# forward (Falcon), mp_num-blocked qkv (CodeGen), and others of the zoo
CONFIGS.update({
    "gpt2": dict(model_type="gpt2", n_embd=64, n_head=8, n_layer=2, n_inner=100),
    "falcon": dict(model_type="falcon", hidden_size=64, num_attention_heads=8, num_hidden_layers=2),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=64, n_head=8, n_layer=2, n_inner=100),
    "gpt_bigcode_mha": dict(model_type="gpt_bigcode", n_embd=64, n_head=8, n_layer=2, n_inner=100, multi_query=False),
    # Falcon-40B's layout: q heads | k | v per KV group, viewed [.., 4 groups, 2 + 2, 8]: split on whole groups
    "falcon_40b": dict(model_type="falcon", hidden_size=64, num_attention_heads=8, num_hidden_layers=2,
                       new_decoder_architecture=True, num_kv_heads=4),
    "codegen": dict(model_type="codegen", n_embd=64, n_head=8, n_layer=2, rotary_dim=4, n_inner=100),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "olmo": dict(model_type="olmo", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4),
    "glm": dict(model_type="glm", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "helium": dict(model_type="helium", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "smollm3": dict(model_type="smollm3", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4),
    "gpt_neo": dict(model_type="gpt_neo", hidden_size=64, num_layers=2, num_heads=8, intermediate_size=100,
                    attention_types=[[["global", "local"], 1]], window_size=4),
    "nemotron": dict(model_type="nemotron", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "exaone4": dict(model_type="exaone4", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "ernie4_5": dict(model_type="ernie4_5", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "seed_oss": dict(model_type="seed_oss", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "persimmon": dict(model_type="persimmon", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=8),
    "xglm": dict(model_type="xglm", d_model=64, ffn_dim=100, num_layers=2, attention_heads=8),
    "cohere2": dict(model_type="cohere2", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4),
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4),
})

# mixture-of-experts families: experts as fused 3-D parameters, sharded like dense MLPs
MOE: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                      num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(model_type="granitemoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(model_type="phimoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2),
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                         moe_num_experts=4, moe_k=2, moe_layer_start_index=0),
}
CONFIGS.update(MOE)

# blocks whose attention and MLP read the same input and are added to the residual together:
# one all-reduce per layer
PARALLEL_RESIDUAL = ["gptj", "gpt_neox", "phi", "cohere", "stablelm_parallel", "falcon", "falcon_40b", "codegen",
                     "cohere2"]
# MoE blocks with a shared expert beside the routed ones: the experts' all-reduce and the
# shared expert's, plus attention's
SHARED_EXPERT = ["qwen2_moe", "ernie4_5_moe"]
# q/k norms across all heads (sharded norms): one small all-reduce each, besides attention's and the MLP's
SHARDED_NORMS = ["olmo2", "olmoe"]

# families the walker must refuse (the plan would be wrong or there is nothing to shard)
UNSUPPORTED: dict[str, dict] = {}

# the families of the acceptance criteria first, then the others the walker handles unaided
FAMILIES = list(CONFIGS)


def build(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random model of ``family``; the same seed gives the same weights in every process."""
    kwargs = {**COMMON, **{**CONFIGS, **UNSUPPORTED}[family], **extra}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


def batch(vocab: int = 130, copies: int = 1) -> dict[str, torch.Tensor]:
    """Batch 2, left-padded: the second row has 3 pad tokens in front. With ``copies`` > 1, that
    pair and ``copies - 1`` variants of it (each token shifted by 1, 2, ... within the vocabulary,
    the padding kept): 2 * copies rows."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids = torch.cat([torch.where(mask.bool(), (ids - 3 + j) % (vocab - 3) + 3, 0) for j in range(copies)])
    return {"input_ids": ids, "attention_mask": mask.repeat(copies, 1)}
