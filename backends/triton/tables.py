"""Plan -> the int32 tables the kernels walk.

A spec's heads fall into groups sharing one static pattern (a head's Routed part is chosen
at run time); each group gets a tile plan, and the kernels read the plans as flat index
tables: per q tile its kv tiles (forward, dQ), per kv tile its q tiles (dK/dV), full tiles
first so that they run without mask code. A kv tile cut short by the end of the keys (or a
grid's edge) is never full in these tables (`kernel_plan`), so full tiles need no bounds
mask and the kernel text does not depend on whether the lengths divide the tiles.

The tables depend on the lengths: a fixed-length spec has one set (`LengthTables`, built
on first use), a length-free spec one per call's (nq, nkv), kept in a `LengthCache`.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from functools import cached_property
from typing import Callable

import torch

from ...analysis.classify import TileAnalysis, has_routed
from ...analysis.plan import TilePlan
from ...core.statuses import FULL, PARTIAL, expand_ranges
from ...core.tiles import TileGrid, Tiling
from ...ir import Pattern, Routed, Spec, Union

LENGTH_TABLES = 64
"""Most (nq, nkv) whose tables one length-free kernel keeps (least recently used dropped):
a few hundred KB each at 32K tokens with 64-token tiles, rebuilt in milliseconds."""


class DeviceTables:
    """Named host tables and their copies on the devices the kernels run on: each table is
    copied to a device once, on its first use there. A table may be given as a function
    that makes it, called on first use (tables a walk does not read are never built)."""

    def __init__(self, **host: torch.Tensor | Callable[[], torch.Tensor]):
        self.host = host
        self._copies: dict = {}

    def host_table(self, name: str) -> torch.Tensor:
        """The table `name` on the host (made now if it was given as a function)."""
        table = self.host[name]
        if callable(table):
            table = self.host[name] = table()
        return table

    def get(self, name: str, device) -> torch.Tensor:
        """The table `name` on `device`."""
        key = (name, device)
        if key not in self._copies:
            self._copies[key] = self.host_table(name).to(device)
        return self._copies[key]

    def on(self, device, *names: str) -> tuple[torch.Tensor, ...]:
        """The tables `names` on `device`."""
        return tuple(self.get(name, device) for name in names)

    def all_on(self, device) -> dict[str, torch.Tensor]:
        """Every table on `device`, by name."""
        return {name: self.get(name, device) for name in self.host}


def split_routed(pattern: Pattern) -> tuple[Routed | None, Pattern | None]:
    """(Routed part, static part) of a head pattern of the form Routed, Routed | static, or static."""
    if isinstance(pattern, Routed):
        return pattern, None
    if isinstance(pattern, Union):
        routed = [p for p in pattern.parts if isinstance(p, Routed)]
        rest = [p for p in pattern.parts if not isinstance(p, Routed)]
        if len(routed) == 1 and not any(has_routed(p) for p in rest):
            return routed[0], Union.of(*rest)
    if has_routed(pattern):
        raise NotImplementedError(f"triton backend: {pattern!r}: Routed blocks are generated only as "
                                  f"`Routed(...)` or `Routed(...) | static`; use backend='reference'")
    return None, pattern


def head_groups(spec: Spec) -> tuple[list[Pattern | None], torch.Tensor, torch.Tensor]:
    """(statics, HEAD_GROUP, routed_heads): the distinct static parts of the heads' patterns
    (None: nothing static), each head's group (int32 [H]) and whether it has a Routed part
    (bool [H]). One mask function and one plan serve every head of a group."""
    parts = [split_routed(p) for p in spec.head_patterns]
    statics = list(dict.fromkeys(s for _, s in parts))
    head_group = torch.tensor([statics.index(s) for _, s in parts], dtype=torch.int32)
    return statics, head_group, torch.tensor([r is not None for r, _ in parts])


def short_tiles(grid: TileGrid) -> torch.Tensor:
    """bool [tiles]: which tiles hold fewer tokens than the tile's volume (the last flat tile
    of a length the tile does not divide; boxes at a ragged grid edge)."""
    if grid.flat:
        short = torch.zeros(grid.count, dtype=torch.bool)
        if grid.n % grid.tile:
            short[-1] = True
        return short
    return grid.sizes < grid.volume


def kernel_plan(tp: TilePlan, kv_grid: TileGrid) -> TilePlan:
    """The plan as the kernels walk it: a full kv tile that is cut short becomes partial, so
    the masked step (which drops missing keys) handles it and full steps need no mask."""
    short = short_tiles(kv_grid)
    if not tp.visited or not bool(short.any()):
        return tp
    return TilePlan(tp.q_ptr, tp.kv_tiles, tp.full & ~short[tp.kv_tiles])


def group_plans(spec: Spec, statics: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid) -> list[TilePlan]:
    """The kernel plan (`kernel_plan`) of each group's static part (an empty plan for None)."""
    ctx = TileAnalysis(spec, q_grid, kv_grid)
    empty = TilePlan.from_pairs(q_grid.count, *(torch.zeros(0, dtype=torch.long),) * 2,
                                torch.zeros(0, dtype=torch.int8))
    return [empty if p is None else kernel_plan(TilePlan.from_pairs(q_grid.count, *ctx.classify(p)), kv_grid)
            for p in statics]


