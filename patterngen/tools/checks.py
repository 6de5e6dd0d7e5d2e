"""The checks behind `patterngen run`: a full-size plan against the element-wise semantics on
sampled rows, and the reference attention against dense SDPA on a scaled copy.

A user's spec is checked on what patterngen will really do with it (the plan at full size),
without the Nq x Nkv mask that the oracle needs; only the attention check needs the oracle,
so it runs on a copy small enough for a CPU (see `shrink`).
"""
from __future__ import annotations

import time

import torch

from ..api import attention
from ..clusters import cluster
from ..ir import Spec
from ..core.oracle import dense_mask
from ..analysis.plan import Plan
from ..routing.blocks import block_masks, normalize_block_indices, route
from ..core.statuses import EMPTY, FULL
from ..core.tile_eval import tile_statuses


def demo_block_indices(spec: Spec, seed: int = 0, head_dim: int = 16) -> torch.Tensor | None:
    """Block indices for a Routed spec, from `patterngen.route` on random queries and keys.

    Real routing depends on the model's activations; random ones give a
    representative count of tiles, not the model's. Small head dims keep this cheap.
    """
    if spec.routed is None:
        return None
    return routed_indices(spec, *_demo_qk(spec, seed, head_dim))


def demo_clusters(spec: Spec, seed: int = 0, head_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cluster ids for a Clustered spec, from `patterngen.cluster` on random queries and keys
    (`demo_cluster_count` clusters); None for other specs. Like `demo_block_indices`, a
    representative count, not the model's."""
    if not spec.clustered:
        return None
    return cluster(*_demo_qk(spec, seed, head_dim), demo_cluster_count(spec.nkv), seed=seed)


def _demo_qk(spec: Spec, seed: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q [1, Hq, Nq, head_dim] and k [1, Hkv, Nkv, head_dim] drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, spec.num_heads, spec.nq, head_dim, generator=g)
    return q, torch.randn(1, spec.num_kv_heads, spec.nkv, head_dim, generator=g)


def demo_cluster_count(nkv: int) -> int:
    """About sqrt(N) / 2 clusters of N random keys (the Routing Transformer uses ~sqrt(N))."""
    return max(1, round(nkv ** 0.5 / 2))


def routed_indices(spec: Spec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`route` on q, k [B, H, N, D] for the spec's Routed node (grid-shaped for box blocks)."""
    r = spec.routed
    if isinstance(r.block, tuple):
        grid = lambda t: t.reshape(*t.shape[:2], *spec.q_shape, t.shape[-1])  # noqa: E731
        return route(grid(q), grid(k), r.block, r.topk)
    return route(q, k, r.block, r.topk, r.causal)


def check_plan_rows(spec: Spec, plan: Plan, block_indices: torch.Tensor | None = None, max_tiles: int = 6,
                    budget: int = 1 << 26, seed: int = 0) -> tuple[bool, str]:
    """Recompute, from the element-wise semantics, the status of every kv tile for a
    few q tiles of each distinct head plan, and compare with the plan's rows.

    This checks the full-size plan exactly on those rows without an Nq x Nkv mask:
    each q tile costs (tile volume x Nkv) element evaluations.
    """
    qg, kg = plan.q_grid, plan.kv_grid
    idx = normalize_block_indices(spec, block_indices)
    masks = block_masks(spec, idx) if idx is not None else None
    reps: dict[int, tuple[int, int]] = {}
    for b, row in enumerate(plan.head_group.tolist()):
        for h, g in enumerate(row):
            reps.setdefault(g, (b, h))
    groups = sorted(reps)
    if len(groups) > 8:
        groups = [groups[round(i * (len(groups) - 1) / 7)] for i in range(8)]
    per_tile = qg.volume * spec.nkv * len(groups)
    n_tiles = max(2, min(max_tiles, budget // max(1, per_tile), qg.count))
    gen = torch.Generator().manual_seed(seed)
    picks = [0, qg.count - 1, qg.count // 2] + torch.randint(qg.count, (n_tiles,), generator=gen).tolist()
    tiles = list(dict.fromkeys(picks))[:min(n_tiles, qg.count)]
    kv_tiles = torch.arange(kg.count)
    for g in groups:
        b, h = reps[g]
        pattern = spec.head_patterns[h]
        bm = masks[b, h] if masks is not None else None
        tp = plan.groups[g]
        for qt in tiles:
            status = tile_statuses(pattern, spec, qg, kg, torch.full_like(kv_tiles, qt), kv_tiles, bm)
            want_kv = torch.nonzero(status != EMPTY).flatten()
            lo, hi = int(tp.q_ptr[qt]), int(tp.q_ptr[qt + 1])
            got_kv, got_full = tp.kv_tiles[lo:hi], tp.full[lo:hi]
            if not torch.equal(got_kv, want_kv) or not torch.equal(got_full, status[want_kv] == FULL):
                missing = sorted(set(want_kv.tolist()) - set(got_kv.tolist()))[:5]
                extra = sorted(set(got_kv.tolist()) - set(want_kv.tolist()))[:5]
                return False, (f"MISMATCH at head {h} (batch {b}), q tile {qt}: kv tiles missing from the plan "
                               f"{missing}, visited but empty {extra}, or full flags differ")
    return True, (f"{len(tiles)} q tiles x all {kg.count} kv tiles, for {len(groups)} of {len(plan.groups)} "
                  f"distinct head plan(s), recomputed from the element semantics: OK")


def dense_reference(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with the oracle's boolean mask; rows that see no key give zeros (the contract)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))


def check_attention(small: Spec, seed: int = 0, tol: float = 1e-4) -> tuple[bool, str]:
    """pg.attention (reference backend) against dense SDPA on `small`, float32, batch 1."""
    gen = torch.Generator().manual_seed(seed)
    shape_q = (1, small.num_heads, small.nq, small.head_dim)
    shape_kv = (1, small.num_kv_heads, small.nkv, small.head_dim)
    q, k, v = (torch.randn(s, generator=gen) for s in (shape_q, shape_kv, shape_kv))
    idx = clusters = None
    if small.routed is not None:
        idx = routed_indices(small, q, k)
    if small.clustered:
        clusters = cluster(q, k, demo_cluster_count(small.nkv), seed=seed)
    t0 = time.perf_counter()
    if clusters is not None:
        out = attention(q, k, v, small, q_clusters=clusters[0], kv_clusters=clusters[1])
    else:
        out = attention(q, k, v, small) if idx is None else attention(q, k, v, small, block_indices=idx)
    t_ref = time.perf_counter() - t0
    mask = dense_mask(small, idx, clusters=None if clusters is None else (clusters[0][0], clusters[1][0]))
    want = dense_reference(q, k, v, mask)
    err = float((out - want).abs().max()) if out.shape == want.shape else float("inf")
    ok = err <= tol and bool(torch.isfinite(out).all())
    routed = (", blocks from pg.route on the same q, k" if idx is not None else
              ", clusters from pg.cluster on the same q, k" if clusters is not None else "")
    return ok, (f"pg.attention (reference, {t_ref:.2f} s) vs dense SDPA with the oracle mask, float32{routed}: "
                f"max |diff| {err:.1e} (tol {tol:.0e}): {'OK' if ok else 'FAILED'}")
