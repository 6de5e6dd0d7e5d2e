"""The element-wise semantics evaluated on the tokens of tile pairs, in bounded batches.

Every exact fallback (the analysis refining ambiguous tiles, key-only scans, the
simulator's counts, the command line's plan check) asks the same question of many
(q tile, kv tile) pairs: which token pairs are visible? `tile_masks` answers it in
batches of at most `CHUNK` token pairs, so memory stays bounded whatever the tile count.
Tokens come as lists per tile, padded with -1 (see `TileGrid.tokens`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..ir import Pattern, Spec
from .semantics import visible
from .statuses import status_of
from .tiles import TileGrid

CHUNK = 1 << 22  # token pairs per batch

Tokens = Callable[[int, int], torch.Tensor]  # (start, stop) -> tokens of those tiles, [n, volume], -1 = padding
VisibleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grid_tokens(grid: TileGrid, tiles: torch.Tensor) -> Tokens:
    """The tokens of `tiles` of `grid`, fetched per batch."""
    return lambda a, b: grid.tokens(tiles[a:b])


def pattern_visible(pattern: Pattern, spec: Spec, block_mask: torch.Tensor | None = None) -> VisibleFn:
    return lambda q, k: visible(pattern, q, k, spec, block_mask)


def tile_masks(q_tokens: Tokens, kv_tokens: Tokens, n: int, q_volume: int, kv_volume: int, fn: VisibleFn,
               chunk: int = CHUNK) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For n tile pairs, per batch: (pairs, q [b, Vq, 1], kv [b, 1, Vk], mask [b, Vq, Vk]), the mask
    visible and valid (padding tokens, -1, are never visible)."""
    per = max(1, chunk // max(1, q_volume * kv_volume))
    for i in range(0, n, per):
        j = min(n, i + per)
        q = q_tokens(i, j)[:, :, None]
        k = kv_tokens(i, j)[:, None, :]
        yield slice(i, j), q, k, fn(q.clamp_min(0), k.clamp_min(0)) & (q >= 0) & (k >= 0)


def tile_statuses(pattern: Pattern, spec: Spec, qg: TileGrid, kg: TileGrid, qt: torch.Tensor, kt: torch.Tensor,
                  block_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact EMPTY / PARTIAL / FULL of each (qt, kt) pair, from every token pair."""
    out = torch.empty(qt.shape, dtype=torch.int8)
    for sl, q, k, m in tile_masks(grid_tokens(qg, qt), grid_tokens(kg, kt), len(qt), qg.volume, kg.volume,
                                  pattern_visible(pattern, spec, block_mask)):
        valid = (q >= 0) & (k >= 0)
        out[sl] = status_of(m.flatten(1).any(1), (m | ~valid).flatten(1).all(1))
    return out


def key_tile_statuses(pattern: Pattern, spec: Spec, kg: TileGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kv tile of a key-only pattern: does any / every key satisfy it? (The query is
    irrelevant, so one query, token 0, stands for all.)"""
    tiles = torch.arange(kg.count)
    any_ = torch.empty(kg.count, dtype=torch.bool)
    all_ = torch.empty(kg.count, dtype=torch.bool)
    query = lambda a, b: torch.zeros(b - a, 1, dtype=torch.long)
    for sl, _, k, m in tile_masks(query, grid_tokens(kg, tiles), kg.count, 1, kg.volume,
                                  pattern_visible(pattern, spec)):
        valid = (k >= 0)[:, 0]
        any_[sl], all_[sl] = m[:, 0].any(1), (m[:, 0] | ~valid).all(1)
    return any_, all_
