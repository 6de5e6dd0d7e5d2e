"""Terminal pictures of a plan: the attention mask and the tile map.

Nothing here materialises the Nq x Nkv mask. The mask picture is itself a
plan: one flat tile per character cell, so every cell is classified exactly
(no visible pair, some, all) by the tile analysis; heads with run-time nodes
(no plan) are counted from the semantics on given ids, a row of cells at a time. The tile map downsamples a
plan's CSR rows with prefix counts, so it stays cheap for millions of tiles.
"""
from __future__ import annotations

import math

import torch

from ..ir import Spec
from ..analysis.plan import Plan, TilePlan, build_plan
from ..analysis.runtime import has_runtime
from ..core.semantics import visible
from ..routing.blocks import block_masks, normalize_block_indices
from ..core.tiles import Tiling

EMPTY_CH, PARTIAL_CH, FULL_CH, MIXED_CH = " ", "░", "█", "▒"
LEGEND = (f"'{EMPTY_CH}' empty  '{PARTIAL_CH}' partial  '{FULL_CH}' full  "
          f"'{MIXED_CH}' a mix of empty/partial/full tiles (downsampled tile map only)")


def picture_size(nq: int, nkv: int, width: int) -> tuple[int, int]:
    """(rows, cols) of a picture of an nq x nkv matrix that fits `width` characters.

    Terminal characters are about twice as tall as wide, so a square matrix
    gets half as many rows as columns; small matrices get one cell per entry.
    """
    cols = max(1, min(nkv, width - 2))
    if nq <= 64 and nkv <= width - 2:
        return nq, cols
    rows = max(1, min(nq, math.ceil(cols * nq / nkv / 2)))
    return rows, cols