@functools.lru_cache(maxsize=1024)
def _compiled(code: str):
    return compile(code, "<segment>", "eval")


def _evaluate(code: str, tiles: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    ns = {"qt": tiles, "nq": nq, "nkv": nkv, "floordiv": lambda a, b: torch.as_tensor(a) // b,
          "minimum": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
          "maximum": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b))}
    return torch.as_tensor(eval(_compiled(code), ns)).expand(tiles.shape)  # noqa: S307 - our own printed expression


def segment_pairs(code: tuple[dict, ...], num_q_tiles: int, nq: int, nkv: int,
                  kv_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q tile, kv tile, full) of the pairs closed-form segments (`ranges.closed_form`'s code)
    visit at these lengths, in CSR order (q tile, then kv tile): vectorised torch arithmetic
    on the printed expressions, no tile analysis."""
    tiles = torch.arange(num_q_tiles)
    rows, cols, full = [], [], []
    for c in code:
        lo, hi, flo, fhi = (_evaluate(c[k], tiles, nq, nkv) for k in ("lo", "hi", "flo", "fhi"))
        r, k = expand_ranges(lo, hi)
        rows.append(r)
        cols.append(k)
        full.append((k >= torch.maximum(flo, lo)[r]) & (k <= torch.minimum(fhi, hi)[r]))
    rows, cols, full = torch.cat(rows), torch.cat(cols), torch.cat(full)
    order = torch.argsort(rows * (-(-nkv // kv_tile) + 1) + cols)
    return rows[order], cols[order], full[order]


def forward_tables(spec: Spec, groups: list[TilePlan], head_group: torch.Tensor, routed_heads: torch.Tensor,
                   kv_tile: int):
    """ROWS [groups, q tiles, 3] = (first, first partial, end) into COLS, full tiles first;
    WORK = (head, q tile) pairs, heaviest first so long rows start early (a routed head's q
    tile also walks topk blocks of kv tiles of `kv_tile` tokens)."""
    rows, cols, base = [], [], 0
    for tp in groups:
        q, kt, full = tp.pairs()
        order = torch.argsort(q * 2 + (~full).long(), stable=True)  # per q tile: full, then partial
        cols.append(kt[order])
        n_full = torch.bincount(q[full], minlength=tp.num_q_tiles)
        start = tp.q_ptr[:-1] + base
        rows.append(torch.stack([start, start + n_full, tp.q_ptr[1:] + base], 1))
        base += tp.visited
    cost = torch.stack([groups[g].q_ptr.diff() for g in head_group.tolist()])  # [H, q tiles]
    if spec.routed is not None:
        cost = cost + routed_heads[:, None] * spec.routed.topk * (spec.routed.block // kv_tile)
    order = torch.argsort(cost.flatten(), descending=True, stable=True)
    work = torch.stack([order // cost.shape[1], order % cost.shape[1]], 1)
    return torch.stack(rows).to(torch.int32), torch.cat(cols).to(torch.int32), work.to(torch.int32)


def transposed_tables(groups: list[TilePlan], q_grid: TileGrid, num_kv_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS_T [groups, kv tiles, 3] = (first, first partial, end) into COLS_T, the q tiles
    that see each kv tile, full ones first: the dK/dV kernel's walk. There the q tile is the
    inner one, so a q tile cut short is never full (as `kernel_plan` does for kv tiles): full
    steps load whole q tiles, without a mask. COLS_T holds each q tile's first token, not its
    index: a full step then decodes nothing (12 instructions a step for 3-D box tiles)."""
    short = short_tiles(q_grid)
    rows, cols, base = [], [], 0
    for tp in groups:
        q, kt, full = tp.pairs()
        full = full & ~short[q]
        order = torch.argsort(kt * 2 * tp.num_q_tiles + (~full).long() * tp.num_q_tiles + q, stable=True)
        cols.append(q_grid.starts(q[order]))
        count = torch.bincount(kt, minlength=num_kv_tiles)
        n_full = torch.bincount(kt[full], minlength=num_kv_tiles)
        ptr = torch.cumsum(count, 0) - count + base
        rows.append(torch.stack([ptr, ptr + n_full, ptr + count], 1))
        base += tp.visited
    return torch.stack(rows).to(torch.int32), torch.cat(cols).to(torch.int32)


def routed_transpose(idx: torch.Tensor, num_kv_blocks: int):
    """(RT_PTR [B*H*kv blocks + 1], RT_Q) int32: per (batch, head, kv block), the q blocks whose
    routed blocks include it, in q order; a block listed twice by one q block counts once.
    Fixed-size torch ops (a sort, a scatter-add, a cumsum) on the device: no host sync."""
    B, H, nqb, K = idx.shape
    idx = idx.long()
    earlier = torch.zeros_like(idx, dtype=torch.bool)
    for j in range(1, K):
        earlier[..., j] = (idx[..., j:j + 1] == idx[..., :j]).any(-1)
    valid = (idx >= 0) & ~earlier
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
    none = B * H * num_kv_blocks
    key = torch.where(valid, bh * num_kv_blocks + idx, none).flatten()
    qb = torch.arange(nqb, device=idx.device).view(1, 1, nqb, 1).expand(B, H, nqb, K).flatten()
    order = torch.argsort(key * nqb + qb)
    counts = torch.zeros(none + 1, dtype=torch.long, device=idx.device).scatter_add_(0, key, torch.ones_like(key))
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:-1], 0)])
    return ptr.to(torch.int32), qb[order].to(torch.int32)


