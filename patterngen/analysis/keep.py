"""Which cached keys a length-free spec can still use: the ground for bounded KV caches.

For a query at position p >= q_pos and a cached key j < q_pos, every primitive of a 1-D spec is
non-increasing in p: Causal (j <= p) and a Band's right edge hold for all such pairs, a Band's
left edge (j >= p - left) only gets harder, Sink and Strided do not depend on p, and a Block
shares none of its keys with queries of later blocks (j < q_pos <= p). Unions and
intersections keep that, so a key that the query at q_pos cannot see is seen by no later query,
and the keys to keep are exactly that query's visible ones. `Global`'s `q < n` counts query
*indices* within a call, and a later call may start at any position: the one-query call at q_pos
makes every Global true at once, which is as much as any call can (the IR has no negation).
`Routed` (run-time blocks) keeps everything.
"""
from __future__ import annotations

import torch

from ..core.semantics import visible
from ..ir import Routed, Spec


def kv_keep(spec: Spec, q_pos: int) -> torch.Tensor:
    """bool [num_kv_heads, q_pos]: the cached positions j < q_pos that some query at position
    >= q_pos (in any later call) can see, for some query head of each kv head (GQA). `spec`:
    length-free and 1-D (the spec of a decoding model). A cache may drop the others: no later
    result changes."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if not spec.length_free or spec.ndim != 1:
        raise ValueError(f"spec: kv_keep needs a length-free 1-D spec (the spec of a decoding model), got {spec!r}")
    if isinstance(q_pos, bool) or not isinstance(q_pos, int) or q_pos < 0:
        raise ValueError(f"q_pos: expected an int >= 0 (the position of the next query), got {q_pos!r}")
    kv = torch.arange(q_pos)
    return torch.stack(keep_positions(spec, q_pos, [kv] * spec.num_kv_heads)) if spec.num_kv_heads else \
        torch.zeros(0, q_pos, dtype=torch.bool)


def keep_positions(spec: Spec, q_pos: int, positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """`kv_keep` evaluated only at the positions each kv head holds (positions[h], 1-D, each
    < q_pos): what a bounded cache needs each step, in time of what it holds."""
    step = spec.bind(1, q_pos + 1)  # one query, index 0 (every Global true), at position q_pos
    q = torch.zeros(1, dtype=torch.long)
    group = spec.num_heads // spec.num_kv_heads
    out = []
    for h, kv in enumerate(positions):
        keep = torch.zeros(kv.shape, dtype=torch.bool, device=kv.device)
        for p in {spec.head_patterns[h * group + g] for g in range(group)}:
            if any(isinstance(n, Routed) for n in p.walk()):
                keep = torch.ones_like(keep)
            else:
                keep = keep | visible(p, q.to(kv.device), kv, step)
        out.append(keep)
    return out