def grid_counts(tp: TilePlan, num_kv_tiles: int, q_group: int, kv_group: int) -> tuple[torch.Tensor, ...]:
    """(visited, full, total) tile pairs per cell when q tiles are grouped by `q_group`
    and kv tiles by `kv_group`; each [rows, cols]."""
    nqt = tp.num_q_tiles
    rows, cols = -(-nqt // q_group), -(-num_kv_tiles // kv_group)
    qt, kt, full = tp.pairs()
    keys = qt * num_kv_tiles + kt  # sorted: CSR rows ascending, kv tiles ascending within a row
    full_cum = torch.zeros(len(keys) + 1, dtype=torch.long)
    full_cum[1:] = torch.cumsum(full.long(), 0)
    edges = torch.clamp(torch.arange(cols + 1) * kv_group, max=num_kv_tiles)
    pos = torch.searchsorted(keys, torch.arange(nqt)[:, None] * num_kv_tiles + edges[None, :])
    visited_row = pos.diff(dim=1)  # [nqt, cols]
    full_row = full_cum[pos].diff(dim=1)
    pad = rows * q_group - nqt
    visited = torch.nn.functional.pad(visited_row, (0, 0, 0, pad)).view(rows, q_group, cols).sum(1)
    fulls = torch.nn.functional.pad(full_row, (0, 0, 0, pad)).view(rows, q_group, cols).sum(1)
    q_sizes = torch.clamp(nqt - torch.arange(rows) * q_group, max=q_group)
    total = q_sizes[:, None] * edges.diff()[None, :]
    return visited, fulls, total


def _render(chars: list[str], rows: int, cols: int) -> list[str]:
    top = "┌" + "─" * cols + "┐"
    bottom = "└" + "─" * cols + "┘"
    return [top] + ["│" + "".join(chars[r * cols:(r + 1) * cols]) + "│" for r in range(rows)] + [bottom]


def cell_chars(visited: torch.Tensor, full: torch.Tensor, total: torch.Tensor, mixed: bool) -> list[str]:
    """One character per cell; with `mixed`, cells holding tiles of different kinds get MIXED_CH."""
    out = []
    for v, f, n in zip(visited.flatten().tolist(), full.flatten().tolist(), total.flatten().tolist()):
        if v == 0:
            out.append(EMPTY_CH)
        elif f == n:
            out.append(FULL_CH)
        elif mixed and not (v == n and f == 0):
            out.append(MIXED_CH)
        else:
            out.append(PARTIAL_CH)
    return out


def draw_tile_map(plan: Plan, head: int = 0, batch: int = 0, width: int = 80) -> tuple[list[str], str]:
    """Lines of the tile map of one head, and a caption saying the scale."""
    tp = plan.head_plan(head, batch)
    nqt, nkt = plan.q_grid.count, plan.kv_grid.count
    rows, cols = picture_size(nqt, nkt, width)
    gq, gk = -(-nqt // rows), -(-nkt // cols)
    visited, full, total = grid_counts(tp, nkt, gq, gk)
    lines = _render(cell_chars(visited, full, total, mixed=True), *visited.shape)
    scale = "one char per tile pair" if gq == gk == 1 else f"each char {gq} q tiles x {gk} kv tiles"
    return lines, f"tile map, head {head}: {nqt} q tiles x {nkt} kv tiles, {scale}"


def draw_mask(spec: Spec, head: int = 0, batch: int = 0, width: int = 80,
              block_indices: torch.Tensor | None = None, clusters: tuple | None = None) -> tuple[list[str], str]:
    """Lines of the mask of one head on the flattened token indices, and a caption.

    Each character is one flat tile of a plan built for the picture, so its
    status is exact: no visible pair, some, or all. A head holding a run-time node
    (Clustered(), box-routed blocks) has no plan: its cells count the element-wise
    semantics on the call's ids (`clusters` = (q ids [B, H, Nq], kv ids [B, H, Nkv])),
    a row of cells at a time, at the tokens' true positions.
    """
    if not 0 <= head < spec.num_heads:
        raise ValueError(f"head must be in 0..{spec.num_heads - 1}, got {head}")
    pattern = spec.head_patterns[head]
    one = Spec(pattern, spec.q_shape, spec.kv_shape, head_dim=spec.head_dim)
    idx = normalize_block_indices(spec, block_indices)
    if idx is not None and not 0 <= batch < idx.shape[0]:
        raise ValueError(f"batch must be in 0..{idx.shape[0] - 1}, got {batch}")
    rows, cols = picture_size(spec.nq, spec.nkv, width)
    tq, tk = -(-spec.nq // rows), -(-spec.nkv // cols)
    scale = "one char per (q, kv) pair" if tq == tk == 1 else f"each char {tq} q x {tk} kv tokens"
    caption = f"mask, head {head}: {spec.nq} x {spec.nkv} (flattened tokens), {scale}"
    if has_runtime(pattern):
        ids = None if clusters is None else (clusters[0][batch, head], clusters[1][batch, head])
        masks = None if idx is None else block_masks(spec, idx[batch:batch + 1, head:head + 1])[0, 0]
        visited, full, total = _semantic_cells(one, pattern, tq, tk, masks, ids)
        return _render(cell_chars(visited, full, total, mixed=False), *visited.shape), caption + ", on these ids"
    if idx is not None:  # only this (batch, head)'s blocks: the picture plans one head
        idx = idx[batch, head][None, None] if one.routed is not None else None
    plan = build_plan(one, Tiling(tq, tk), idx)
    visited, full, total = grid_counts(plan.head_plan(0), plan.kv_grid.count, 1, 1)
    return _render(cell_chars(visited, full, total, mixed=False), *visited.shape), caption


def _semantic_cells(spec: Spec, pattern, tq: int, tk: int, block_mask, clusters) -> tuple[torch.Tensor, ...]:
    """(visible pairs > 0, all visible, 1) per cell of tq x tk tokens, from the semantics."""
    cols = -(-spec.nkv // tk)
    kj = torch.arange(spec.nkv)[None, :]
    sizes_k = torch.clamp(spec.nkv - torch.arange(cols) * tk, max=tk)
    visited, full = [], []
    for q0 in range(0, spec.nq, tq):
        qi = torch.arange(q0, min(spec.nq, q0 + tq))[:, None]
        m = visible(pattern, qi, kj, spec, block_mask, clusters).expand(len(qi), spec.nkv)
        count = torch.nn.functional.pad(m.sum(0), (0, cols * tk - spec.nkv)).view(cols, tk).sum(1)
        visited.append(count > 0)
        full.append(count == sizes_k * len(qi))
    visited_t, full_t = torch.stack(visited).long(), torch.stack(full).long()
    return visited_t, full_t, torch.ones_like(visited_t)