def _runs(qt: torch.Tensor, kt: torch.Tensor, full: torch.Tensor, num_kv_tiles: int):
    """Per kv tile, the q tiles that see it as maximal runs (first, last, full) of consecutive
    tiles of one class, and a pointer array [num_kv_tiles + 1] into them."""
    order = torch.argsort(kt * (int(qt.max()) + 2 if len(qt) else 1) + qt)
    qt, kt, full = qt[order], kt[order], full[order].long()
    new = torch.ones(len(qt), dtype=torch.bool)
    if len(qt):
        new[1:] = (kt[1:] != kt[:-1]) | (qt[1:] != qt[:-1] + 1) | (full[1:] != full[:-1])
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([len(qt)])])[:len(starts)] - 1  # none when nothing is seen
    runs = torch.stack([qt[starts], qt[ends], full[starts]], 1)
    ptr = torch.zeros(num_kv_tiles + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(kt[starts], minlength=num_kv_tiles), 0)
    return runs, ptr


def heads_tables(groups: list[TilePlan], num_q_tiles: int, num_kv_tiles: int, classes: bool) -> dict:
    """The head-routed kernels' tables: per (group, q tile) the kv tile range KV_LO..KV_HI,
    with `classes` the tile-class table CLASSES [groups, q tiles, kv tiles] (0 empty,
    1 partial, 2 full) that the tile-union walk reads, and per kv tile the runs of q tiles
    that see it (RUN_PTR into RUNS) for dK/dV."""
    shape = (len(groups), num_q_tiles, num_kv_tiles) if classes else (1, 1, 1)
    table = torch.zeros(shape, dtype=torch.int8)
    kv_lo = torch.full((len(groups), num_q_tiles), num_kv_tiles, dtype=torch.long)
    kv_hi = torch.full((len(groups), num_q_tiles), -1, dtype=torch.long)
    runs, ptrs, base = [], [], 0
    for g, tp in enumerate(groups):
        q, kt, full = tp.pairs()
        if classes:
            table[g, q, kt] = 1 + full.to(torch.int8)
        kv_lo[g].scatter_reduce_(0, q, kt, "amin")
        kv_hi[g].scatter_reduce_(0, q, kt, "amax")
        r, p = _runs(q, kt, full, num_kv_tiles)
        runs.append(r)
        ptrs.append(p + base)
        base += len(r)
    return {"KV_LO": kv_lo.to(torch.int32), "KV_HI": kv_hi.to(torch.int32), "CLASSES": table,
            "RUN_PTR": torch.stack(ptrs).to(torch.int32), "RUNS": torch.cat(runs).to(torch.int32)}


