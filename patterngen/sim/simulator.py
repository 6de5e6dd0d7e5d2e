"""`simulate(spec)`: how much faster than dense attention a pattern can be, and with which tiles.

* the FLOP bound counts visible (q, kv) pairs exactly (`counting`);
* the tile bound counts the tile pairs a block-sparse kernel must visit, and how many of
  them need mask code (partial), with the same numbers as `build_plan` (closed forms per
  q tile where the pattern allows, a plan otherwise: `profiles`);
* with a device model (`device`), a predicted time (`time_model`), and dense attention
  through the same model gives the predicted speedup;
* when tiles are not given, `search` picks them; with token-routed heads, `heads_model`
  recounts the chosen tiling.
"""
from __future__ import annotations

import math
import time

import torch

from ..ir import Spec
from ..routing.blocks import box_routed, flat_equivalent
from ..analysis.plan import build_plan
from ..analysis.runtime import runs_split
from ..analysis.tiling import kernel_tilings, volume
from ..core.tiles import TileGrid, Tiling
from . import counting, heads_model
from .device import load_device
from .report import HeadFigures, SimReport, head_groups
from .search import Candidate, Search
from .runtime import simulate_runtime
from .sharding import simulate_sharding
from .time_model import Workload, dense_time, predict_time


def _check_tile_arg(name: str, tile, spec: Spec):
    """A validated tile argument (None stays None); a list becomes a tuple, a box on a 1-D grid an int."""
    if tile is None:
        return None
    if isinstance(tile, list):
        tile = tuple(tile)
    shape = spec.q_shape if name == "q_tile" else spec.kv_shape
    TileGrid(shape, tile, name)  # validates
    if isinstance(tile, tuple) and len(shape) == 1:  # a box on a 1-D grid is a flat tile
        tile = tile[0]
    return tile


