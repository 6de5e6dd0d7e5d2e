"""Sequence-sharded (context-parallel) attention across ranks: which keys each rank needs
(`plan`, derived from the tile plan), the attention of a rank's shard (`attention`, on
torch.distributed), and local gloo ranks for tests and benchmarks (`run_ranks`)."""
from .attention import attention
from .spawn import run_ranks
from ..analysis.shards import LAYOUTS, DistributedPlan, Transfer, plan, ring_tokens

__all__ = ["LAYOUTS", "DistributedPlan", "Transfer", "attention", "plan", "ring_tokens", "run_ranks"]
