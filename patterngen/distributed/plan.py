"""Which keys each rank of a sequence-sharded attention needs from the others (issue 15).

Rank r holds the r-th of `world_size` equal contiguous shards of the flattened query and key
sequences (for an n-D grid, a slab along its first dimension, which is contiguous when
flattened). Its queries need the keys of every kv tile that the tile plan visits from its
q tiles, under any head: those outside its own shard are received from their owners. The plan
is read from the tile plan (`build_plan`, per kv tile), never from a dense mask, so a window
costs a halo of about its width from each neighbour, rounded to kv tiles, where dense ring
attention moves (world_size - 1) shards to every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..analysis.plan import build_plan
from ..analysis.tiling import default_tiling
from ..core.tiles import Tiling
from ..ir import Spec


@dataclass(frozen=True)
class Transfer:
    """Keys [start, end) ranges (flattened kv tokens) that rank `src` sends to rank `dst`."""

    src: int
    dst: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class DistributedPlan:
    """The shards and transfers of one spec on `world_size` ranks."""

    spec: Spec
    world_size: int
    tiling: Tiling
    q_shards: tuple[tuple[int, int], ...]  # rank r's queries [start, end) (flattened)
    kv_shards: tuple[tuple[int, int], ...]  # rank r's keys
    transfers: tuple[Transfer, ...]

    @property
    def received_tokens(self) -> tuple[int, ...]:
        """Keys each rank receives from the others."""
        got = [0] * self.world_size
        for t in self.transfers:
            got[t.dst] += t.tokens
        return tuple(got)

    def received_from(self, rank: int) -> dict[int, tuple[tuple[int, int], ...]]:
        """{source rank: key ranges} that `rank` receives."""
        return {t.src: t.ranges for t in self.transfers if t.dst == rank}

    def needed(self, rank: int) -> torch.Tensor:
        """bool [Nkv]: the keys `rank`'s queries read, its own shard's and the received ones."""
        out = torch.zeros(self.spec.nkv, dtype=torch.bool)
        a, b = self.kv_shards[rank]
        out[a:b] = True
        for t in self.transfers:
            if t.dst == rank:
                for s, e in t.ranges:
                    out[s:e] = True
        return out


def _shards(shape: tuple[int, ...], world_size: int, what: str) -> tuple[tuple[int, int], ...]:
    first = shape[0]
    if first % world_size:
        raise ValueError(f"world_size: {world_size} ranks cannot hold equal shards of the {what} grid {shape} (its "
                         f"first dimension, {first}, is not a multiple of {world_size})")
    per = first // world_size * math.prod(shape[1:])
    return tuple((r * per, (r + 1) * per) for r in range(world_size))


def _ranges(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """[start, end) runs of True in a 1-D bool tensor."""
    if not bool(mask.any()):
        return ()
    x = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = x.diff().nonzero().flatten().view(-1, 2)
    return tuple((int(a), int(b)) for a, b in edges)


def plan(spec: Spec, world_size: int, tiling: Tiling | None = None) -> DistributedPlan:
    """The transfers of `spec` sharded over `world_size` ranks (equal contiguous shards of the
    flattened sequences; slabs along the first dimension of a grid), at `tiling` (default: the
    kernels' tiling policy). A q tile must lie in one shard, so the shard length along the first
    dimension is a multiple of the q tile's. Routed patterns choose keys at run time: refused."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if spec.length_free:
        raise ValueError(f"spec: a distributed plan needs the lengths (the shards are parts of them), got the "
                         f"length-free {spec!r}; bind it first (spec.bind(nq, nkv))")
    if spec.routed is not None:
        raise ValueError(f"spec: {spec.routed!r} picks its keys at run time, so no plan can say ahead which ranks "
                         f"send what")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    tiling = default_tiling(spec) if tiling is None else tiling
    q_shards, kv_shards = _shards(spec.q_shape, world_size, "query"), _shards(spec.kv_shape, world_size, "key")
    tp = build_plan(spec, tiling)
    qg, kg = tp.q_grid, tp.kv_grid
    owner = torch.tensor([r for r, (a, b) in enumerate(q_shards) for _ in range(b - a)])  # query token -> rank
    q_tok = qg.tokens(torch.arange(qg.count))
    first = q_tok.masked_fill(q_tok < 0, spec.nq).min(1).values  # -1: slots past the grid's edge
    last = q_tok.max(1).values
    if not torch.equal(owner[first], owner[last]):
        raise ValueError(f"tiling: q tiles {tiling.q_tile!r} straddle the shards of {world_size} ranks over "
                         f"{spec.q_shape}; pick shards whose first-dimension length is a multiple of the q tile's")
    q_rank = owner[first]
    need = torch.zeros(world_size, kg.count, dtype=torch.bool)
    for g in tp.groups:
        qt, kt, _ = g.pairs()
        need[q_rank[qt], kt] = True
    kv_owner = torch.tensor([r for r, (a, b) in enumerate(kv_shards) for _ in range(b - a)])
    transfers = []
    for dst in range(world_size):
        tiles = need[dst].nonzero().flatten()
        tok = kg.tokens(tiles).flatten()
        tok = tok[tok >= 0]
        keys = torch.zeros(spec.nkv, dtype=torch.bool)
        keys[tok] = True
        for src in range(world_size):
            if src != dst:
                ranges = _ranges(keys & (kv_owner == src))
                if ranges:
                    transfers.append(Transfer(src, dst, ranges))
    return DistributedPlan(spec, world_size, tiling, q_shards, kv_shards, tuple(transfers))


def ring_tokens(spec: Spec, world_size: int) -> int:
    """Keys each rank receives in dense ring attention: every other rank's shard."""
    return spec.nkv // world_size * (world_size - 1)


__all__ = ["DistributedPlan", "Transfer", "plan", "ring_tokens"]