"""Sequence-sharded (context-parallel) attention across ranks: which keys each rank needs
(`plan`), derived from the tile plan."""
from .plan import LAYOUTS, DistributedPlan, Transfer, plan, ring_tokens

__all__ = ["LAYOUTS", "DistributedPlan", "Transfer", "plan", "ring_tokens"]
