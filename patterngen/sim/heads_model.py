"""The simulator's model of token-routed heads (Mixture-of-Head attention).

With run-time head routing each query token uses only some heads; the kernels
compact, per (batch, head), the selected query tokens in q-tile order into tiles
of the q tile's volume (rows gathered from q, results scattered back), and each
compacted tile visits the kv tiles that its rows need. The model:

* FLOP bound: a (q, kv) pair is work iff it is visible and its (token, head) is
  selected. With a measured routing the count is exact: per head group, the
  number of visible keys of every query row comes from the plan (full tile pairs
  add their kv tile's size to each row, partial ones are evaluated element-wise,
  chunked), never from an Nq x Nkv mask; then it is summed over the selected
  rows. With an expected fraction f the count is f times the exact count (the
  expectation when selection is uniform over tokens and heads).
* Tile work: compacted tile j of a (batch, head) holds the selected tokens of
  ranks [j V, (j + 1) V) (V = q tile volume). Its rows lie in some original q
  tiles; it visits the union of those tiles' kv tile lists (exact, from the
  plan's CSR, not an estimate from per-tile counts: for causal the union is the
  last tile's list, for sliding windows it grows by the window's shift per
  spanned tile, and the CSR gives both without a per-pattern formula). A kv
  tile is full for the compacted tile only when it is full for every spanned
  original tile (otherwise some of its rows need the mask). For a fraction f the
  r-th selected token is placed at position floor(r Nq / n) of the q-tile order
  (n = round(f Nq) selected tokens, uniform spacing), so a compacted tile spans
  about 1/f consecutive original tiles.
* Time: CTAs are (batch, head, compacted tile) in that order, costed by the
  device model like any other workload, plus one launch for the compaction
  (prefix-sum) kernel.

At fraction 1 nothing needs routing, so `simulate(active_heads=1.0)` reports the
plain kernel's figures; a measured routing that selects everything still goes
through the compacted path (on box tiles whose edge tiles are short, compaction
packs them, so its figures can differ slightly).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..ir import Routed, Spec
from ..analysis.plan import Plan, TilePlan
from ..routing.blocks import block_masks, normalize_block_indices
from ..core.statuses import expand_ranges
from ..core.tile_eval import grid_tokens, pattern_visible, tile_masks


def check_active_heads(active_heads, spec: Spec, batch: int, batch_fixed: bool):
    """Validate `active_heads`: returns (kind, value, batch) with kind None, 'fraction'
    (value a float in (0, 1]) or 'measured' (value a bool selection [B, H, Nq]).

    `batch_fixed`: the batch is set by the caller or by batched block indices, so a
    routing's batch must equal it; otherwise the routing's batch becomes the batch."""
    if active_heads is None:
        return None, None, batch
    if isinstance(active_heads, torch.Tensor):
        idx = active_heads
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"active_heads: a routing tensor must be integer head indices, got dtype {idx.dtype}")
        if idx.dim() != 3 or idx.shape[1] != spec.nq or idx.shape[2] < 1 or idx.shape[0] < 1:
            raise ValueError(f"active_heads: head indices must have shape [B, Nq={spec.nq}, K>=1], "
                             f"got {tuple(idx.shape)}")
        H = spec.num_heads
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= H):
            raise ValueError(f"active_heads: head indices must lie in [0, {H - 1}] or be -1 (unused slot), got "
                             f"values in [{int(idx.min())}, {int(idx.max())}]")
        B = idx.shape[0]
        if batch_fixed and B != batch:
            raise ValueError(f"active_heads: head indices have batch {B} but the batch is {batch}")
        return "measured", selection(idx, H), B
    if isinstance(active_heads, bool) or not isinstance(active_heads, numbers.Real):
        raise TypeError(f"active_heads: expected a fraction in (0, 1] or an int tensor of head indices "
                        f"[B, Nq, K], got {type(active_heads).__name__}")
    f = float(active_heads)
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise ValueError(f"active_heads: a fraction of active (token, head) pairs must be in (0, 1], "
                         f"got {active_heads!r}")
    return "fraction", f, batch


def selection(head_indices: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Bool [B, H, Nq]: whether token q of batch b uses head h (a repeated index counts once)."""
    B, Nq, _ = head_indices.shape
    idx = head_indices.long()
    hot = torch.zeros(B, Nq, num_heads + 1, dtype=torch.bool)
    hot.scatter_(2, torch.where(idx < 0, num_heads, idx), True)
    return hot[..., :num_heads].permute(0, 2, 1).contiguous()


