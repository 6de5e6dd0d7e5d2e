"""Patterns as atoms: the indicator of a Heads-free pattern as a signed sum of conjunctions.

Inclusion-exclusion on indicator functions, which are idempotent: `a | b` = a + b - a*b,
`a & b` = a*b. `Global(n)` is the union of two atoms, `kv < n` and `q < n`; `Sink(n)` is
`kv < n`; `Routed(causal=True)` is the routed block mask times `Causal()`. Counting a
conjunction is then one interval (and one residue class) per query, which `counting`
does in closed form or row by row; `Routes` holds a routed (batch, head)'s blocks as a
CSR so that nothing of size q blocks x kv blocks is built on the way.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..ir import Band, Blocks, Causal, Full, Global, Intersection, Pattern, Routed, Sink, Strided, Union, Window

MAX_TERMS = 4096  # inclusion-exclusion terms of `expand`; beyond, `TooManyTerms` (counting then uses tiles)


@dataclass(frozen=True)
class KvBelow:
    """Atom kv < n (Sink, and the key half of Global)."""
    n: int


@dataclass(frozen=True)
class QBelow:
    """Atom q < n (the query half of Global)."""
    n: int


@dataclass(frozen=True)
class RoutedBlocks:
    """Atom: the run-time routed block mask (without Routed's causal part)."""
    block: int


class Routes:
    """The routed kv blocks of one (batch, head), per q block, without duplicates: a CSR
    (`ptr`, `kb`) built from the index rows, so that nothing of size q blocks x kv blocks is
    made unless an element-wise fallback asks for `mask`."""

    def __init__(self, rows: torch.Tensor, num_kv_blocks: int):
        self.rows = rows
        self.num_kv_blocks = num_kv_blocks
        srt = rows.sort(1).values
        keep = srt >= 0
        keep[:, 1:] &= srt[:, 1:] != srt[:, :-1]
        self.kb = srt[keep]
        self.counts = keep.sum(1)
        self.ptr = torch.zeros(len(rows) + 1, dtype=torch.long)
        self.ptr[1:] = torch.cumsum(self.counts, 0)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Routes":
        k = max(1, int(mask.sum(1).max())) if mask.numel() else 1
        order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True)
        return cls(torch.where(order.values[:, :k] > 0, order.indices[:, :k], -1), mask.shape[1])

    @property
    def max_per_row(self) -> int:
        return max(1, int(self.counts.max())) if len(self.counts) else 1

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q block, kv block) of every selected pair."""
        return torch.repeat_interleave(torch.arange(len(self.counts)), self.counts), self.kb

    @cached_property
    def mask(self) -> torch.Tensor:
        m = torch.zeros(len(self.counts), self.num_kv_blocks, dtype=torch.bool)
        qb, kb = self.pairs()
        m[qb, kb] = True
        return m


def as_routes(block_mask) -> "Routes | None":
    """`block_mask` as Routes: None, Routes, or a bool tensor [q_blocks, kv_blocks]."""
    if block_mask is None or isinstance(block_mask, Routes):
        return block_mask
    if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 2:
        raise TypeError(f"block_mask: expected a bool tensor [q_blocks, kv_blocks] or Routes, got {block_mask!r}")
    return Routes.from_mask(block_mask)


Poly = dict  # frozenset of atoms -> integer coefficient


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, ca in a.items():
        for kb, cb in b.items():
            k = ka | kb
            out[k] = out.get(k, 0) + ca * cb
            if len(out) > MAX_TERMS:
                raise TooManyTerms
    return {k: c for k, c in out.items() if c}


def _add(*polys: tuple[int, Poly]) -> Poly:
    out: Poly = {}
    for sign, p in polys:
        for k, c in p.items():
            out[k] = out.get(k, 0) + sign * c
    return {k: c for k, c in out.items() if c}


class TooManyTerms(Exception):
    """The expansion would exceed MAX_TERMS terms; count the pattern on tiles instead."""


def expand(pattern: Pattern) -> Poly:
    """The indicator of a Heads-free pattern as a signed sum of products of atoms."""
    one = frozenset()
    if isinstance(pattern, Full):
        return {one: 1}
    if isinstance(pattern, Sink):
        return {frozenset({KvBelow(pattern.n)}): 1}
    if isinstance(pattern, Global):
        kv, q = {frozenset({KvBelow(pattern.n)}): 1}, {frozenset({QBelow(pattern.n)}): 1}
        return _add((1, kv), (1, q), (-1, _mul(kv, q)))
    if isinstance(pattern, Routed):
        atoms = {RoutedBlocks(pattern.block)} | ({Causal()} if pattern.causal else set())
        return {frozenset(atoms): 1}
    if isinstance(pattern, Strided) and pattern.block > 1:  # a disjoint union of per-key congruences
        return {frozenset({Strided(pattern.period, pattern.offset * pattern.block + t)}): 1
                for t in range(pattern.block)}
    if isinstance(pattern, (Causal, Band, Window, Blocks, Strided)):
        return {frozenset({pattern}): 1}
    if isinstance(pattern, Intersection):
        out = {one: 1}
        for p in pattern.parts:
            out = _mul(out, expand(p))
        return out
    if isinstance(pattern, Union):  # 1 - prod(1 - p)
        rest = {one: 1}
        for p in pattern.parts:
            rest = _mul(rest, _add((1, {one: 1}), (-1, expand(p))))
        return _add((1, {one: 1}), (-1, rest))
    raise TypeError(f"pattern: unsupported node {pattern!r} (resolve Heads per head first)")


__all__ = ["KvBelow", "QBelow", "RoutedBlocks", "Routes", "as_routes", "Poly", "expand", "TooManyTerms"]
