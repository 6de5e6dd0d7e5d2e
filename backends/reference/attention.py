"""Exact reference attention that follows a tile plan.

This is the ground truth the generated kernels are tested against, and the
path taken where no kernel runs (CPU tensors, unusual dtypes). It uses the
same plan as the kernels: for each query tile it gathers only the tokens of
the key tiles the plan visits, evaluates the element-wise semantics only on
partial tiles, and never forms the Nq x Nkv score matrix. It is written in
plain torch ops, so autograd differentiates it and it runs on any device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...ir import Routed, Spec
from ...analysis.plan import Plan, TilePlan, build_plan
from ...routing.blocks import block_masks, normalize_block_indices
from ...core.semantics import visible
from ...core.tiles import TileGrid, Tiling
from ..inputs import check_inputs, check_scale

DEFAULT_MAX_SCORES = 1 << 22
"""Default bound on the elements of one chunk's score block ([pairs, q tiles, q tile, visited kv tokens])."""
SMALL_PAIRS = 1 << 14
"""`small_attention` takes calls of at most this many (query, key) pairs per head: decoding steps
and short prompts, where forming the mask costs less than planning tiles."""

def _check_plan(plan, spec: Spec, index_batch: int | None) -> None:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a patterngen Plan (pg.build_plan), got {type(plan).__name__}")
    if plan.spec != spec:
        raise ValueError(f"plan: built for {plan.spec!r}, not for the given {spec!r}")
    rows = plan.head_group.shape[0]
    if index_batch is not None and rows != index_batch:
        raise ValueError(f"plan: built for block indices with batch size {rows}, but block_indices has batch "
                         f"size {index_batch}; build the plan from the same block_indices")


# -- the computation ------------------------------------------------------------------
@dataclass
class _Job:
    """Query heads (as (batch, head) pairs) that share one tile plan, pattern and block mask."""

    plan: TilePlan
    pattern: object
    block_mask: torch.Tensor | None
    batches: list
    heads: list


def _jobs(plan: Plan, spec: Spec, B: int, masks: torch.Tensor | None) -> list[_Job]:
    jobs: dict = {}
    routed_rows = plan.head_group.shape[0]
    for b in range(B):
        bi = b if routed_rows > 1 else 0
        for h in range(spec.num_heads):
            g = int(plan.head_group[bi, h])
            pattern = spec.head_patterns[h]
            routed = masks is not None and any(isinstance(n, Routed) for n in pattern.walk())
            key = (g, pattern, (bi, h) if routed else None)
            if key not in jobs:
                bm = masks[bi if masks.shape[0] > 1 else 0, h] if routed else None
                jobs[key] = _Job(plan.groups[g], pattern, bm, [], [])
            jobs[key].batches.append(b)
            jobs[key].heads.append(h)
    return list(jobs.values())


def _chunks(counts: list[int], per_tile: int, max_scores: int):
    """Split q tiles into runs whose padded score block (per_tile * run length * longest
    kv-tile list in the run) stays within max_scores; a single tile may exceed it."""
    start, widest = 0, 1
    for i, c in enumerate(counts):
        w = max(widest, c)
        if i > start and per_tile * (i - start + 1) * w > max_scores:
            yield start, i, widest
            start, w = i, max(1, c)
        widest = w
    if start < len(counts):
        yield start, len(counts), widest


