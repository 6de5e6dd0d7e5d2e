"""Tilings of a token grid: flat tiles (consecutive flattened tokens) or boxes.

A tile is described three ways, each exact for one family of primitives:
as boxes on the grid (for `Window`, which factors per dimension), as runs of
consecutive flattened indices (for `Band`/`Causal`, which act on the flattened
index) and as its list of tokens (for element-wise refinement and gathers).
A flat tile is one run and at most 2n-1 boxes; a box tile is one box and a
run per row of its last dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


def _check_tile(name: str, tile, shape: tuple[int, ...]):
    if isinstance(tile, bool):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {tile!r}")
    if isinstance(tile, int):
        if tile < 1:
            raise ValueError(f"{name} must be >= 1, got {tile}")
        return tile
    if not isinstance(tile, (tuple, list)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tile):
        raise TypeError(f"{name} must be an int (flat tile) or a tuple of ints (box), got {tile!r}")
    if len(tile) != len(shape):
        raise ValueError(f"{name}={tuple(tile)!r} has {len(tile)} dimension(s) but the grid {shape} has {len(shape)}")
    if any(t < 1 for t in tile):
        raise ValueError(f"{name} entries must be >= 1, got {tuple(tile)!r}")
    return tile[0] if len(shape) == 1 else tuple(tile)


@dataclass(frozen=True)
class Tiling:
    """Query and key tile shapes: an int is a flat tile of that many consecutive
    tokens, a tuple a box on the grid (one entry per dimension)."""

    q_tile: int | tuple[int, ...] = 64
    kv_tile: int | tuple[int, ...] = 64

    def __repr__(self):
        return f"Tiling({self.q_tile!r}, {self.kv_tile!r})"


class TileGrid:
    """The tiles of one token grid, numbered row-major over the tile grid."""

    def __init__(self, shape: tuple[int, ...], tile, name: str = "tile"):
        self.shape = tuple(shape)
        self.tile = _check_tile(name, tile, self.shape)
        self.flat = isinstance(self.tile, int)
        self.n = math.prod(self.shape)
        if self.flat:
            self.counts = (-(-self.n // self.tile),)
            self.volume = self.tile
        else:
            self.counts = tuple(-(-s // t) for s, t in zip(self.shape, self.tile))
            self.volume = math.prod(self.tile)
        self.count = math.prod(self.counts)
        self.strides = tuple(math.prod(self.shape[k + 1:]) for k in range(len(self.shape)))

    def __repr__(self):
        return f"TileGrid(shape={self.shape}, tile={self.tile!r}, count={self.count})"

    # -- boxes ------------------------------------------------------------------
    @cached_property
    def boxes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo, hi, valid): inclusive corners [count, nb, ndim] and validity [count, nb]."""
        if not self.flat:
            idx = torch.arange(self.count)
            lo = torch.stack([(idx // math.prod(self.counts[k + 1:])) % c * t
                              for k, (c, t) in enumerate(zip(self.counts, self.tile))], -1)
            hi = torch.minimum(lo + torch.tensor(self.tile) - 1, torch.tensor(self.shape) - 1)
            return lo[:, None], hi[:, None], torch.ones(self.count, 1, dtype=torch.bool)
        per_tile = [self._range_boxes(t * self.tile, min((t + 1) * self.tile, self.n) - 1) for t in range(self.count)]
        nb = max(len(b) for b in per_tile)
        nd = len(self.shape)
        lo = torch.zeros(self.count, nb, nd, dtype=torch.long)
        hi = torch.zeros(self.count, nb, nd, dtype=torch.long)
        valid = torch.zeros(self.count, nb, dtype=torch.bool)
        for t, bs in enumerate(per_tile):
            for b, (l, h) in enumerate(bs):
                lo[t, b], hi[t, b], valid[t, b] = torch.tensor(l), torch.tensor(h), True
        return lo, hi, valid

    def _unravel(self, i: int) -> list[int]:
        return [(i // s) % n for s, n in zip(self.strides, self.shape)]

    def _range_boxes(self, a: int, b: int) -> list[tuple[list[int], list[int]]]:
        """Split the flattened range [a, b] into at most 2n-1 boxes."""
        if a > b:
            return []
        nd = len(self.shape)
        for k in range(nd):  # the coarsest dimension whose block holds the whole range
            if a // self.strides[k] == b // self.strides[k]:
                continue
            # a and b differ at dimension k; coarser dims are equal
            s = self.strides[k]
            if a % s == 0 and (b + 1) % s == 0:
                ca, cb = self._unravel(a), self._unravel(b)
                return [(ca[:k + 1] + [0] * (nd - k - 1), cb[:k + 1] + [n - 1 for n in self.shape[k + 1:]])]
            out = []
            head_end = (a // s + 1) * s - 1 if a % s else a - 1
            tail_start = (b // s) * s if (b + 1) % s else b + 1
            if a % s:
                out += self._range_boxes(a, head_end)
            if head_end + 1 <= tail_start - 1:
                out += self._range_boxes(head_end + 1, tail_start - 1)
            if (b + 1) % s:
                out += self._range_boxes(tail_start, b)
            return out
        ca = self._unravel(a)
        return [(ca, ca)]

    @cached_property
    def bbox(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounding box of each tile, (lo, hi) [count, ndim]."""
        lo, hi, valid = self.boxes
        big = torch.iinfo(torch.long).max
        return (torch.where(valid[..., None], lo, big).amin(1), torch.where(valid[..., None], hi, -1).amax(1))

    # -- runs -------------------------------------------------------------------
    @cached_property
    def runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, end, valid): inclusive flattened runs [count, nr] of each tile."""
        if self.flat:
            start = torch.arange(self.count) * self.tile
            end = torch.clamp(start + self.tile - 1, max=self.n - 1)
            return start[:, None], end[:, None], torch.ones(self.count, 1, dtype=torch.bool)
        lo, hi, _ = self.boxes
        lo, hi = lo[:, 0], hi[:, 0]
        rows = torch.cartesian_prod(*[torch.arange(t) for t in self.tile[:-1]]).view(-1, len(self.tile) - 1)
        coords = lo[:, None, :-1] + rows[None]  # [count, nr, nd-1]
        valid = (coords <= hi[:, None, :-1]).all(-1)
        base = (coords * torch.tensor(self.strides[:-1])).sum(-1)
        return base + lo[:, None, -1], base + hi[:, None, -1], valid

    @cached_property
    def span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest flattened index of each tile, both non-decreasing in tile id."""
        if self.flat:
            start = torch.arange(self.count) * self.tile
            return start, torch.clamp(start + self.tile - 1, max=self.n - 1)
        start, end, valid = self.runs
        big = torch.iinfo(torch.long).max
        return torch.where(valid, start, big).amin(1), torch.where(valid, end, -1).amax(1)

    @cached_property
    def contiguous(self) -> bool:
        """Whether every tile's tokens are consecutive flattened indices."""
        if self.flat:
            return True
        lo, hi = self.span
        return bool((hi - lo + 1 == self.sizes).all())

    @cached_property
    def sizes(self) -> torch.Tensor:
        """Number of tokens in each tile (edge tiles are smaller)."""
        start, end, valid = self.runs
        return torch.where(valid, end - start + 1, 0).sum(1)

    # -- tokens -----------------------------------------------------------------
    def starts(self, ids: torch.Tensor) -> torch.Tensor:
        """Flattened index of each given tile's first token (its corner)."""
        if self.flat:
            return ids * self.tile
        return (self.boxes[0][ids, 0] * torch.tensor(self.strides)).sum(-1)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Flattened token indices [len(ids), volume] of the given tiles, -1 where a
        tile at the grid's edge has fewer tokens."""
        if self.flat:
            tok = ids[:, None] * self.tile + torch.arange(self.tile)
            return torch.where(tok < self.n, tok, -1)
        lo = self.boxes[0][ids, 0]  # [m, nd]
        offs = torch.cartesian_prod(*[torch.arange(t) for t in self.tile]).view(-1, len(self.tile))
        coords = lo[:, None, :] + offs[None]
        ok = (coords < torch.tensor(self.shape)).all(-1)
        tok = (coords * torch.tensor(self.strides)).sum(-1)
        return torch.where(ok, tok, -1)
