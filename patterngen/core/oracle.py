"""The dense-mask oracle: exact, simple, and only for small sizes."""
from __future__ import annotations

import torch

from ..ir import Spec
from ..routing.blocks import block_masks, normalize_block_indices
from .semantics import visible


MAX_ELEMENTS = 1 << 30
"""The largest mask `dense_mask` builds by default: 2**30 booleans (1 GiB, and several times that
in temporaries while it is computed). Larger specs are analysed tile by tile (`build_plan`,
`simulate`), never as a dense mask."""


def dense_mask(spec: Spec, block_indices: torch.Tensor | None = None, *,
               max_elements: int = MAX_ELEMENTS, clusters: tuple | None = None) -> torch.Tensor:
    """torch.bool [num_heads, Nq, Nkv] (or [B, num_heads, Nq, Nkv] when batched
    block indices are given): True where query q may attend key kv. `clusters` = (q ids
    [num_heads, Nq], kv ids [num_heads, Nkv]) are a Clustered spec's cluster ids (one batch entry).

    Refuses masks of more than `max_elements` entries (default `MAX_ELEMENTS`, 2**30)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"dense_mask: spec must be a patterngen.Spec, got {type(spec).__name__}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements: expected a positive int, got {max_elements!r}")
    batch = block_indices.shape[0] if isinstance(block_indices, torch.Tensor) and block_indices.dim() == 4 else 1
    size = batch * spec.num_heads * spec.nq * spec.nkv
    if size > max_elements:
        raise ValueError(f"dense_mask: {spec!r} would need a mask of {batch * spec.num_heads:,} x {spec.nq:,} x "
                         f"{spec.nkv:,} = {size:,} booleans, above max_elements={max_elements:,}; the dense mask "
                         f"is an oracle for small sizes. For large specs use pg.build_plan(spec) (the tile plan "
                         f"and its counts) or pg.simulate(spec), which never build the mask, or pass a larger "
                         f"max_elements if the memory is there")
    q = torch.arange(spec.nq)[:, None]
    kv = torch.arange(spec.nkv)[None, :]
    indices = normalize_block_indices(spec, block_indices)
    if spec.num_heads == 0:
        return torch.zeros((batch, 0, spec.nq, spec.nkv) if block_indices is not None and block_indices.dim() == 4
                           else (0, spec.nq, spec.nkv), dtype=torch.bool)
    if clusters is not None:
        if indices is not None:
            raise ValueError("dense_mask: give block_indices or clusters, not both")
        cq, ck = clusters
        if tuple(cq.shape) != (spec.num_heads, spec.nq) or tuple(ck.shape) != (spec.num_heads, spec.nkv):
            raise ValueError(f"clusters: expected ids [{spec.num_heads}, {spec.nq}] and [{spec.num_heads}, "
                             f"{spec.nkv}] (one batch entry, per head), got {list(cq.shape)} and {list(ck.shape)}")
        return torch.stack([visible(p, q, kv, spec, clusters=(cq[h], ck[h])).expand(spec.nq, spec.nkv)
                            for h, p in enumerate(spec.head_patterns)])
    if indices is None:
        masks = {p: visible(p, q, kv, spec) for p in spec.head_patterns.unique}
        return torch.stack([masks[p] for p in spec.head_patterns])
    bm = block_masks(spec, indices)
    out = torch.stack([torch.stack([visible(p, q, kv, spec, bm[b, h]) for h, p in enumerate(spec.head_patterns)])
                       for b in range(bm.shape[0])])
    return out if block_indices.dim() == 4 else out[0]
