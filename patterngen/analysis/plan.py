"""Plans: for each q tile, the kv tiles to visit, split into full and partial.

Heads with the same pattern share one `TilePlan`; with Routed patterns every
(batch, head) that routes gets its own, since its blocks are chosen at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.statuses import FULL
from .classify import TileAnalysis, has_routed
from ..ir import Spec
from ..routing.blocks import block_masks, box_routed, flat_equivalent, normalize_block_indices
from .runtime import runs_split
from ..core.tiles import TileGrid, Tiling
from .tiling import default_tiling


@dataclass(frozen=True)
class TilePlan:
    """CSR over q tiles: kv_tiles[q_ptr[i]:q_ptr[i+1]] are visited by q tile i,
    ascending, each once; `full` marks those that need no mask."""

    q_ptr: torch.Tensor
    kv_tiles: torch.Tensor
    full: torch.Tensor

    @property
    def num_q_tiles(self) -> int:
        return len(self.q_ptr) - 1

    @property
    def visited(self) -> int:
        return len(self.kv_tiles)

    @property
    def num_full(self) -> int:
        return int(self.full.sum())

    @property
    def num_partial(self) -> int:
        return self.visited - self.num_full

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q tile, kv tile, full) of every visited pair."""
        q = torch.repeat_interleave(torch.arange(self.num_q_tiles), self.q_ptr.diff())
        return q, self.kv_tiles, self.full

    @classmethod
    def from_pairs(cls, num_q_tiles: int, qt: torch.Tensor, kt: torch.Tensor, status: torch.Tensor) -> "TilePlan":
        ptr = torch.zeros(num_q_tiles + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(torch.bincount(qt, minlength=num_q_tiles), 0)
        return cls(ptr, kt, status == FULL)


@dataclass(frozen=True)
class Plan:
    """The tile plan of a spec: `groups[head_group[b, h]]` is the plan of head h
    (of batch b when routed; head_group has one row otherwise)."""

    spec: Spec
    tiling: Tiling
    q_grid: TileGrid
    kv_grid: TileGrid
    groups: tuple[TilePlan, ...]
    head_group: torch.Tensor

    @property
    def total_pairs(self) -> int:
        """Tile pairs of one head (all of them, visited or not)."""
        return self.q_grid.count * self.kv_grid.count

    def head_plan(self, head: int, batch: int = 0) -> TilePlan:
        return self.groups[int(self.head_group[batch if self.head_group.shape[0] > 1 else 0, head])]

    def counts(self) -> dict[str, int]:
        """Totals over heads (and batches, when routed): visited, full, partial, empty and all tile pairs."""
        g = self.head_group.flatten().tolist()
        visited = sum(self.groups[i].visited for i in g)
        full = sum(self.groups[i].num_full for i in g)
        total = self.total_pairs * len(g)
        return {"tile_pairs": total, "visited": visited, "full": full, "partial": visited - full,
                "empty": total - visited}


def build_plan(spec: Spec, tiling: Tiling | None = None, block_indices: torch.Tensor | None = None) -> Plan:
    """Classify every tile pair of every head and collect the visited ones. A box-routed spec
    (Routed with a tuple block on every head) is planned as what it runs as: flat routing in
    block-major token order (`routing.blocks.flat_equivalent`; box tiles count as their
    volumes). Specs that run split by head class (`analysis.runtime.runs_split`) have no plan."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a patterngen.Spec, got {type(spec).__name__}")
    if runs_split(spec):
        what = "Clustered()" if spec.clustered else "box-routed blocks in compositions"
        raise ValueError(f"spec: {spec!r} holds {what}, whose pairs come from run-time ids, so it has no tile "
                         f"plan ahead of a call; run it with "
                         f"pg.attention (ids: q_clusters=, kv_clusters= or block_indices=), count its work with "
                         f"pg.simulate(spec, clusters=..., block_indices=...)")
    if box_routed(spec):
        if tiling is not None:
            tiling = Tiling(*(t if isinstance(t, int) else math.prod(t) for t in (tiling.q_tile, tiling.kv_tile)))
        return build_plan(flat_equivalent(spec), tiling, block_indices)
    tiling = default_tiling(spec) if tiling is None else tiling
    if not isinstance(tiling, Tiling):
        raise TypeError(f"tiling must be a patterngen Tiling, got {type(tiling).__name__}")
    qg = TileGrid(spec.q_shape, tiling.q_tile, "q_tile")
    kg = TileGrid(spec.kv_shape, tiling.kv_tile, "kv_tile")
    if qg.count == 0 or kg.count == 0 or spec.num_heads == 0:  # no pair to classify: one empty plan
        none = torch.zeros(0, dtype=torch.long)
        empty = TilePlan.from_pairs(qg.count, none, none, torch.zeros(0, dtype=torch.int8))
        return Plan(spec, tiling, qg, kg, (empty,), torch.zeros(1, spec.num_heads, dtype=torch.long))
    indices = normalize_block_indices(spec, block_indices)
    static = TileAnalysis(spec, qg, kg)
    groups: list[TilePlan] = []
    index: dict = {}

    def group_of(key, ctx, pattern) -> int:
        if key not in index:
            index[key] = len(groups)
            groups.append(TilePlan.from_pairs(qg.count, *ctx.classify(pattern)))
        return index[key]

    if indices is None:
        head_group = [[group_of(p, static, p) for p in spec.head_patterns]]
    else:
        masks = block_masks(spec, indices)
        head_group = []
        for b in range(masks.shape[0]):
            row = []
            for h, p in enumerate(spec.head_patterns):
                if has_routed(p):
                    ctx = TileAnalysis(spec, qg, kg, masks[b, h], shared=static.memo)
                    row.append(group_of((p, b, h), ctx, p))
                else:
                    row.append(group_of(p, static, p))
            head_group.append(row)
    return Plan(spec, tiling, qg, kg, tuple(groups), torch.tensor(head_group, dtype=torch.long))
