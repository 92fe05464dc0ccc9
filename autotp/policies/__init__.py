"""From a model to a Plan: the graph walker classifies, per-architecture data adjusts."""
from autotp.policies.build import build_plan

__all__ = ["build_plan"]
