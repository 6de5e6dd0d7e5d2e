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

from dataclasses import dataclass

from ..ir import Clustered, Heads, Intersection, Pattern, Routed, Spec, Union


def is_runtime(node: Pattern) -> bool:
    """Whether the node chooses its pairs per call in a way the kernels do not walk in place."""
    return isinstance(node, Clustered) or (isinstance(node, Routed) and isinstance(node.block, tuple))


def has_runtime(pattern: Pattern) -> bool:
    return any(is_runtime(n) for n in pattern.walk())


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


__all__ = ["is_runtime", "has_runtime", "static_part", "HeadSplit", "split_heads", "head_subset"]
