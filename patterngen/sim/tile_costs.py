"""Measured tile costs: the instructions of one full and of one partial kv-tile step of the
forward kernel, read from its SASS by `patterngen audit --calibrate` (kernels cross-compiled on
a CPU, no GPU needed), kept in tile_costs.json beside this module.

The time model takes a partial tile's cost over a full one's from these counts instead of a
prior: mask code is what a partial step adds, and its instructions are measured. A device
gives its arch in its JSON ("arch"); a device fitted from GPU timings (`calibrated`) keeps its
fitted factor, since a measured time says more than an instruction count.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

TILE_COSTS = Path(__file__).with_name("tile_costs.json")


@lru_cache(maxsize=None)
def load() -> dict:
    """The data file: {"command", "date", "spec", "entries": [{arch, dtype, head_dim, q_tile, kv_tile,
    num_warps, num_stages, full_tile, partial_tile}, ...]}."""
    return json.loads(TILE_COSTS.read_text())


def _distance(entry: dict, head_dim: int, q_volume: int, kv_volume: int) -> tuple[float, float]:
    """Head dim first, then tile shape, both in octaves."""
    return (abs(math.log2(entry["head_dim"] / head_dim)),
            abs(math.log2(entry["q_tile"] / q_volume)) + abs(math.log2(entry["kv_tile"] / kv_volume)))


def nearest(arch: int, head_dim: int, q_volume: int, kv_volume: int) -> dict | None:
    """The entry of `arch` nearest to the head dim and tile volumes (None: no entry for the arch)."""
    entries = [e for e in load()["entries"] if e["arch"] == arch]
    return min(entries, key=lambda e: _distance(e, head_dim, q_volume, kv_volume), default=None)


def partial_tile_factor(arch: int | None, head_dim: int, q_volume: int, kv_volume: int) -> float | None:
    """A partial kv-tile step's instructions over a full one's, from the nearest measured
    entry of `arch` (None: the arch has none)."""
    entry = None if arch is None else nearest(arch, head_dim, q_volume, kv_volume)
    return None if entry is None else entry["partial_tile"] / entry["full_tile"]


__all__ = ["TILE_COSTS", "load", "nearest", "partial_tile_factor"]