def alibi_bias(slopes: torch.Tensor, q_tok: torch.Tensor, kv_tok: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """ALiBi's additive bias -slope * |i - j| of queries q_tok and keys kv_tok (broadcast
    against each other; `slopes` already broadcast to them), with query i at position
    i + nkv - nq: aligned bottom-right to the keys, as FlashAttention's ALiBi."""
    return -slopes * (q_tok + (nkv - nq) - kv_tok).abs().to(slopes.dtype)


def masked_attention(Q, K, V, mask, scale: float, softcap: float | None = None, bias=None):
    """(out, lse, scores) of softmax(S) V over the visible keys of `mask`, S = Q K^T * scale,
    capped to softcap * tanh(S / softcap) when given, plus `bias` (ALiBi) when given; a row
    with nothing visible gives zeros and lse -inf, and no NaN in gradients."""
    s = torch.matmul(Q, K.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing visible
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe)).squeeze(-1)
    return torch.matmul(p, V) / l_safe, lse, s


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention over the union of disjoint key sets from each set's (out, lse),
    by log-sum-exp; a row no part saw stays zeros, lse -inf. Differentiable."""
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), 0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(o.to(lse.dtype) * torch.exp(l - safe)[..., None] for o, l in parts)
    return out.to(parts[0][0].dtype), lse


@dataclass(frozen=True)
class _Rows:
    """Where a call's tokens sit in its tensors: the q tiles it computes (`tiles`), query token
    t at row q_rows[t] of q, key token j at row kv_rows[j] of k and v (-1: not held, never
    visible). The whole call: every tile, token t at row t."""

    tiles: torch.Tensor
    q_rows: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None


def _run_job(job: _Job, q, k, v, spec: Spec, qg: TileGrid, kg: TileGrid, scale: float, acc: torch.dtype,
             max_scores: int, stats: dict | None, softcap: float | None, alibi_slopes: torch.Tensor | None,
             rows: _Rows):
    device = q.device
    rep = spec.num_heads // spec.num_kv_heads
    bidx = torch.tensor(job.batches, device=device)[:, None, None]
    hidx = torch.tensor(job.heads, device=device)[:, None, None]
    P = len(job.batches)
    tp = job.plan
    counts = tp.q_ptr.diff()[rows.tiles]
    outs, lses = [], []
    for c0, c1, width in _chunks(counts.tolist(), P * qg.volume * kg.volume, max_scores):
        C = c1 - c0
        tiles = rows.tiles[c0:c1]
        qtok = qg.tokens(tiles)  # [C, vq]
        slot = torch.arange(width)
        used = slot < counts[c0:c1, None]  # [C, width]
        pos = (tp.q_ptr[tiles, None] + slot).clamp(max=max(tp.visited - 1, 0))
        if tp.visited:
            kt = torch.where(used, tp.kv_tiles[pos], -1)
            full = used & tp.full[pos]
        else:
            kt = torch.full((C, width), -1, dtype=torch.long)
            full = torch.zeros((C, width), dtype=torch.bool)
        ktok = torch.where(used[..., None], kg.tokens(kt.clamp_min(0).flatten()).view(C, width, -1), -1)
        qtok, ktok, full, used = qtok.to(device), ktok.to(device), full.to(device), used.to(device)

        # Mask [C, width, vq, vkv]: full tiles are visible as a whole (minus padding); the
        # pattern is evaluated element-wise on partial tiles only.
        mask = full[:, :, None, None].expand(C, width, qg.volume, kg.volume).clone()
        pc, pj = torch.nonzero(used & ~full, as_tuple=True)
        if len(pc):
            mask[pc, pj] = visible(job.pattern, qtok[pc].clamp_min(0)[:, :, None],
                                   ktok[pc, pj].clamp_min(0)[:, None, :], spec, job.block_mask)
        mask &= (qtok >= 0)[:, None, :, None] & (ktok >= 0)[:, :, None, :]
        mask = mask.transpose(1, 2).reshape(C, qg.volume, width * kg.volume)  # [C, vq, T]

        kflat = ktok.clamp_min(0).view(C, -1)[None]  # [1, C, T]
        krow = kflat
        if rows.kv_rows is not None:
            krow = rows.kv_rows[kflat]
            mask &= (krow[0] >= 0)[:, None, :]
            krow = krow.clamp_min(0)
        qrow = qtok.clamp_min(0) if rows.q_rows is None else rows.q_rows[qtok.clamp_min(0)]
        Q = q[bidx, hidx, qrow[None]].to(acc)  # [P, C, vq, D]
        K = k[bidx, hidx // rep, krow].to(acc)  # [P, C, T, D]
        V = v[bidx, hidx // rep, krow].to(acc)
        bias = None
        if alibi_slopes is not None:  # 1-D: tokens are positions
            slopes = alibi_slopes.to(acc)[hidx[:, :, :, None]]  # [P, 1, 1, 1]
            bias = alibi_bias(slopes, qtok[:, :, None], kflat[0][:, None, :], spec.nq, spec.nkv)
        o, lse, s = masked_attention(Q, K, V, mask, scale, softcap, bias)  # s: [P, C, vq, T]
        outs.append(o.flatten(1, 2))  # [P, C*vq, D]
        lses.append(lse.flatten(1))  # [P, C*vq]
        if stats is not None:
            stats["chunks"] = stats.get("chunks", 0) + 1
            stats["max_scores"] = max(stats.get("max_scores", 0), s.numel())
            stats["scores"] = stats.get("scores", 0) + s.numel()
            stats["partial_tiles"] = stats.get("partial_tiles", 0) + len(pc)
            stats["full_tiles"] = stats.get("full_tiles", 0) + int(full.sum())
    return torch.cat(outs, 1), torch.cat(lses, 1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, plan: Plan | None = None,
                        scale: float | None = None, block_indices: torch.Tensor | None = None, *,
                        tiling: Tiling | None = None, max_scores: int | None = None,
                        stats: dict | None = None, softcap: float | None = None,
                        alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention computed exactly along `plan` (built from `spec`, `tiling` and
    `block_indices` when not given).

    q [B, Hq, Nq, D], k/v [B, Hkv, Nkv, D] as in scaled_dot_product_attention (GQA:
    query head h reads kv head h // (Hq // Hkv)). Returns out [B, Hq, Nq, D] in q's
    dtype and the natural-log log-sum-exp [B, Hq, Nq] (float32; float64 for float64
    inputs); a row with no visible key gives zeros and -inf, and no NaN in gradients.

    Scores are accumulated in float32 (float64 for float64 inputs). Query tiles are
    processed in chunks whose score block holds at most `max_scores` elements (a
    single tile may exceed it), so memory follows the visited tiles. Routed specs
    need `block_indices` even with a prebuilt plan: partial tiles read the block
    mask. `stats`, if a dict, receives counters (chunks, max_scores, scores,
    partial_tiles, full_tiles) for tests and debugging. `softcap` c turns every score s (scaled)
    into c * tanh(s / c); `alibi_slopes` [Hq] (1-D specs) then add -slope * |i - j|
    (`alibi_bias`); both before masking.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    check_inputs(q, k, v, spec)
    scale = check_scale(scale, spec.head_dim)
    if max_scores is None:
        max_scores = DEFAULT_MAX_SCORES
    elif isinstance(max_scores, bool) or not isinstance(max_scores, int) or max_scores < 1:
        raise ValueError(f"max_scores: expected a positive int or None, got {max_scores!r}")
    B = q.shape[0]
    indices = normalize_block_indices(spec, block_indices)
    if indices is not None and indices.shape[0] not in (1, B):
        raise ValueError(f"block_indices: batch size {indices.shape[0]} must be 1 or q's batch size {B}")
    if plan is None:
        plan = build_plan(spec, tiling, None if indices is None else indices.cpu())
    else:
        if tiling is not None:
            raise ValueError("tiling: give either a plan or a tiling, not both (the plan fixes the tiling)")
        _check_plan(plan, spec, None if indices is None else indices.shape[0])
    masks = None if indices is None else block_masks(spec, indices.to(q.device))

    return _along_plan(q, k, v, spec, plan, masks, scale, max_scores, stats, softcap, alibi_slopes,
                       _Rows(torch.arange(plan.q_grid.count)))


def _along_plan(q, k, v, spec: Spec, plan: Plan, masks, scale: float, max_scores: int, stats: dict | None,
                softcap: float | None, alibi_slopes: torch.Tensor | None, rows: _Rows):
    """(out, lse) of the query tokens of `rows.tiles` (every query row of q), in token order."""
    B = q.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if B == 0:
        return q.new_zeros(q.shape), torch.zeros(q.shape[:3], dtype=acc, device=q.device)
    qg, kg = plan.q_grid, plan.kv_grid
    # Each query token lies in exactly one q tile: these rows of the tile-major
    # output, in this order, are the tokens in ascending order.
    qtok_all = qg.tokens(rows.tiles).flatten()
    valid = torch.nonzero(qtok_all >= 0).flatten()
    order_rows = valid[torch.argsort(qtok_all[valid])].to(q.device)
    if len(order_rows) != q.shape[2]:
        raise ValueError(f"q: {q.shape[2]} query rows, but the q tiles given hold {len(order_rows)} tokens")

    outs, lses, order = [], [], []
    for job in _jobs(plan, spec, B, masks):
        o, lse = _run_job(job, q, k, v, spec, qg, kg, scale, acc, max_scores, stats, softcap, alibi_slopes, rows)
        outs.append(o[:, order_rows])
        lses.append(lse[:, order_rows])
        order += [b * spec.num_heads + h for b, h in zip(job.batches, job.heads)]
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    out = torch.cat(outs)[inverse].view(q.shape).to(q.dtype)
    lse = torch.cat(lses)[inverse].view(q.shape[:3])
    return out, lse


def shard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, plan: Plan,
                    q_tiles: torch.Tensor, q_rows: torch.Tensor, kv_rows: torch.Tensor, scale: float | None = None,
                    max_scores: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Part of `spec`'s attention, as one process of a sequence-sharded run computes it: the
    query tokens of the q tiles `q_tiles` (of `plan`), query token t at row `q_rows[t]` of q
    [B, Hq, n, D] (the tiles' tokens in ascending order), against the keys the process holds,
    key token j at row `kv_rows[j]` of k and v [B, Hkv, m, D] (-1: not held, masked out). The
    pattern is evaluated at the true token indices, so the (out, lse) of disjoint key sets
    merge by log-sum-exp into the whole attention (`patterngen.distributed`). Differentiable."""
    scale = check_scale(scale, spec.head_dim)
    for name, rows, n in (("q_rows", q_rows, spec.nq), ("kv_rows", kv_rows, spec.nkv)):
        if rows.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) (one row per token), got {tuple(rows.shape)}")
    rows = _Rows(q_tiles.cpu(), *(r.to(device=q.device, dtype=torch.long) for r in (q_rows, kv_rows)))
    return _along_plan(q, k, v, spec, plan, None, scale, DEFAULT_MAX_SCORES if max_scores is None else max_scores,
                       None, None, None, rows)


