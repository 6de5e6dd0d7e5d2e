"""The exact torch reference backend: runs anywhere, differentiable, follows the tile plan."""
from ..inputs import check_scale
from .attention import (DEFAULT_MAX_SCORES, SMALL_PAIRS, masked_attention, merge_partials, reference_attention,
                        shard_attention, small_attention, small_attention_cpu)

__all__ = ["DEFAULT_MAX_SCORES", "SMALL_PAIRS", "check_scale", "masked_attention", "merge_partials",
           "reference_attention", "shard_attention", "small_attention", "small_attention_cpu"]
