"""autotp: tensor parallelism for Hugging Face causal language models on CPUs."""
from autotp.api import init_distributed, plan, shard
from autotp.plan import Plan, ShardingError, Style

__all__ = ["init_distributed", "plan", "shard", "Plan", "ShardingError", "Style"]
__version__ = "0.1.0"
