"""Process groups and collectives. The parallel layers talk only to a TPGroup."""
from autotp.comm.group import TPGroup, init_distributed

__all__ = ["TPGroup", "init_distributed"]
