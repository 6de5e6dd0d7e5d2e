"""Tile shapes on a token grid: the box tiles of a given volume, flat tiles seen as boxes
(tile counts: `core.tiles.TileGrid.count`; volumes: `analysis.tiling.volume`).

A tile is an int (that many consecutive tokens of the flattened grid) or a tuple (a box,
one extent per grid dimension). The search enumerates shapes here and the closed forms
need to know when a flat tile is in fact a box.
"""
from __future__ import annotations

from typing import Sequence

from ..analysis.tiling import pow2_ceil


def _factorisations(volume: int, caps: Sequence[int]) -> list[tuple[int, ...]]:
    """Ordered factorisations of `volume` into len(caps) factors, factor k <= caps[k]."""
    if len(caps) == 1:
        return [(volume,)] if volume <= caps[0] else []
    out = []
    for f in range(1, min(volume, caps[0]) + 1):
        if volume % f == 0:
            out += [(f,) + rest for rest in _factorisations(volume // f, caps[1:])]
    return out


def box_shapes(volume: int, shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Box tiles of exactly `volume` tokens on a grid, no extent beyond the next power of
    two of the grid's (a larger one only pads)."""
    return _factorisations(volume, [pow2_ceil(n) for n in shape])


def flat_as_box(volume: int, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The box that a flat tile of `volume` consecutive tokens is on this grid, if any
    (e.g. 128 on a grid whose last extent is 128 or 256 is the box (1, ..., 1, 128))."""
    rest, box = volume, [1] * len(shape)
    for k in reversed(range(len(shape))):
        if rest >= shape[k]:
            if rest % shape[k]:
                return None
            box[k], rest = shape[k], rest // shape[k]
        else:
            if shape[k] % rest:
                return None
            box[k], rest = rest, 1
            break
    return tuple(box) if rest == 1 else None


def tile_dims(tile, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The tile as one extent per grid dimension (a flat tile only when it is a box), else None."""
    if len(shape) == 1:
        return (tile,)
    return flat_as_box(tile, shape) if isinstance(tile, int) else tile


def format_tile(t) -> str:
    """'128' for a flat tile, '16x8' for a box."""
    return str(t) if isinstance(t, int) else "x".join(map(str, t))


__all__ = ["box_shapes", "flat_as_box", "tile_dims", "format_tile"]
