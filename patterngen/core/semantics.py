"""Element-wise meaning of every primitive: is key `kv` visible to query `q`?

This is the single definition of the semantics. The dense oracle, the exact
refinement of ambiguous tiles and the mask code of partial tiles in the
reference backend all evaluate it, on broadcastable tensors of flattened
token indices. NATTEN's window rule below is also the source of the Triton
kernels' window code: the backend runs the same functions on expression text.
"""
from __future__ import annotations

import torch

from ..routing.blocks import box_of
from ..ir import (Band, Blocks, Causal, Clustered, Full, Global, Intersection, Pattern, Routed, Sink, Spec,
                 Strided, Union, Window)


def unravel(index: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flattened indices, one tensor per dimension."""
    coords = []
    for n in reversed(shape):
        coords.append(index % n)
        index = index // n
    return coords[::-1]


# -- NATTEN's window rule, written once ----------------------------------------------
# The rule is generic in its arithmetic: values support + - * // % and comparisons, and
# `ops` supplies minimum, maximum, select (where) and let (name a value used again).
# TORCH evaluates it on tensors (the oracle, the analysis); the Triton backend passes ops
# whose values are expression text, so its mask code and window bounds are generated from
# these same lines. Only non-negative values are divided, where floor division (torch,
# Python) and truncating division (Triton) agree.


class TorchOps:
    """The rule's operations on torch tensors and Python ints."""

    @staticmethod
    def minimum(a, b):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return torch.minimum(a, b)
        if isinstance(a, torch.Tensor):
            return a.clamp(max=b)
        return min(a, b) if not isinstance(b, torch.Tensor) else b.clamp(max=a)

    @staticmethod
    def maximum(a, b):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return torch.maximum(a, b)
        if isinstance(a, torch.Tensor):
            return a.clamp(min=b)
        return max(a, b) if not isinstance(b, torch.Tensor) else b.clamp(min=a)

    @staticmethod
    def select(cond, a, b):
        return torch.where(cond, a, b) if isinstance(cond, torch.Tensor) else (a if cond else b)

    @staticmethod
    def let(name: str, value):
        return value


TORCH = TorchOps()


def group_length(L: int, d: int, r, ops=TORCH):
    """Length of dilation group r (0 <= r < d) in an extent of L."""
    return L // d if L % d == 0 else ops.select(r < L % d, L // d + 1, L // d)


def window_bounds(x, Lg, w: int, s: int, causal: bool, ops=TORCH):
    """Inclusive [lo, hi] of visible group coordinates y for query group coordinate x >= 0
    in a group of length Lg (NATTEN: the non-causal window is centred on the stride
    group's leader and clamped at the borders; the causal one ends at the query).

    Both bounds are non-decreasing in x, which the tile analysis relies on.
    """
    last = ops.let("last", Lg - 1)
    if causal:
        leader = ops.let("leader", ops.minimum((x // s) * s + (s - 1), last))
        return ops.maximum(leader - (w - 1), 0), x
    wl, wr = w // 2, w // 2 + w % 2 - 1
    leader = ops.let("leader", ops.minimum((x // s) * s + s // 2, last))
    centre = ops.let("centre", ops.maximum(ops.minimum(leader, last - wr), wl))
    return centre - wl, centre + wr


def window_1d(i, j, L: int, w: int, s: int, d: int, causal: bool, ops=TORCH):
    """NATTEN's neighborhood rule along one dimension of extent L: is key coordinate j
    visible to query coordinate i (dilation d: same residue, then the rule on i // d, j // d)?"""
    r = i % d
    x, y = ops.let("x", i // d), ops.let("y", j // d)
    lo, hi = window_bounds(x, group_length(L, d, r, ops), w, s, causal, ops)
    vis = (y >= lo) & (y <= hi)
    return vis if d == 1 else vis & (r == j % d)


def block_index(x: torch.Tensor, size: int, shift: int) -> torch.Tensor:
    """`Blocks`' block of coordinate x: floor((x - shift) / size), for negative x too."""
    return torch.div(x - shift, size, rounding_mode="floor")


def visible(pattern: Pattern, q: torch.Tensor, kv: torch.Tensor, spec: Spec,
            block_mask: torch.Tensor | None = None, clusters: tuple | None = None) -> torch.Tensor:
    """Boolean visibility of flattened key indices `kv` for flattened query indices `q`
    (broadcast together) under a Heads-free `pattern`.

    `block_mask` [num_q_blocks, num_kv_blocks] gives the selected blocks of a
    Routed pattern for one (batch, head); `clusters` (q ids [Nq], kv ids [Nkv]) the cluster
    ids of a Clustered pattern for one (batch, head).
    """
    offset = spec.nkv - spec.nq  # bottom-right alignment of Causal/Band
    if isinstance(pattern, Full):
        return torch.ones(torch.broadcast_shapes(q.shape, kv.shape), dtype=torch.bool, device=q.device)
    if isinstance(pattern, Causal):
        return kv <= q + offset
    if isinstance(pattern, Band):
        delta = kv - q - offset
        return (delta >= -pattern.left) & (delta <= pattern.right)
    if isinstance(pattern, Sink):
        return (kv < pattern.n) & (q >= 0)
    if isinstance(pattern, Global):
        return (kv < pattern.n) | (q < pattern.n)
    if isinstance(pattern, Strided):
        return ((kv // pattern.block) % pattern.stride == pattern.offset) & (q >= 0)
    if isinstance(pattern, Window):
        out = None
        for (w, s, d, c), L, qi, ki in zip(pattern.dims(spec.ndim), spec.q_shape,
                                           unravel(q, spec.q_shape), unravel(kv, spec.kv_shape)):
            m = window_1d(qi, ki, L, w, s, d, c)
            out = m if out is None else out & m
        return out
    if isinstance(pattern, Blocks):
        if spec.ndim == 1:  # flattened tokens, queries aligned bottom-right to the keys
            (size, shift), = pattern.dims(1)
            return block_index(q + offset, size, shift) == block_index(kv, size, shift)
        out = None
        for (size, shift), qi, ki in zip(pattern.dims(spec.ndim), unravel(q, spec.q_shape),
                                         unravel(kv, spec.kv_shape)):
            m = block_index(qi, size, shift) == block_index(ki, size, shift)
            out = m if out is None else out & m
        return out
    if isinstance(pattern, Clustered):
        if clusters is None:
            raise ValueError("q_clusters, kv_clusters: the pattern contains Clustered(), so cluster ids are needed "
                             "(see patterngen.cluster)")
        cq, ck = clusters
        return (cq[q] == ck[kv]) & (cq[q] >= 0)
    if isinstance(pattern, Routed):
        if block_mask is None:
            raise ValueError("block_indices: the pattern contains Routed blocks, so block indices are needed "
                             "(see patterngen.route)")
        if isinstance(pattern.block, tuple):  # boxes of the grid (no causal flag: Routed refuses it)
            return block_mask[box_of(q, spec.q_shape, pattern.block), box_of(kv, spec.kv_shape, pattern.block)]
        m = block_mask[q // pattern.block, kv // pattern.block]
        return m & (kv <= q + offset) if pattern.causal else m
    if isinstance(pattern, (Union, Intersection)):
        parts = [visible(p, q, kv, spec, block_mask, clusters) for p in pattern.parts]
        out = parts[0]
        for m in parts[1:]:
            out = (out | m) if isinstance(pattern, Union) else (out & m)
        return out
    raise TypeError(f"visible: unsupported pattern node {pattern!r} (resolve Heads per head first)")


def depends_on_kv_only(pattern: Pattern) -> bool:
    """True if visibility is a function of the key index alone (so tiles can be
    classified by scanning keys once instead of tile pairs)."""
    if isinstance(pattern, (Full, Sink, Strided)):
        return True
    if isinstance(pattern, (Union, Intersection)):
        return all(depends_on_kv_only(p) for p in pattern.parts)
    return False
