"""Checks shared by several test files: brute-force tile statuses from the dense oracle, the
plan check built on them, and the registers and stack of a cross-compiled kernel."""
from __future__ import annotations

import math

import torch
from hypothesis import currently_in_test_context, note

import patterngen as pg

EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_of_token(shape: tuple[int, ...], tile) -> torch.Tensor:
    """Tile id of every flattened token, straight from the definition of a tiling."""
    n = math.prod(shape)
    t = torch.arange(n)
    if isinstance(tile, int):
        return t // tile
    tile = tuple(tile)
    counts = [-(-L // s) for L, s in zip(shape, tile)]
    coords = []
    for L in reversed(shape):
        coords.append(t % L)
        t = t // L
    coords = coords[::-1]
    out = torch.zeros(n, dtype=torch.long)
    for c, s, cnt in zip(coords, tile, counts):
        out = out * cnt + c // s
    return out


def membership(grid: pg.TileGrid) -> torch.Tensor:
    """[N, count] one-hot of each token's tile, from TileGrid.tokens, after checking
    that tokens() partitions the grid the way the tiling's definition says."""
    tok = grid.tokens(torch.arange(grid.count))
    assert tok.shape == (grid.count, grid.volume)
    tiles = torch.arange(grid.count)[:, None].expand_as(tok)
    valid = tok >= 0
    n = math.prod(grid.shape)
    assert int(valid.sum()) == n, "tiles must cover every token exactly once"
    owner = torch.full((n,), -1, dtype=torch.long)
    owner[tok[valid]] = tiles[valid]
    assert torch.equal(owner, tile_of_token(grid.shape, grid.tile))
    assert torch.equal(grid.sizes, valid.sum(1))
    onehot = torch.zeros(n, grid.count, dtype=torch.float64)
    onehot[torch.arange(n), owner] = 1.0
    return onehot


def brute_status(mask: torch.Tensor, aq: torch.Tensor, ak: torch.Tensor) -> torch.Tensor:
    """[Tq, Tk] EMPTY/PARTIAL/FULL of a dense [Nq, Nkv] mask."""
    visible = aq.T @ mask.double() @ ak
    pairs = aq.sum(0)[:, None] * ak.sum(0)[None, :]
    return torch.where(visible == pairs, FULL, torch.where(visible > 0, PARTIAL, EMPTY))


def plan_status(tp, tq: int, tk: int) -> torch.Tensor:
    """[Tq, Tk] status of one TilePlan, after checking its CSR structure."""
    assert tp.q_ptr.shape == (tq + 1,)
    assert int(tp.q_ptr[0]) == 0 and int(tp.q_ptr[-1]) == len(tp.kv_tiles) == len(tp.full)
    assert bool((tp.q_ptr.diff() >= 0).all())
    rows = torch.repeat_interleave(torch.arange(tq), tp.q_ptr.diff())
    same_row = rows[1:] == rows[:-1]
    bad = same_row & (tp.kv_tiles.diff() <= 0)  # ascending, each kv tile at most once per q tile
    assert not bool(bad.any()), f"q tile {int(rows[1:][bad][0])}: kv tiles not strictly ascending"
    if len(tp.kv_tiles):
        assert 0 <= int(tp.kv_tiles.min()) and int(tp.kv_tiles.max()) < tk
    qt, kt, full = tp.pairs()
    out = torch.full((tq, tk), EMPTY, dtype=torch.long)
    out[qt, kt] = torch.where(full, FULL, PARTIAL)
    assert tp.visited == len(qt) and tp.num_full == int(full.sum()) and tp.num_partial == int((~full).sum())
    return out


def check_plan(spec: pg.Spec, tiling: pg.Tiling | None, indices: torch.Tensor | None = None) -> pg.Plan:
    """Build the plan and compare every head (and batch) with brute force; returns the plan."""
    if currently_in_test_context():
        note(f"spec={spec!r} tiling={tiling!r}")
        if indices is not None:
            note(f"block_indices={indices.tolist()}")
    plan = pg.build_plan(spec, tiling, indices)
    mask = pg.dense_mask(spec, indices)
    if mask.dim() == 3:
        mask = mask[None]
    qg, kg = plan.q_grid, plan.kv_grid
    aq, ak = membership(qg), membership(kg)
    assert plan.total_pairs == qg.count * kg.count
    rows = plan.head_group.shape[0]
    assert rows == (mask.shape[0] if indices is not None else 1)
    assert plan.head_group.shape[1] == spec.num_heads
    totals = {"visited": 0, "full": 0, "partial": 0}
    for b in range(rows):
        for h in range(spec.num_heads):
            want = brute_status(mask[b, h], aq, ak)
            got = plan_status(plan.head_plan(h, b), qg.count, kg.count)
            if not torch.equal(got, want):
                bad = torch.nonzero(got != want)[:5].tolist()
                detail = [(q, k, int(got[q, k]), int(want[q, k])) for q, k in bad]
                raise AssertionError(f"{spec!r} {tiling!r} batch {b} head {h}: "
                                     f"(q tile, kv tile, plan, brute) = {detail}")
            totals["visited"] += int((want != EMPTY).sum())
            totals["full"] += int((want == FULL).sum())
            totals["partial"] += int((want == PARTIAL).sum())
    counts = plan.counts()
    total = plan.total_pairs * rows * spec.num_heads
    assert counts == {"tile_pairs": total, **totals, "empty": total - totals["visited"]}
    return plan


def cubin_resources(compiled) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin (the audit's reader, backends/triton/sass.py)."""
    from patterngen.backends.triton.sass import resources
    return resources(compiled)


def dense_attention(q, k, v, spec, block_indices=None):
    """The independent truth for kernels: float64 attention over the oracle's dense mask (GQA by
    repeating k/v); rows without a visible key give 0 and lse -inf."""
    mask = pg.dense_mask(spec, block_indices)
    g = spec.num_heads // spec.num_kv_heads
    k, v = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2) / spec.head_dim ** 0.5).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return p @ v, lse


def dense_gradients(q, k, v, dout, spec, block_indices=None):
    """(dq, dk, dv) of `dense_attention` in float64, from the softmax gradient written out
    (autograd through a row of -inf scores gives NaN): rows without a visible key contribute
    nothing, and each kv head sums the gradients of its query heads (GQA)."""
    mask = pg.dense_mask(spec, block_indices)
    g = spec.num_heads // spec.num_kv_heads
    scale = spec.head_dim ** -0.5
    q, dout = q.double(), dout.double()
    k, v = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    dp = dout @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))

    def per_kv_head(t):
        return t.unflatten(1, (spec.num_kv_heads, g)).sum(2)
    return ds @ k * scale, per_kv_head(ds.transpose(-1, -2) @ q * scale), per_kv_head(p.transpose(-1, -2) @ dout)


def oracle_attention(q, k, v, spec, softcap=None, slopes=None, sinks=None, block_indices=None):
    """(out, lse) in float64 from the definitions, differentiable: the dense mask, scaled scores,
    softcap c * tanh(s / c), ALiBi -slope * |i + nkv - nq - j|, the sink as an extra column with
    no value; rows that see nothing (and no sink) give 0 and lse -inf."""
    mask = pg.dense_mask(spec, block_indices)
    g = spec.num_heads // spec.num_kv_heads
    k, v = (t.repeat_interleave(g, 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * spec.head_dim ** -0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        i = torch.arange(spec.nq, dtype=s.dtype)[:, None] + (spec.nkv - spec.nq)
        j = torch.arange(spec.nkv, dtype=s.dtype)[None, :]
        s = s - slopes.to(s.dtype)[:, None, None] * (i - j).abs()
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)], -1)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l))).squeeze(-1)
    p = p / torch.where(empty, 1.0, l)
    return (p[..., :-1] if sinks is not None else p) @ v, lse
