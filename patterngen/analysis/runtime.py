"""Run-time nodes inside compositions: how a head whose pattern holds `Clustered()` or a
box-routed `Routed` (pairs chosen per call, so no tile plan holds them ahead) is split.

A head's pattern p splits into a static part S (no run-time node, S within p) such that every
pair of p outside S is a pair of the run-time node itself (same cluster; a key box routed to
the query's box): S runs as a plan (the kernels), and the rest, p and not S, is computed on
the run-time node's own pairs only (sorted by cluster, or gathered per routed box), at the
tokens' true positions, the two merged by log-sum-exp. Proof by cases: a union's pair outside
the union of its parts' static parts lies outside its own part's; an intersection's pair
outside the intersection of its parts' static parts lies outside one of them; a run-time leaf
has no static part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.semantics import visible
from ..ir import Clustered, Heads, Intersection, Pattern, Routed, Spec, Union
from ..routing.blocks import block_major


def is_runtime(node: Pattern) -> bool:
    """Whether the node chooses its pairs per call in a way the kernels do not walk in place."""
    return isinstance(node, Clustered) or (isinstance(node, Routed) and isinstance(node.block, tuple))


def has_runtime(pattern: Pattern) -> bool:
    return any(is_runtime(n) for n in pattern.walk())


def runs_split(spec: Spec) -> bool:
    """Whether the spec runs split by head class (`patterngen.runtime`), with no tile plan ahead
    of a call: it holds Clustered(), or box-routed blocks on a head that is not exactly that
    node (where every head is, it runs and plans as flat routing in block-major order)."""
    if spec.clustered:
        return True
    return spec.routed is not None and isinstance(spec.routed.block, tuple) and \
        any(p != spec.routed for p in spec.head_patterns.unique)


def static_part(pattern: Pattern) -> Pattern | None:
    """The static part S of a Heads-free pattern (None: no pair), see the module docstring."""
    if is_runtime(pattern):
        return None
    if isinstance(pattern, Union):
        parts = [s for s in map(static_part, pattern.parts) if s is not None]
        return Union.of(*parts) if parts else None
    if isinstance(pattern, Intersection):
        parts = [static_part(c) for c in pattern.parts]
        return None if None in parts else Intersection.of(*parts)
    return pattern


@dataclass(frozen=True)
class HeadSplit:
    """The heads of a spec with run-time nodes, by how they run: `static` heads hold none (the
    op), `pure` heads are the run-time node itself (its own fast path: packed clusters, flat
    routing in block-major order), `mixed` heads run their static part (`parts[h]`, None:
    none) through the op and the rest on the run-time node's pairs."""

    static: tuple[int, ...]
    pure: tuple[int, ...]
    mixed: tuple[int, ...]
    parts: tuple[Pattern | None, ...]


def split_heads(spec: Spec) -> HeadSplit:
    groups: dict[str, list[int]] = {"static": [], "pure": [], "mixed": []}
    parts = []
    for h, p in enumerate(spec.head_patterns):
        kind = "pure" if is_runtime(p) else ("mixed" if has_runtime(p) else "static")
        groups[kind].append(h)
        parts.append(static_part(p))
    return HeadSplit(*(tuple(groups[k]) for k in ("static", "pure", "mixed")), tuple(parts))


def head_subset(spec: Spec, heads: tuple[int, ...], patterns: list[Pattern]) -> tuple[Spec, list[int]]:
    """The spec of query heads `heads` (in order) with these patterns, and the kv head of each of
    its kv heads: whole GQA groups keep their sharing; otherwise every head gets its own kv
    head (the caller gathers K and V by the list)."""
    g = spec.num_heads // spec.num_kv_heads
    kv = sorted({h // g for h in heads})
    whole = list(heads) == [x * g + i for x in kv for i in range(g)]
    pattern = patterns[0] if len(set(patterns)) == 1 else Heads(list(patterns))
    kv_heads = kv if whole else [h // g for h in heads]
    sub = Spec(pattern, spec.q_shape, spec.kv_shape, num_heads=len(heads), num_kv_heads=len(kv_heads),
               head_dim=spec.head_dim)
    return sub, kv_heads


def remainder(spec: Spec, pattern: Pattern, static: Pattern | None, q: torch.Tensor, kv: torch.Tensor,
              block_mask: torch.Tensor | None, clusters: tuple | None) -> torch.Tensor:
    """Bool: the pairs of `pattern` outside its static part (query and key token ids broadcast)."""
    mask = visible(pattern, q, kv, spec, block_mask, clusters)
    return mask if static is None else mask & ~visible(static, q, kv, spec, block_mask, clusters)


def _padded(groups: torch.Tensor, count: int) -> torch.Tensor:
    """long [count, widest]: the tokens of each group (ids in [0, count), -1 in none), ascending,
    padded with -1."""
    tok = torch.nonzero(groups >= 0).squeeze(1)
    g = groups[tok]
    order = torch.sort(g, stable=True).indices
    tok, g = tok[order], g[order]
    sizes = torch.bincount(g, minlength=count)
    width = int(sizes.max()) if len(g) else 0
    out = torch.full((count, width), -1, dtype=torch.long, device=groups.device)
    out[g, torch.arange(len(g), device=g.device) - (sizes.cumsum(0) - sizes)[g]] = tok
    return out


def runtime_groups(spec: Spec, pattern: Pattern, clusters: tuple | None,
                   indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query groups [G, widest], key groups [G, widest']): token ids, -1 padding, of the groups
    whose pairs hold a mixed head's pairs outside its static part, for one (batch, head): each
    cluster's queries and keys (`clusters`: ids [Nq], [Nkv]), or each query box and the keys of
    its routed boxes (`indices` [q boxes, topk], -1 unused; a box listed twice counts once)."""
    nodes = {type(n) for n in pattern.walk() if is_runtime(n)}
    if len(nodes) > 1:
        raise ValueError(f"spec: the pattern {pattern!r} mixes Clustered() with box-routed blocks; a head takes "
                         f"one of them (different heads may each take one)")
    if Clustered in nodes:
        cq, ck = clusters
        count = 1 + max((int(t.max()) for t in (cq, ck) if t.numel()), default=-1)
        return _padded(cq, count), _padded(ck, count)
    block = spec.routed.block
    boxes = block_major(spec.q_shape, block).to(indices.device).view(-1, math.prod(block))
    earlier = torch.ones(indices.shape[1], indices.shape[1], dtype=torch.bool, device=indices.device).tril(-1)
    repeated = ((indices[:, :, None] == indices[:, None, :]) & earlier).any(2)
    keep = (indices >= 0) & ~repeated
    keys = torch.where(keep[..., None], boxes[indices.clamp(min=0)], -1)  # [q boxes, topk, volume]
    return boxes, keys.flatten(1)


__all__ = ["is_runtime", "has_runtime", "runs_split", "static_part", "HeadSplit", "split_heads", "head_subset",
           "remainder", "runtime_groups"]
