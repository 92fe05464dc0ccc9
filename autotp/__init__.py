"""autotp: tensor parallelism for Hugging Face causal language models on CPUs."""
from autotp.api import from_pretrained, init_distributed, plan, save_sharded, shard
from autotp.plan import Plan, ShardingError, Style
from autotp.sharding.stfile import CheckpointError

__all__ = ["from_pretrained", "init_distributed", "plan", "save_sharded", "shard", "CheckpointError", "Plan",
           "ShardingError", "Style"]
__version__ = "0.1.0"
