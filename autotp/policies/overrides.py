"""Per-architecture knowledge, as data. The walker decides column vs row; these tables only
say which module attributes hold head counts and widths (so they can be made local) and which
position biases arrive with heads merged into dim 0 (BLOOM's ALiBi)."""
from __future__ import annotations

# attribute names an attention module may read in forward, by what they count
HEAD_ATTRS = frozenset({"num_heads", "num_attention_heads", "n_head", "n_heads", "num_local_heads",
                        "mp_num"})  # CodeGen: the blocks of its fused qkv, the units it is split on
KV_HEAD_ATTRS = frozenset({"num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv"})
GROUP_ATTRS = frozenset({"num_key_value_groups", "num_kv_groups", "n_rep"})
WIDTH_ATTRS = frozenset({"hidden_size", "embed_dim", "all_head_size", "split_size", "inner_dim", "n_embd"})

# attention class name -> keyword argument carrying a [batch * heads, ...] position bias
POSITION_BIAS_KWARGS: dict[str, str] = {
    "BloomAttention": "alibi",
}
