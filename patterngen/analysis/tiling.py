"""The one tiling policy: which tiles a spec gets when the caller names none.

Every consumer uses it: plans (`build_plan`), the op's kernels, `pg.compile`,
`patterngen build`, `patterngen bench` and the simulator's search. A tiling the
generated kernels can run has power-of-two tile volumes of at least 16 tokens
(`tl.dot` and `tl.arange` need them); the default always is one, so that the plan a
user inspects is the plan the kernel runs. Where the simulator ranks tilings, the
best kernel-runnable one of its ranking wins (`kernel_tilings`).
"""
from __future__ import annotations

import math
from typing import Iterable

from ..core.tiles import Tiling
from ..ir import Spec

DEFAULT_VOLUME = 64  # tokens per tile: 64 x 64 fp16 tiles fit every GPU the kernels target
ROUTED_TILES = (128, 64)  # the most tokens of a Routed spec's q and kv tiles


def volume(tile) -> int:
    return math.prod(tile) if isinstance(tile, tuple) else tile


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tile sides, `tl.arange` extents, batch buckets."""
    return 1 << max(0, n - 1).bit_length()


def kernel_tile_ok(tile) -> bool:
    """Whether the generated kernels can run a tile of this shape: a power-of-two volume >= 16."""
    v = volume(tile)
    return v >= 16 and not v & (v - 1)


def default_box(shape: tuple[int, ...], tokens: int = DEFAULT_VOLUME) -> tuple[int, ...]:
    """A box of power-of-two sides and at most `tokens` tokens, filled from the last dimension
    (at most 8 per dimension but the first), so that a tile is a small square patch of the
    grid; a side stops at the extent rounded up to a power of two."""
    tile = [1] * len(shape)
    left = tokens
    for k in reversed(range(len(shape))):
        cap = left if k == 0 else min(8, left)
        tile[k] = max(1, min(cap, pow2_ceil(shape[k])))
        left = max(1, left // tile[k])
    return tuple(tile)


def routed_tiling(block: int, head_dim: int) -> Tiling:
    """A Routed spec's tiles: flat powers of two that divide the block (a selected block is walked
    as whole kv tiles), at most ROUTED_TILES below head dim 128 and square 64-token tiles from
    there (halved above 128). Narrower kv tiles than q tiles keep the routed walks spill-free on
    sm_80 and sm_90 (128 x 128 spilled in the forward on sm_80, and in dK/dV at head dim 64); at
    head dim 128 the 128 x 64 forward spilled 50 instructions on sm_80, 64 x 64 none."""
    q, kv = ROUTED_TILES if head_dim < 128 else (t // 2 for t in ROUTED_TILES) if head_dim > 128 else (64, 64)
    return Tiling(math.gcd(block, q), math.gcd(block, kv))


def default_tiling(spec: Spec) -> Tiling:
    """Flat tiles that divide the routing block for Routed specs (`routed_tiling`); flat 64-token
    tiles on sequences; 64-token boxes on grids (a neighbourhood then meets few tiles, and the
    analysis stays on its per-dimension path), or flat tiles where a grid is too small
    for a kernel-sized box."""
    if spec.routed is not None and kernel_tile_ok(spec.routed.volume):  # box blocks: tiles of block-major order
        return routed_tiling(spec.routed.volume, spec.head_dim)
    if spec.ndim == 1 or spec.routed is not None:
        return Tiling(DEFAULT_VOLUME, DEFAULT_VOLUME)
    q, kv = default_box(spec.q_shape), default_box(spec.kv_shape)
    if kernel_tile_ok(q) and kernel_tile_ok(kv):
        return Tiling(q, kv)
    return Tiling(DEFAULT_VOLUME, DEFAULT_VOLUME)


def kernel_tilings(spec: Spec, ranked: Iterable[Tiling] = (), limit: int = 4) -> list[Tiling]:
    """The tilings a kernel should try, best first: `routed_tiling` for Routed specs, else
    the first `limit` kernel-runnable tilings of `ranked` (the simulator's ranking), else
    the default."""
    if spec.routed is not None:
        return [default_tiling(spec)]
    ok = [t for t in ranked if kernel_tile_ok(t.q_tile) and kernel_tile_ok(t.kv_tile)]
    return list(dict.fromkeys(ok))[:limit] or [default_tiling(spec)]