def _small_masks(spec: Spec, device) -> torch.Tensor:
    """bool [heads, Nq, Nkv] of a small call (a view of one mask where every head has the same
    pattern), straight from the semantics."""
    qi = torch.arange(spec.nq, device=device)[:, None]
    kj = torch.arange(spec.nkv, device=device)[None, :]
    heads = spec.head_patterns
    masks = torch.stack([visible(p, qi, kj, spec).expand(spec.nq, spec.nkv) for p in heads.unique])
    if len(heads.unique) > 1:
        return masks[torch.tensor([heads.unique.index(p) for p in heads], device=device)]
    return masks.expand(spec.num_heads, spec.nq, spec.nkv)


def _check_small(spec: Spec) -> None:
    if spec.routed is not None or spec.nq * spec.nkv > SMALL_PAIRS:
        raise ValueError(f"small_attention: takes static specs of at most {SMALL_PAIRS} pairs, got {spec!r}")


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec,
                    scale: float | None = None, softcap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_attention` of a small static call (Nq * Nkv <= SMALL_PAIRS, no Routed part)
    without a plan: the element-wise semantics give the [heads, Nq, Nkv] mask directly. A
    decoding step (one query, a new key length each time) then plans nothing. Plain torch
    ops: differentiable, also through the lse."""
    _check_small(spec)
    scale = check_scale(scale, spec.head_dim)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = spec.num_heads // spec.num_kv_heads
    kk, vv = (t.to(acc).repeat_interleave(rep, 1) if rep > 1 else t.to(acc) for t in (k, v))
    bias = None
    if alibi_slopes is not None:
        qi = torch.arange(spec.nq, device=q.device)[:, None]
        kj = torch.arange(spec.nkv, device=q.device)[None, :]
        bias = alibi_bias(alibi_slopes.to(acc)[:, None, None], qi, kj, spec.nq, spec.nkv)
    out, lse, _ = masked_attention(q.to(acc), kk, vv, _small_masks(spec, q.device), scale, softcap, bias)
    return out.to(q.dtype), lse


@functools.lru_cache(maxsize=16)
def _fused_bias(spec: Spec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(additive mask [1, Hkv, group * Nq, Nkv], rows that see nothing or None) of a small call,
    kept for the next calls of the same lengths: every layer of a decoding step shares one."""
    hkv, rep = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
    masks = _small_masks(spec, device)
    bias = torch.zeros(masks.shape, dtype=dtype, device=device).masked_fill_(~masks, float("-inf"))
    blind = ~masks.any(-1)
    return bias.reshape(1, hkv, rep * spec.nq, spec.nkv), (blind if bool(blind.any()) else None)


def small_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`small_attention`'s result through PyTorch's fused CPU attention, for the op's forward
    (its backward differentiates `small_attention`): a decoding step costs a few small ops.
    The query heads of a GQA group ride along the query axis, so keys are never repeated.
    For float32 and float64: with half inputs the fused kernel's lse strays ~5e-5 from the
    float32 accumulation the reference promises."""
    _check_small(spec)
    B, H, nq, D = q.shape
    bias, blind = _fused_bias(spec, q.device, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(B, spec.num_kv_heads, -1, D), k, v, attn_mask=bias, scale=check_scale(scale, spec.head_dim))
    lse = lse.reshape(B, H, nq)
    if blind is not None:  # rows with nothing visible: zeros (as computed) and lse -inf
        lse = lse.masked_fill(blind, float("-inf"))
    return out.reshape(B, H, nq, D), lse
