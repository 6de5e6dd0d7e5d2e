"""Attention of specs holding run-time nodes: `Clustered()` (Routing Transformer) and box-routed
`Routed` blocks (BiFormer), alone or inside any composition.

Their pairs come with each call, so the tile plans and kernels cannot walk them in place.
Heads are split by how they run (`analysis.runtime.split_heads`):

* static heads, and the static part of every mixed head (`static_part`), run as one call of the
  op: the generated kernels on CUDA, the planned reference elsewhere;
* heads that are exactly the run-time node run its own fast path: cluster-sorted packed
  documents (`clusters.packed_clusters`), or flat routing of whole boxes in block-major token
  order (`routed_boxes`);
* the rest of a mixed head, its pattern minus its static part, lies within the run-time
  node's own pairs, so it is computed on those pairs alone (`gathered`): each cluster's
  queries against the cluster's keys, or each query box against the keys of its routed boxes,
  the pattern evaluated at the tokens' true positions. Work: the pairs of each cluster (about
  N^2 / clusters per head) or N x topk x box volume, never N^2. Torch ops (exact,
  differentiable), chunked to bound memory; not a generated kernel.

Mixed heads merge their two parts by log-sum-exp (the parts' key sets are disjoint).
"""
from __future__ import annotations

import torch

from .backends.reference import DEFAULT_MAX_SCORES, masked_attention, merge_partials
from .clusters import packed_clusters
from .ir import Clustered, Pattern, Routed, Spec
from .analysis.runtime import head_subset, remainder, runtime_groups, split_heads
from .routing.blocks import block_major, block_masks, flat_equivalent, normalize_block_indices
from .routing.clusters import check_clusters

def _take(t: torch.Tensor | None, heads: list[int], total: int) -> torch.Tensor | None:
    """Heads `heads` of t along dim 1 (t itself when they are all of them, in order)."""
    if t is None or heads == list(range(total)):
        return t
    return t[:, torch.tensor(heads, device=t.device)]


def gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, pattern: Pattern,
             static: Pattern | None, q_groups: torch.Tensor, kv_groups: torch.Tensor, scale: float,
             block_mask: torch.Tensor | None, clusters: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Nq, D], lse [Nq]) of one (batch, head) over the pairs of `pattern` and not of
    `static`, computed only between the queries q_groups[g] and the keys kv_groups[g] of each
    group (token ids, -1 padding; every query in at most one group, every pair of the pattern
    outside `static` within some group). Rows in no group: zeros, lse -inf."""
    nq, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(nq, D, dtype=acc)
    lse = torch.full((nq,), float("-inf"), dtype=acc, device=q.device)
    G, mq = q_groups.shape
    mk = kv_groups.shape[1]
    if G == 0 or mq == 0 or mk == 0:
        return out.to(q.dtype), lse
    per_group = mq * mk  # chunks of whole groups, or of one group's rows when a group is larger (the
    # reference backend's bound on a chunk's scores)
    if per_group <= DEFAULT_MAX_SCORES:
        groups_per, step = DEFAULT_MAX_SCORES // per_group, mq
    else:
        groups_per, step = 1, max(1, DEFAULT_MAX_SCORES // mk)
    for g0 in range(0, G, groups_per):
        for r0 in range(0, mq, step):
            qi = q_groups[g0:g0 + groups_per, r0:r0 + step, None]  # [g, r, 1]
            kj = kv_groups[g0:g0 + groups_per, None, :]  # [g, 1, mk]
            qs, ks = qi.clamp(min=0), kj.clamp(min=0)
            mask = (qi >= 0) & (kj >= 0) & remainder(spec, pattern, static, qs, ks, block_mask, clusters)
            o, l, _ = masked_attention(q[qs.squeeze(2)].to(acc), k[ks.squeeze(1)].to(acc), v[ks.squeeze(1)].to(acc),
                                       mask, scale)
            rows_ok = qi.squeeze(2) >= 0
            dest = qs.squeeze(2)[rows_ok]
            out = out.index_put((dest,), o[rows_ok])
            lse = lse.index_put((dest,), l[rows_ok])
    return out.to(q.dtype), lse


def routed_boxes(q, k, v, spec: Spec, indices: torch.Tensor, scale: float, attention):
    """(out, lse) of a spec whose every head is the box-routed node: flat routing of whole boxes
    in block-major token order (`routing.blocks.block_major`), the order undone on the output."""
    order = block_major(spec.q_shape, spec.routed.block).to(q.device)
    out, lse = attention(q[:, :, order], k[:, :, order], v[:, :, order], flat_equivalent(spec), scale, indices, True)
    inverse = torch.argsort(order)
    return out[:, :, inverse], lse[:, :, inverse]


def runtime_attention(q, k, v, spec: Spec, scale: float, block_indices, q_clusters, kv_clusters, attention):
    """(out, lse) of a spec holding Clustered() or box-routed blocks (`attention`: pg.attention
    with the call's options, for the parts the op runs)."""
    B, H, nq, D = q.shape
    bound = spec.bind(nq, k.shape[2]) if spec.length_free else spec
    split = split_heads(spec)
    cq = ck = None
    if spec.clustered or q_clusters is not None or kv_clusters is not None:
        cq, ck = check_clusters(q_clusters, kv_clusters, spec, B, nq, k.shape[2], q.device)
    indices = normalize_block_indices(bound, block_indices)
    masks = None if indices is None else block_masks(bound, indices)
    g = H // spec.num_kv_heads

    def sub(heads: list[int], patterns: list[Pattern]):
        s, kv_heads = head_subset(spec, tuple(heads), patterns)
        return s, _take(q, heads, H), _take(k, kv_heads, spec.num_kv_heads), _take(v, kv_heads, spec.num_kv_heads)

    parts: dict[int, list] = {h: [] for h in range(H)}  # (out, lse) parts of each head

    def put(heads: list[int], out: torch.Tensor, lse: torch.Tensor) -> None:
        for i, h in enumerate(heads):
            parts[h].append((out[:, i], lse[:, i]))

    op_heads = [h for h in range(H) if split.parts[h] is not None]
    if op_heads:
        s, qs, ks, vs = sub(op_heads, [split.parts[h] for h in op_heads])
        put(op_heads, *attention(qs, ks, vs, s, scale, _take(indices, op_heads, H) if s.routed else None, True))
    pure = list(split.pure)
    for kind in (Clustered, Routed):
        heads = [h for h in pure if isinstance(spec.head_patterns[h], kind)]
        if not heads:
            continue
        s, qs, ks, vs = sub(heads, [spec.head_patterns[h] for h in heads])
        if kind is Clustered:
            put(heads, *packed_clusters(_take(cq, heads, H), _take(ck, heads, H), qs, ks, vs, s, scale, attention))
        else:
            put(heads, *routed_boxes(qs, ks, vs, s, _take(indices, heads, H), scale, attention))
    for h in split.mixed:
        pattern = bound.head_patterns[h]
        outs, lses = [], []
        for b in range(B):
            qg, kg = runtime_groups(bound, pattern, None if cq is None else (cq[b, h], ck[b, h]),
                                    None if indices is None else indices[b, h])
            o, l = gathered(q[b, h], k[b, h // g], v[b, h // g], bound, pattern, split.parts[h], qg, kg, scale,
                            None if masks is None else masks[b, h], None if cq is None else (cq[b, h], ck[b, h]))
            outs.append(o)
            lses.append(l)
        parts[h].append((torch.stack(outs), torch.stack(lses)))
    merged = [p[0] if len(p) == 1 else merge_partials(p) for p in (parts[h] for h in range(H))]
    return torch.stack([o for o, _ in merged], 1), torch.stack([l for _, l in merged], 1)


__all__ = ["runtime_attention", "gathered", "routed_boxes"]