class LengthTables:
    """Everything that depends on one call's lengths: the bound spec, its tile grids, the
    groups' kernel plans and the tables the walks read (`device`), each made on first use;
    `device` is where the launchers take them from. `saved` (a build's tables) replaces
    the analysis."""

    def __init__(self, spec: Spec, tiling: Tiling, statics: list[Pattern | None], head_group: torch.Tensor,
                 routed_heads: torch.Tensor, saved: dict | None = None, segments: list | None = None):
        self.spec, self.statics, self.segments = spec, statics, segments
        self.head_group, self.routed_heads = head_group, routed_heads
        self.q_grid = TileGrid(spec.q_shape, tiling.q_tile, "q_tile")
        self.kv_grid = TileGrid(spec.kv_shape, tiling.kv_tile, "kv_tile")
        self._heads: dict[bool, dict] = {}
        made = {"rows": lambda: self.forward[0], "cols": lambda: self.forward[1], "work": lambda: self.forward[2],
                "rows_t": lambda: self.transposed[0], "cols_t": lambda: self.transposed[1]}
        self.device = DeviceTables(**{**made, **(saved or {})})

    @cached_property
    def groups(self) -> list[TilePlan]:
        """The groups' kernel plans: from closed-form `segments` (per group, None: none) where
        given, in torch arithmetic on the tile indices, else from the tile analysis. Both are
        exact; the segments may leave a full tile partial (masked, still exact)."""
        if self.segments is None or any(c is None for c in self.segments):
            return group_plans(self.spec, self.statics, self.q_grid, self.kv_grid)
        return [TilePlan.from_pairs(self.q_grid.count, q, k, torch.where(full, FULL, PARTIAL))
                for q, k, full in (segment_pairs(c, self.q_grid.count, self.spec.nq, self.spec.nkv,
                                                 self.kv_grid.tile) for c in self.segments)]

    @cached_property
    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ROWS, COLS, WORK): `forward_tables`."""
        return forward_tables(self.spec, self.groups, self.head_group, self.routed_heads, self.kv_grid.volume)

    @cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ROWS_T, COLS_T): `transposed_tables`."""
        return transposed_tables(self.groups, self.q_grid, self.kv_grid.count)

    def heads(self, classes: bool) -> DeviceTables:
        """The head-routed kernels' tables (`heads_tables`)."""
        if classes not in self._heads:
            self._heads[classes] = DeviceTables(**heads_tables(self.groups, self.q_grid.count, self.kv_grid.count,
                                                               classes))
        return self._heads[classes]


class LengthCache:
    """The `LengthTables` of the most recent `size` (nq, nkv), made by `make` on a miss."""

    def __init__(self, make: Callable[[int, int], LengthTables], size: int = LENGTH_TABLES):
        self.make, self.size = make, size
        self._entries: OrderedDict[tuple[int, int], LengthTables] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, nq: int, nkv: int) -> LengthTables:
        key = (nq, nkv)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        entry = self.make(nq, nkv)  # outside the lock: plans take milliseconds
        with self._lock:
            entry = self._entries.setdefault(key, entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
