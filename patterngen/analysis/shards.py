"""Which keys each rank of a sequence-sharded attention needs from the others (issue 15).

The sequences are cut into equal chunks along the first dimension of the grid (contiguous
runs of the flattened tokens; slabs of an n-D grid). With the contiguous layout rank r holds
the r-th of `world_size` chunks of the queries and of the keys; with the zig-zag layout (for
causal work, whose cost grows along the sequence) chunks r and 2 * world_size - 1 - r of twice
as many, so every rank gets one cheap and one costly chunk. A rank's tensors hold its tokens in
ascending order. Its queries need the keys of every kv tile that the tile plan visits from
its q tiles, under any head: those it does not hold are received from their owners. The plan
is read from the tile plan (`build_plan`, per kv tile), never from a dense mask, so a window
costs a halo of about its width from each neighbour, rounded to kv tiles, where dense ring
attention moves (world_size - 1) shards to every rank. The transfers are coloured into rounds
in which no rank sends twice or receives twice (`rounds`), the order `distributed.attention`
sends them in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import torch

from .plan import Plan, build_plan
from .tiling import default_tiling
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


LAYOUTS = ("contiguous", "zigzag")
COLOURING_STRATEGIES = ("saturation_largest_first", "smallest_last", "independent_set", "largest_first",
                        "connected_sequential_dfs")


@dataclass(frozen=True)
class DistributedPlan:
    """The shards and transfers of one spec on `world_size` ranks."""

    spec: Spec
    world_size: int
    tiling: Tiling
    layout: str
    q_shards: tuple[tuple[tuple[int, int], ...], ...]  # rank r's query runs [start, end) (flattened)
    kv_shards: tuple[tuple[tuple[int, int], ...], ...]  # rank r's key runs
    transfers: tuple[Transfer, ...]
    tile_plan: Plan = field(repr=False, compare=False)
    q_tile_rank: torch.Tensor = field(repr=False, compare=False)  # owner of each q tile of tile_plan

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

    def held(self, rank: int, what: str = "kv") -> torch.Tensor:
        """The flattened tokens `rank` holds, ascending (its tensors' rows): "q" or "kv"."""
        shards = self.q_shards if what == "q" else self.kv_shards
        return torch.cat([torch.arange(a, b) for a, b in shards[rank]])

    def needed(self, rank: int) -> torch.Tensor:
        """bool [Nkv]: the keys `rank`'s queries read, its own shard's and the received ones."""
        out = torch.zeros(self.spec.nkv, dtype=torch.bool)
        for a, b in self.kv_shards[rank]:
            out[a:b] = True
        for t in self.transfers:
            if t.dst == rank:
                for s, e in t.ranges:
                    out[s:e] = True
        return out

    def q_tiles(self, rank: int) -> torch.Tensor:
        """The q tiles of `tile_plan` whose queries `rank` holds."""
        return (self.q_tile_rank == rank).nonzero().flatten()

    def visited_pairs(self, rank: int) -> int:
        """Tile pairs `rank`'s q tiles visit, summed over heads: its share of the compute."""
        tiles = self.q_tiles(rank)
        return sum(int(self.tile_plan.head_plan(h).q_ptr.diff()[tiles].sum()) for h in range(self.spec.num_heads))

    @cached_property
    def rounds(self) -> tuple[tuple[Transfer, ...], ...]:
        """The transfers in rounds where no rank sends twice or receives twice: a colouring of
        the graph whose edges join transfers that share a sender or a receiver, the fewest
        colours of networkx's greedy strategies (at least the most messages one rank sends or
        receives, which an optimal colouring reaches: the transfers form a bipartite graph)."""
        conflicts = nx.Graph()
        conflicts.add_nodes_from(range(len(self.transfers)))
        for i, a in enumerate(self.transfers):
            for j in range(i):
                b = self.transfers[j]
                if a.src == b.src or a.dst == b.dst:
                    conflicts.add_edge(i, j)
        colour = min((nx.greedy_color(conflicts, strategy=s) for s in COLOURING_STRATEGIES),
                     key=lambda c: len(set(c.values())))
        return tuple(tuple(self.transfers[i] for i in sorted(colour) if colour[i] == c)
                     for c in sorted(set(colour.values())))


def _shards(shape: tuple[int, ...], world_size: int, layout: str, what: str) -> tuple:
    """Each rank's runs [start, end) of the flattened grid `shape` (chunks along its first dimension)."""
    chunks = world_size if layout == "contiguous" else 2 * world_size
    first = shape[0]
    if first % chunks:
        raise ValueError(f"world_size: {world_size} ranks cannot hold equal {layout} shards of the {what} grid "
                         f"{shape} (its first dimension, {first}, is not a multiple of {chunks})")
    per = first // chunks * math.prod(shape[1:])
    owned = [[r] if layout == "contiguous" else [r, chunks - 1 - r] for r in range(world_size)]
    return tuple(tuple((c * per, (c + 1) * per) for c in cs) for cs in owned)


def _owner(shards: tuple, n: int) -> torch.Tensor:
    """long [n]: the rank holding each flattened token."""
    owner = torch.empty(n, dtype=torch.long)
    for r, runs in enumerate(shards):
        for a, b in runs:
            owner[a:b] = r
    return owner


def _ranges(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """[start, end) runs of True in a 1-D bool tensor."""
    if not bool(mask.any()):
        return ()
    x = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = x.diff().nonzero().flatten().view(-1, 2)
    return tuple((int(a), int(b)) for a, b in edges)


def _fit(tile, shape: tuple[int, ...], shards: tuple):
    """`tile` cut so that its length along the first dimension divides the chunks'."""
    a, b = shards[0][0]
    if isinstance(tile, int):
        return math.gcd(tile, b - a)
    return (math.gcd(tile[0], (b - a) // math.prod(shape[1:])),) + tuple(tile[1:])


def _fitted(tiling: Tiling, spec: Spec, q_shards: tuple, kv_shards: tuple) -> Tiling:
    """`tiling` with tiles that fit the chunks: no q tile straddles two ranks (required), no kv
    tile either (else a rank would receive a straddling tile's keys that its queries never see)."""
    return Tiling(_fit(tiling.q_tile, spec.q_shape, q_shards), _fit(tiling.kv_tile, spec.kv_shape, kv_shards))


def plan(spec: Spec, world_size: int, tiling: Tiling | None = None, layout: str = "contiguous") -> DistributedPlan:
    """The transfers of `spec` sharded over `world_size` ranks in `layout` ("contiguous" or
    "zigzag"), at `tiling` (default: the kernels' tiling policy, its tiles cut to divisors
    of the chunks). A q tile must lie in one chunk, so the chunk length along the first
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
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    q_shards = _shards(spec.q_shape, world_size, layout, "query")
    kv_shards = _shards(spec.kv_shape, world_size, layout, "key")
    tiling = _fitted(default_tiling(spec), spec, q_shards, kv_shards) if tiling is None else tiling
    tp = build_plan(spec, tiling)
    qg, kg = tp.q_grid, tp.kv_grid
    owner = _owner(q_shards, spec.nq)
    q_tok = qg.tokens(torch.arange(qg.count))
    valid = q_tok >= 0  # -1: slots past the grid's edge
    q_rank = owner[q_tok.clamp_min(0)]
    first = torch.where(valid, q_rank, world_size).min(1).values
    last = torch.where(valid, q_rank, -1).max(1).values
    if not torch.equal(first, last):
        raise ValueError(f"tiling: q tiles {tiling.q_tile!r} straddle the {layout} shards of {world_size} ranks "
                         f"over {spec.q_shape}; pick shards whose first-dimension length is a multiple of the "
                         f"q tile's")
    need = torch.zeros(world_size, kg.count, dtype=torch.bool)
    for g in tp.groups:
        qt, kt, _ = g.pairs()
        need[first[qt], kt] = True
    kv_owner = _owner(kv_shards, spec.nkv)
    transfers = []
    for dst in range(world_size):
        tok = kg.tokens(need[dst].nonzero().flatten()).flatten()
        keys = torch.zeros(spec.nkv, dtype=torch.bool)
        keys[tok[tok >= 0]] = True
        for src in range(world_size):
            if src != dst:
                ranges = _ranges(keys & (kv_owner == src))
                if ranges:
                    transfers.append(Transfer(src, dst, ranges))
    return DistributedPlan(spec, world_size, tiling, layout, q_shards, kv_shards, tuple(transfers), tp, first)


def ring_tokens(spec: Spec, world_size: int) -> int:
    """Keys each rank receives in dense ring attention: every other rank's shard."""
    return spec.nkv // world_size * (world_size - 1)


__all__ = ["LAYOUTS", "DistributedPlan", "Transfer", "plan", "ring_tokens"]