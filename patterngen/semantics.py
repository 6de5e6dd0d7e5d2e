"""Element-wise meaning of every primitive: is key `kv` visible to query `q`?

This is the single definition of the semantics. The dense oracle, the exact
refinement of ambiguous tiles and the mask code of partial tiles in the
reference backend all evaluate it, on broadcastable tensors of flattened
token indices.
"""
from __future__ import annotations

import torch

from .ir import (Band, Causal, Full, Global, Intersection, Pattern, Routed, Sink, Spec, Strided, Union,
                 Window)


def unravel(index: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flattened indices, one tensor per dimension."""
    coords = []
    for n in reversed(shape):
        coords.append(index % n)
        index = index // n
    return coords[::-1]


def group_length(L: int, d: int, r):
    """Length of dilation group r (0 <= r < d) in an extent of L."""
    return L // d + (r < L % d).to(torch.long) if isinstance(r, torch.Tensor) else L // d + (r < L % d)


def window_bounds(x: torch.Tensor, Lg, w: int, s: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [lo, hi] of visible group coordinates y for query group coordinate x.

    Both bounds are non-decreasing in x, which the tile analysis relies on.
    """
    if causal:
        leader = torch.minimum((x // s) * s + s - 1, Lg - 1)
        return (leader - w + 1).clamp_min(0), x
    wl, wr = w // 2, w // 2 + w % 2 - 1
    leader = torch.minimum((x // s) * s + s // 2, Lg - 1)
    centre = torch.maximum(torch.minimum(leader, Lg - 1 - wr), torch.full_like(leader, wl))
    return centre - wl, centre + wr


def window_1d(i: torch.Tensor, j: torch.Tensor, L: int, w: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """NATTEN's neighborhood rule along one dimension of extent L."""
    r = i % d
    x, y = i // d, j // d
    lo, hi = window_bounds(x, group_length(L, d, r), w, s, causal)
    return (r == j % d) & (lo <= y) & (y <= hi)


def visible(pattern: Pattern, q: torch.Tensor, kv: torch.Tensor, spec: Spec,
            block_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean visibility of flattened key indices `kv` for flattened query indices `q`
    (broadcast together) under a Heads-free `pattern`.

    `block_mask` [num_q_blocks, num_kv_blocks] gives the selected blocks of a
    Routed pattern for one (batch, head).
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
        return (kv % pattern.stride == pattern.offset) & (q >= 0)
    if isinstance(pattern, Window):
        out = None
        for (w, s, d, c), L, qi, ki in zip(pattern.dims(spec.ndim), spec.q_shape,
                                           unravel(q, spec.q_shape), unravel(kv, spec.kv_shape)):
            m = window_1d(qi, ki, L, w, s, d, c)
            out = m if out is None else out & m
        return out
    if isinstance(pattern, Routed):
        if block_mask is None:
            raise ValueError("block_indices: the pattern contains Routed blocks, so block indices are needed "
                             "(see patterngen.route)")
        m = block_mask[q // pattern.block, kv // pattern.block]
        return m & (kv <= q + offset) if pattern.causal else m
    if isinstance(pattern, (Union, Intersection)):
        parts = [visible(p, q, kv, spec, block_mask) for p in pattern.parts]
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
