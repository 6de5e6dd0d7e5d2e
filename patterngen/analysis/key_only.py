"""Key-only patterns (`Sink`, `Strided`, `Full` under unions and intersections): visible
keys counted in any key interval from a periodic table, never per token."""
from __future__ import annotations

import math

import torch

from ..core.tiles import TileGrid
from ..core.tile_eval import key_tile_statuses
from ..ir import Full, Intersection, Pattern, Sink, Spec, Strided, Union

MAX_TABLE = 1 << 22     # residue-table entries (segments x period) of one key-only pattern

def _kv_parts(pattern: Pattern) -> tuple[int, list[int]]:
    """Period (lcm of the strides) and sorted Sink thresholds of a key-only pattern."""
    period, sinks = 1, set()
    for n in pattern.walk():
        if isinstance(n, Strided):
            period = math.lcm(period, n.period)
        elif isinstance(n, Sink):
            sinks.add(n.n)
    return period, sorted(sinks)


def kv_count_ok(pattern: Pattern) -> bool:
    """Whether `KvCount` can tabulate this key-only pattern within `MAX_TABLE` entries."""
    period, sinks = _kv_parts(pattern)
    return period * (len(sinks) + 1) <= MAX_TABLE


def _kv_eval(node: Pattern, r: torch.Tensor, end: int | None) -> torch.Tensor:
    """A key-only pattern on keys of residue r (modulo its period) inside a segment that
    ends before `end` (None: unbounded) and holds no Sink threshold, so Sinks are constant."""
    if isinstance(node, Full):
        return torch.ones(r.shape, dtype=torch.bool)
    if isinstance(node, Sink):
        return torch.full(r.shape, end is not None and node.n >= end, dtype=torch.bool)
    if isinstance(node, Strided):
        return (r // node.block) % node.stride == node.offset  # r: a residue modulo a multiple of the period
    if isinstance(node, (Union, Intersection)):
        parts = [_kv_eval(p, r, end) for p in node.parts]
        out = parts[0]
        for m in parts[1:]:
            out = (out | m) if isinstance(node, Union) else (out & m)
        return out
    raise TypeError(f"not a key-only pattern: {node!r}")


class KvCount:
    """Visible keys of a key-only pattern in any key interval, without touching keys.

    Between consecutive Sink thresholds the pattern is periodic in the lcm P of its
    strides, so one table of prefix counts per segment and residue answers every
    interval: prefix(x) = (visible keys below the segment) + whole periods + table.
    """

    def __init__(self, pattern: Pattern):
        P, sinks = _kv_parts(pattern)
        starts = [0] + [n for n in sinks if n > 0]
        r = torch.arange(P)
        self.P = P
        self.starts = torch.tensor(starts)
        self.table = torch.zeros(len(starts), P + 1, dtype=torch.long)
        for s in range(len(starts)):
            end = starts[s + 1] if s + 1 < len(starts) else None
            self.table[s, 1:] = torch.cumsum(_kv_eval(pattern, r, end).long(), 0)
        tab = self.table.tolist()

        def F(s: int, y: int) -> int:  # visible keys in [0, y) if segment s covered all keys
            return (y // P) * tab[s][P] + tab[s][y % P]

        below, shift = 0, []
        for s, a in enumerate(starts):
            if s:
                below += F(s - 1, a) - F(s - 1, starts[s - 1])
            shift.append(below - F(s, a))
        self.shift = torch.tensor(shift)
        # without strides the pattern is Sinks (and Full) under | and &, so its keys are a prefix:
        # the keys below `prefix_end` (None: every key)
        self.prefix = self._periodic_prefix
        if P == 1:
            vis = [tab[s][1] for s in range(len(starts))]
            k = vis.index(0) if 0 in vis else len(vis)
            if not any(vis[k:]):
                self.prefix_end = starts[k] if k < len(starts) else None
                self.prefix = self._prefix_of_prefix

    def _prefix_of_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prefix_end is None else torch.clamp(x, max=self.prefix_end)

    def _periodic_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Visible keys in [0, x) for x >= 0."""
        s = torch.searchsorted(self.starts, x, right=True) - 1
        return self.shift[s] + (x // self.P) * self.table[s, self.P] + self.table[s, x % self.P]

    def count(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Visible keys in [a, b] (0 where b < a)."""
        a = a.clamp_min(0)
        b1 = torch.maximum(b + 1, a)
        return self.prefix(b1) - self.prefix(a)


def kv_tile_status(node: Pattern, kg: TileGrid, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kv tile: does any / every key satisfy the key-only `node`? Counted over each
    tile's runs of consecutive keys when the pattern tabulates, else scanned in chunks."""
    if kv_count_ok(node):
        kc = KvCount(node)
        start, end, valid = kg.runs
        c = torch.where(valid, kc.count(start, end), 0).sum(1)
        return c > 0, c == kg.sizes
    return key_tile_statuses(node, spec, kg)

