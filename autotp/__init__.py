"""autotp: tensor parallelism for Hugging Face causal language models on CPUs."""
from autotp.api import from_pretrained, init_distributed, plan, save_sharded, shard
from autotp.plan import CheckpointError, Plan, ShardingError, Style
from autotp.runtime import Runtime

__all__ = ["from_pretrained", "init_distributed", "plan", "save_sharded", "shard", "CheckpointError", "Plan",
           "Runtime", "ShardingError", "Style"]
__version__ = "0.1.0"
