"""Shard math, the parallel layers, and applying a plan to a model."""
