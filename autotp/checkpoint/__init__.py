"""The on-disk side: safetensors files, the pre-sharded format, save_sharded and from_pretrained.

Above the planner (it plans skeletons) and the shard code (it applies the plan it loads).
"""
