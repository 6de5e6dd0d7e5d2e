"""Run-time block indices of Routed patterns: validation, block masks and MoBA-style routing."""
from __future__ import annotations

import math

import torch

from ..ir import Routed, Spec


def block_counts(spec: Spec) -> tuple[int, int]:
    """(query blocks, key blocks) of the spec's Routed pattern."""
    b = spec.routed.volume  # box blocks cut their grid into whole boxes (Spec checks it)
    return -(-spec.nq // b), -(-spec.nkv // b)


def box_routed(spec: Spec) -> bool:
    """Whether the spec routes box blocks of a grid (BiFormer's regions)."""
    return spec.routed is not None and isinstance(spec.routed.block, tuple)


def block_major(shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """long [N]: the grid's flattened tokens in block-major order: the boxes of `block` row-major
    over the grid of boxes, each box's tokens row-major inside it. In that order box b holds
    tokens [b * volume, (b + 1) * volume): box routing is flat routing of blocks of `volume`."""
    boxes = [n // b for n, b in zip(shape, block)]
    grid = torch.arange(math.prod(shape)).view(*[x for nb, b in zip(boxes, block) for x in (nb, b)])
    nd = len(shape)
    return grid.permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)).reshape(-1)


def flat_equivalent(spec: Spec) -> Spec:
    """A box-routed spec, the node on every head, as the flat-routed spec it is in block-major
    token order (a composition is not: it runs split, `patterngen.runtime`)."""
    r = spec.routed
    if any(p != r for p in spec.head_patterns.unique):
        raise ValueError(f"flat_equivalent: {spec!r} composes its box-routed blocks with other patterns, which "
                         f"block-major order would move; only a spec that is the box-routed node on every head has "
                         f"a flat equivalent")
    return Spec(Routed(r.volume, r.topk), spec.nq, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                head_dim=spec.head_dim)


def box_of(tokens: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """The box (row-major over the grid of boxes) holding each flattened token."""
    out = torch.zeros_like(tokens)
    for k, (n, b) in enumerate(zip(shape, block)):
        coord = (tokens // math.prod(shape[k + 1:])) % n
        out = out * (n // b) + coord // b
    return out


def normalize_block_indices(spec: Spec, block_indices: torch.Tensor | None) -> torch.Tensor | None:
    """Check run-time indices and return them as int64 [B, num_heads, q_blocks, topk].

    Accepted shapes: [H, q_blocks, topk] or [B, H, q_blocks, topk], where H is
    num_heads or num_kv_heads (then shared by the query heads of each kv head);
    -1 marks an unused slot.
    """
    if spec.routed is None:
        if block_indices is not None:
            raise ValueError("block_indices: given, but the spec has no Routed pattern")
        return None
    if block_indices is None:
        raise ValueError(f"block_indices: the spec contains {spec.routed!r}, so block indices "
                         f"[B, heads, q_blocks, topk] are needed (see patterngen.route)")
    if not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices: expected a torch.Tensor, got {type(block_indices).__name__}")
    if block_indices.dtype.is_floating_point or block_indices.dtype == torch.bool or block_indices.is_complex():
        raise TypeError(f"block_indices: expected an integer tensor, got {block_indices.dtype}")
    nqb, nkb = block_counts(spec)
    idx = block_indices if block_indices.dim() == 4 else block_indices.unsqueeze(0)
    if idx.dim() == 4 and idx.shape[0] == 0:
        raise ValueError("block_indices: batch size is 0; give at least one batch entry")
    if idx.dim() != 4 or idx.shape[1] not in (spec.num_heads, spec.num_kv_heads) or idx.shape[2] != nqb:
        raise ValueError(f"block_indices: expected shape [B, {spec.num_heads} or {spec.num_kv_heads}, {nqb}, k] "
                         f"or without B, got {tuple(block_indices.shape)}")
    if idx.shape[3] > spec.routed.topk:
        raise ValueError(f"block_indices: {idx.shape[3]} slots per query block exceed topk={spec.routed.topk}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= nkb):
        raise ValueError(f"block_indices: entries must be in -1..{nkb - 1} (-1 = unused), got range "
                         f"{int(idx.min())}..{int(idx.max())}")
    idx = idx.long()
    if idx.shape[1] != spec.num_heads:
        idx = idx.repeat_interleave(spec.num_heads // spec.num_kv_heads, dim=1)
    return idx


def block_masks(spec: Spec, indices: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, q_blocks, kv_blocks] from normalized indices (duplicates count once)."""
    _, nkb = block_counts(spec)
    hot = torch.zeros(*indices.shape[:3], nkb + 1, dtype=torch.bool, device=indices.device)
    hot.scatter_(3, torch.where(indices < 0, nkb, indices), True)
    return hot[..., :nkb]


def route(q: torch.Tensor, k: torch.Tensor, block, topk: int, causal: bool = False) -> torch.Tensor:
    """MoBA-style block selection: score each key block by the dot product of the
    mean query of a query block with the mean key of the key block (summed over
    the query heads of a kv head), keep the top-k, always keep the query's own
    block, and under `causal` never pick a block that lies wholly in the future.

    q [B, Hq, Nq, D], k [B, Hkv, Nkv, D] -> int64 [B, Hkv, q_blocks, topk], -1 = unused.
    With a tuple `block` (BiFormer's region routing), q and k are grid-shaped, [B, H, *grid,
    D], cut into whole boxes of that shape, numbered row-major over the grid of boxes.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"route: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(block, (tuple, list)):
        block = tuple(block)
        grid = tuple(q.shape[2:-1])
        if q.dim() != 3 + len(block) or tuple(k.shape[2:-1]) != grid or k.dim() != q.dim():
            raise ValueError(f"route: box blocks {block} need grid-shaped q and k [B, H, *grid, D] with a grid of "
                             f"{len(block)} dimension(s), the same for both; got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block) \
                or any(n % b for n, b in zip(grid, block)):
            raise ValueError(f"route: block {block} must be positive ints that cut the grid {grid} into whole boxes")
        if causal:
            raise ValueError("route: causal=True orders flattened tokens; box blocks take causal=False")
        order = block_major(grid, block).to(q.device)
        flat = [t.reshape(*t.shape[:2], -1, t.shape[-1])[:, :, order] for t in (q, k)]
        return route(flat[0], flat[1], math.prod(block), topk)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"route: q and k must be [B, H, N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    for name, value in (("block", block), ("topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"route: {name} must be an int, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"route: {name} must be >= 1, got {value}")
    if not isinstance(causal, bool):
        raise TypeError(f"route: causal must be a bool, got {causal!r}")
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"route: k {tuple(k.shape)} must have q's batch size {B} and head dim {D}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"route: q heads ({Hq}) must be a multiple of k heads ({Hkv}), with at least one k head")
    if Nq == 0 or Nkv == 0:
        raise ValueError(f"route: q and k need at least one token each, got Nq={Nq} and Nkv={Nkv}")
    nqb, nkb = -(-Nq // block), -(-Nkv // block)
    if topk > nkb:
        raise ValueError(f"route: topk must be in 1..{nkb} (the number of key blocks of {block} tokens in "
                         f"{Nkv} keys), got {topk}")

    def pooled(x, n, nb):  # mean over each block, the last block may be short
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - n))
        counts = torch.full((nb,), float(block), device=x.device)
        counts[-1] = n - (nb - 1) * block
        return x.view(*x.shape[:2], nb, block, x.shape[-1]).sum(3) / counts[:, None]

    qm = pooled(q, Nq, nqb).view(B, Hkv, Hq // Hkv, nqb, D)
    km = pooled(k, Nkv, nkb)
    scores = torch.einsum("bhgqd,bhkd->bhqk", qm, km)
    offset = Nkv - Nq
    q_last = torch.clamp(torch.arange(nqb, device=q.device) * block + block - 1, max=Nq - 1) + offset
    own = (q_last // block).clamp(0, nkb - 1)  # key block holding the query block's last (aligned) token
    kb_first = torch.arange(nkb, device=q.device) * block
    if causal:
        scores = scores.masked_fill(kb_first[None, :] > q_last[:, None], float("-inf"))
    scores = scores.scatter(3, own.view(1, 1, nqb, 1).expand(B, Hkv, nqb, 1), float("inf"))
    top = scores.topk(topk, dim=3)
    return torch.where(top.values > float("-inf"), top.indices, -1)
