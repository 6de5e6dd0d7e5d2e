"""Sequence-sharded (context-parallel) attention across ranks: which keys each rank needs
(`plan`, derived from the tile plan) and the attention of a rank's shard (`attention`, on
torch.distributed)."""
from .attention import attention
from ..analysis.shards import LAYOUTS, DistributedPlan, Transfer, plan, ring_tokens

__all__ = ["LAYOUTS", "DistributedPlan", "Transfer", "attention", "plan", "ring_tokens"]