def _synthetic_indices(spec: Spec, batch: int) -> torch.Tensor:
    """A representative routing for a routed spec without run-time indices: each query block
    keeps its own block and topk-1 others drawn uniformly (causally valid when causal)."""
    r = spec.routed
    blk = r.block
    nqb, nkb = -(-spec.nq // blk), -(-spec.nkv // blk)
    g = torch.Generator().manual_seed(0)
    q_last = torch.clamp(torch.arange(nqb) * blk + blk - 1, max=spec.nq - 1) + (spec.nkv - spec.nq)
    own = (q_last // blk).clamp(0, nkb - 1)
    upper = (own + 1) if r.causal else torch.full_like(own, nkb)
    rnd = torch.rand(spec.num_heads, nqb, max(r.topk - 1, 0), generator=g)
    others = (rnd * upper[None, :, None]).long()
    idx = torch.cat([own.expand(spec.num_heads, nqb)[..., None], others], 2)
    # a duplicate of a block already chosen becomes an unused slot
    srt = idx.sort(2).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    idx = torch.where(dup, -1, srt)
    return idx


def simulate(spec: Spec, q_tile=None, kv_tile=None, device=None, *, batch: int = 1,
             block_indices: torch.Tensor | None = None, max_plans: int = 4, active_heads=None,
             world_size: int | None = None, link=None, layout: str | None = None, clusters: tuple | None = None):
    """Simulate a block-sparse kernel for `spec` (a SimReport), or with `world_size` its run
    sequence-sharded over that many GPUs (a ShardingReport, `sharding.simulate_sharding`).

    q_tile, kv_tile: int (flat tile) or tuple (box); None searches the shapes the
        device's kernels run (with both None, the best pair; with one given, the other).
    device: None, a shipped name ('h100', 'h200', 'b200', 'a100'), a JSON path or a
        DeviceModel; with a device the report has a predicted time and speedup, and the
        search minimises the predicted time; without, it maximises the tile bound.
    batch: batch size (CTAs are (batch, head, q tile)); head_dim comes from the spec.
    block_indices: run-time indices of a Routed spec (as `build_plan` takes them); when
        omitted a representative random routing stands in.
    max_plans: how many candidates that need a full plan (compositions) are planned.
    active_heads: token-routed heads (Mixture-of-Head): None (every head computes every
        token), a float in (0, 1] (the expected fraction of active (token, head) pairs,
        uniform over tokens and heads) or an int tensor [B, Nq, K] of the heads each token
        uses (-1 = unused). The tiling is searched computing all heads; on it the visible
        pairs, tile counts and predicted time count only the selected pairs and compacted
        q tiles (see `heads_model`); `all_heads_time_s` keeps the time
        of computing every head. A fraction of 1 gives the default figures.
    world_size: sequence-shard `spec` over this many GPUs of `device` (default 'h100') joined
        by `link` (a shipped name such as 'nvlink-h100', 'pcie-gen5', 'infiniband-ndr', a JSON
        path or a LinkModel; default 'nvlink-h100'), in `layout` ('contiguous', 'zigzag'; None
        picks the fastest): per-rank compute, bytes received and predicted time.
    clusters: (q_clusters, kv_clusters) of a spec holding Clustered() (as pg.attention takes
        them): a RuntimeReport of the work on those ids (`runtime.simulate_runtime`), as for
        box-routed blocks inside compositions (on `block_indices`).
    """
    if isinstance(spec, Spec) and runs_split(spec):  # per head class, on the call's ids
        given = [n for n, v in (("world_size", world_size), ("link", link), ("layout", layout),
                                ("active_heads", active_heads)) if v is not None]
        if given:
            raise ValueError(f"simulate: {', '.join(given)}: not supported for specs with run-time ids ({spec!r})")
        return simulate_runtime(spec, q_tile, kv_tile, device, clusters, block_indices)
    if isinstance(spec, Spec) and box_routed(spec):  # simulated as it runs: flat routing, block-major order
        spec = flat_equivalent(spec)
        q_tile, kv_tile = (t if t is None or isinstance(t, int) else math.prod(t) for t in (q_tile, kv_tile))
    if clusters is not None:
        raise ValueError(f"clusters: {spec!r} holds no Clustered() node to use them")
    if world_size is not None:
        if block_indices is not None or active_heads is not None:
            raise ValueError("simulate: world_size takes static specs computing every head (no block_indices or "
                             "active_heads)")
        if (q_tile is None) != (kv_tile is None):
            raise ValueError("simulate: with world_size give both q_tile and kv_tile, or neither")
        tiling = None if q_tile is None else Tiling(q_tile, kv_tile)
        return simulate_sharding(spec, world_size, "nvlink-h100" if link is None else link,
                                 "h100" if device is None else device, batch=batch, layout=layout, tiling=tiling)
    if link is not None or layout is not None:
        raise ValueError("simulate: link and layout describe a sharded run; give world_size too")
    t0 = time.perf_counter()
    if not isinstance(spec, Spec):
        raise TypeError(f"simulate: spec must be a patterngen.Spec, got {type(spec).__name__}")
    if spec.nq == 0 or spec.nkv == 0 or spec.num_heads == 0:
        raise ValueError(f"simulate: {spec!r} has no (query, key) pair (q_shape={spec.q_shape}, "
                         f"kv_shape={spec.kv_shape}, num_heads={spec.num_heads}), so there is no speedup to "
                         f"estimate; give it at least one query, key and head")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"simulate: batch must be an int >= 1, got {batch!r}")
    if isinstance(max_plans, bool) or not isinstance(max_plans, int) or max_plans < 1:
        raise ValueError(f"simulate: max_plans must be an int >= 1, got {max_plans!r}")
    q_tile, kv_tile = _check_tile_arg("q_tile", q_tile, spec), _check_tile_arg("kv_tile", kv_tile, spec)
    if spec.ndim > 1 and q_tile is not None and kv_tile is not None \
            and isinstance(q_tile, int) != isinstance(kv_tile, int):
        raise ValueError(f"q_tile and kv_tile must both be flat (int) or both boxes (tuples) on an n-D grid, "
                         f"got {q_tile!r} and {kv_tile!r}")
    dev = load_device(device) if device is not None else None
    routing = None
    indices = block_indices
    if spec.routed is not None:
        if indices is None:
            indices, routing = _synthetic_indices(spec, batch), "synthetic"
        else:
            routing = "given"
            if not isinstance(indices, torch.Tensor):
                raise TypeError(f"block_indices: expected a torch.Tensor, got {type(indices).__name__}")
            if indices.dim() == 4:
                if batch not in (1, indices.shape[0]):
                    raise ValueError(f"simulate: batch={batch} but block_indices has batch {indices.shape[0]}")
                batch = indices.shape[0]
    elif block_indices is not None:
        raise ValueError("block_indices: given, but the spec has no Routed pattern")
    batch_fixed = batch != 1 or (indices is not None and indices.dim() == 4)
    head_kind, head_value, batch = heads_model.check_active_heads(active_heads, spec, batch, batch_fixed)
    if head_kind == "fraction" and head_value == 1.0:
        head_kind = None  # every pair active: the plain kernel, no routing

    visible = counting.visible_pairs(spec, indices)  # [H] or [B, H]
    search = Search(spec, dev, batch, indices)
    notes: list[str] = []
    if q_tile is not None and kv_tile is not None:
        cands = [Candidate(q_tile, kv_tile)]
        search.evaluate(cands[0])
        searched = False
    else:
        cands, notes = search.candidates(q_tile, kv_tile)
        cands = search.run(cands, max_plans)
        searched = True
    best = cands[0]
    if best.profiles is None:  # not evaluated: pruned, estimated, or exact from the window totals alone
        search.evaluate(best)

    # per-head figures
    profiles, head_group = best.profiles
    qg, kg = search.grids(best)
    per_group = [(int(v.sum()), int(f.sum())) for v, f in profiles]
    vis_rows = visible if visible.dim() == 2 else visible[None]
    B = head_group.shape[0]
    heads = []
    for h, p in enumerate(spec.head_patterns):
        v = sum(per_group[int(head_group[b, h])][0] for b in range(B))
        f = sum(per_group[int(head_group[b, h])][1] for b in range(B))
        vp = int(vis_rows[:, h].sum())
        heads.append(HeadFigures((h,), p, vis_rows.shape[0] * spec.nq * spec.nkv, vp, B * qg.count * kg.count, v, f))
    groups = head_groups(spec, heads)
    pred = dense = None
    if dev is not None:
        pred = best.predicted_time_s
        dense = dense_time(dev, spec.nq, spec.nkv, spec.num_heads, spec.head_dim, batch)
    if routing == "synthetic":
        notes.append("no block indices: a representative random routing (seed 0) was simulated")
    visible_total, visited_total, full_total = int(visible.sum()), best.visited, best.full
    dense_pairs, tile_pairs = vis_rows.shape[0] * spec.num_heads * spec.nq * spec.nkv, best.tile_pairs
    extra: dict = {}
    if active_heads is not None:
        extra["active_fraction"] = 1.0 if head_kind is None else None
        extra["head_routing"] = "fraction" if head_kind is None else head_kind
        if dev is not None:
            extra["all_heads_time_s"] = pred
    if head_kind is not None:
        # figures cover the same batch rows as the default ones (one unless routed per batch), but a
        # measured routing differs per batch, so its figures cover every batch
        rows = batch if head_kind == "measured" else vis_rows.shape[0]
        rh, heads, groups = _route_heads(spec, best, indices, head_kind, head_value, batch, visible, heads,
                                         rows // vis_rows.shape[0])
        # a fraction scales the exact count (rounded once, not per head); a measured routing is exact
        visible_total = round(head_value * int(visible.sum())) if head_kind == "fraction" \
            else sum(hf.visible_pairs for hf in heads)
        visited_total, full_total = sum(hf.visited for hf in heads), sum(hf.full for hf in heads)
        dense_pairs, tile_pairs = sum(hf.dense_pairs for hf in heads), sum(hf.tile_pairs for hf in heads)
        extra["active_fraction"] = rh.fraction
        extra["ctas"] = rh.ctas
        if dev is not None:
            box = spec.ndim > 1 and not isinstance(best.q_tile, int)
            wl = Workload(volume(best.q_tile), volume(best.kv_tile), spec.head_dim, box, rh.unit_full,
                          rh.unit_partial)
            # one more launch: the compaction (prefix-sum) kernel
            pred = float(predict_time(dev, wl)) + dev.kernel["launch_overhead_us"] * 1e-6
    return SimReport(
        spec=spec, q_tile=best.q_tile, kv_tile=best.kv_tile, batch=batch,
        dense_pairs=dense_pairs, visible_pairs=visible_total, tile_pairs=tile_pairs, visited=visited_total,
        full=full_total, heads=tuple(heads),
        groups=tuple(groups), device=dev, predicted_time_s=pred, dense_time_s=dense,
        candidates=tuple(cands), searched=searched, routing=routing, notes=tuple(notes),
        elapsed_s=time.perf_counter() - t0, block_indices=indices, _plan=best.plan, **extra)


def _route_heads(spec: Spec, best: Candidate, indices, kind: str, value, batch: int, visible: torch.Tensor,
                 heads: list, scale: int):
    """The head-routing model on the chosen tiling, and its per-head and per-group figures (over
    the first `scale` x (the default figures' batch rows) batches; dense and tile pairs scaled)."""
    if best.plan is None:
        best.plan = build_plan(spec, Tiling(best.q_tile, best.kv_tile), indices)
    rh = heads_model.model(best.plan, kind, value, batch, visible, indices)
    R = (visible.shape[0] if visible.dim() == 2 else 1) * scale
    new_heads = []
    for hf in heads:
        h = hf.heads[0]
        vp = round(float(rh.visible[:R, h].sum()))
        new_heads.append(HeadFigures(hf.heads, hf.pattern, hf.dense_pairs * scale, vp, hf.tile_pairs * scale,
                                     int(rh.visited[:R, h].sum()), int(rh.full[:R, h].sum())))
    return rh, new_heads, head_groups(spec, new_heads)


def workload(spec: Spec, q_tile, kv_tile, batch: int = 1, block_indices: torch.Tensor | None = None) -> Workload:
    """The time model's input for one tiling (what calibration fits against measured times)."""
    q_tile, kv_tile = _check_tile_arg("q_tile", q_tile, spec), _check_tile_arg("kv_tile", kv_tile, spec)
    if q_tile is None or kv_tile is None:
        raise ValueError("workload: q_tile and kv_tile are required")
    indices = block_indices
    if spec.routed is not None and indices is None:
        indices = _synthetic_indices(spec, batch)
    s = Search(spec, None, batch, indices)
    c = Candidate(q_tile, kv_tile)
    s.evaluate(c)
    return s.workload(c)


def ranked_kernel_tilings(spec: Spec, device="h100", limit: int = 4) -> list[Tiling]:
    """The tiling policy (`patterngen.analysis.tiling.kernel_tilings`) on the simulator's ranking
    for `device`: the kernel-runnable tilings to try, best predicted first. Every consumer that
    runs or builds kernels (the op, `pg.compile`, `patterngen build`, `patterngen bench`) asks
    this, so they agree on the tiles of a spec."""
    if spec.routed is not None or spec.nq == 0 or spec.nkv == 0 or spec.num_heads == 0:
        return kernel_tilings(spec)
    return simulate(spec, device=device).kernel_tilings(limit)


__all__ = ["simulate", "workload", "ranked_kernel_tilings"]