# -- exact per-row visible counts --------------------------------------------------------------
def row_visible_counts(plan: Plan, block_indices: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per plan group, int64 [Nq]: the visible keys of every query row (from the plan: full
    tile pairs count their kv tile's size, partial ones are evaluated element-wise)."""
    spec, qg, kg = plan.spec, plan.q_grid, plan.kv_grid
    masks = None
    if spec.routed is not None and block_indices is not None:
        masks = block_masks(spec, normalize_block_indices(spec, block_indices))
    rep: dict[int, tuple[int, int]] = {}
    hg = plan.head_group
    for b in range(hg.shape[0]):
        for h in range(hg.shape[1]):
            rep.setdefault(int(hg[b, h]), (b, h))
    out = []
    for g, tp in enumerate(plan.groups):
        b, h = rep.get(g, (0, 0))
        pattern = spec.head_patterns[h]
        routed = any(isinstance(n, Routed) for n in pattern.walk())
        bm = masks[b if masks.shape[0] > 1 else 0, h] if routed and masks is not None else None
        out.append(_rows_of_group(tp, pattern, spec, qg, kg, bm))
    return out


def _rows_of_group(tp: TilePlan, pattern, spec: Spec, qg, kg, block_mask) -> torch.Tensor:
    counts = torch.zeros(spec.nq, dtype=torch.long)
    qt, kt, full = tp.pairs()
    per_q = torch.zeros(qg.count, dtype=torch.long).index_add_(0, qt[full], kg.sizes[kt[full]])
    tok = qg.tokens(torch.arange(qg.count))
    ok = tok >= 0
    counts.index_add_(0, tok[ok], per_q[:, None].expand_as(tok)[ok])
    rest = ~full
    for _, q, _, m in tile_masks(grid_tokens(qg, qt[rest]), grid_tokens(kg, kt[rest]), int(rest.sum()), qg.volume,
                                 kg.volume, pattern_visible(pattern, spec, block_mask)):
        q = q[:, :, 0]
        counts.index_add_(0, q[q >= 0], m.sum(2)[q >= 0])
    return counts


# -- compacted tiles ----------------------------------------------------------------------------
def _tile_order(qg) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, original q tile) of every position of the q-tile order."""
    tok = qg.tokens(torch.arange(qg.count))
    tile = torch.arange(qg.count)[:, None].expand_as(tok)
    ok = tok >= 0
    return tok[ok], tile[ok]


def _unit_tiles(positions: torch.Tensor, tile_of_pos: torch.Tensor, volume: int):
    """(compacted tile, original q tile) pairs, without repeats, of selected positions in
    q-tile order (ascending), and the number of compacted tiles."""
    n = len(positions)
    units = -(-n // volume)
    if n == 0:
        e = torch.zeros(0, dtype=torch.long)
        return e, e, 0
    u = torch.arange(n) // volume
    t = tile_of_pos[positions]
    key = torch.unique_consecutive(u * len(tile_of_pos) + t)
    return key // len(tile_of_pos), key % len(tile_of_pos), units


def span_costs(tp: TilePlan, unit: torch.Tensor, tile: torch.Tensor, units: int, num_kv_tiles: int):
    """(visited, full) kv tiles of each compacted tile, int64 [units]: the union of the kv tile
    lists of the original q tiles it spans; full when full in every one of them."""
    visited = torch.zeros(units, dtype=torch.long)
    fulls = torch.zeros(units, dtype=torch.long)
    if units == 0:
        return visited, fulls
    nspan = torch.bincount(unit, minlength=units)
    rep, pos = expand_ranges(tp.q_ptr[tile], tp.q_ptr[tile + 1] - 1)
    u = unit[rep]
    key = u * num_kv_tiles + tp.kv_tiles[pos]
    uniq, inv = torch.unique(key, return_inverse=True)
    nfull = torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, tp.full[pos].long())
    uu = uniq // num_kv_tiles
    visited.index_add_(0, uu, torch.ones_like(uu))
    fulls.index_add_(0, uu, (nfull == nspan[uu]).long())
    return visited, fulls


@dataclass
class RoutedHeads:
    """The head-routing model's figures for one tiling."""

    kind: str                    # 'fraction' or 'measured'
    fraction: float              # active (token, head) pairs / all of them
    visible: torch.Tensor        # float64 [B, H]: visible pairs over selected (token, head) pairs
    visited: torch.Tensor        # int64 [B, H]: kv tiles visited by the compacted tiles
    full: torch.Tensor           # int64 [B, H]
    unit_full: torch.Tensor      # int64 [CTAs], launch order (batch, head, compacted tile)
    unit_partial: torch.Tensor

    @property
    def ctas(self) -> int:
        return len(self.unit_full)


def model(plan: Plan, kind: str, value, batch: int, head_visible: torch.Tensor,
          block_indices: torch.Tensor | None = None) -> RoutedHeads:
    """Figures of head routing on `plan`'s tiling. `value`: the fraction, or the selection
    [B, H, Nq]; `head_visible`: exact visible pairs of all rows, [H] or [B', H]."""
    spec, qg, kg = plan.spec, plan.q_grid, plan.kv_grid
    H, V, Tk = spec.num_heads, qg.volume, kg.count
    hg = plan.head_group
    group = (lambda b, h: int(hg[b if hg.shape[0] > 1 else 0, h]))
    tok_order, tile_of_pos = _tile_order(qg)
    unit_f, unit_p = [], []
    visited = torch.zeros(batch, H, dtype=torch.long)
    full = torch.zeros(batch, H, dtype=torch.long)
    if kind == "fraction":
        f = float(value)
        n = max(1, round(f * spec.nq))
        positions = torch.clamp(torch.arange(n) * spec.nq // n, max=spec.nq - 1)
        u, t, units = _unit_tiles(positions, tile_of_pos, V)
        memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hv = head_visible if head_visible.dim() == 2 else head_visible[None]
        vis = torch.zeros(batch, H, dtype=torch.float64)
        for b in range(batch):
            for h in range(H):
                g = group(b, h)
                if g not in memo:
                    memo[g] = span_costs(plan.groups[g], u, t, units, Tk)
                v, fu = memo[g]
                unit_f.append(fu)
                unit_p.append(v - fu)
                visited[b, h], full[b, h] = int(v.sum()), int(fu.sum())
                vis[b, h] = f * float(hv[b if hv.shape[0] > 1 else 0, h])
        fraction = f
    else:
        sel = value  # [B, H, Nq]
        rows = row_visible_counts(plan, block_indices)
        vis = torch.zeros(batch, H, dtype=torch.float64)
        for b in range(batch):
            for h in range(H):
                g = group(b, h)
                s = sel[b, h]
                vis[b, h] = float(rows[g][s].sum())
                positions = torch.nonzero(s[tok_order]).flatten()
                u, t, units = _unit_tiles(positions, tile_of_pos, V)
                v, fu = span_costs(plan.groups[g], u, t, units, Tk)
                unit_f.append(fu)
                unit_p.append(v - fu)
                visited[b, h], full[b, h] = int(v.sum()), int(fu.sum())
        fraction = float(sel.sum()) / sel.numel()
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
    return RoutedHeads(kind, fraction, vis, visited, full, cat(unit_f), cat(unit_p))


__all__ = ["check_active_heads", "selection", "row_visible_counts", "span_costs", "model", "RoutedHeads"]
