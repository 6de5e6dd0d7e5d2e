"""The dense-mask oracle: exact, simple, and only for small sizes."""
from __future__ import annotations

import torch

from .ir import Spec
from .routing import block_masks, normalize_block_indices
from .semantics import visible


def dense_mask(spec: Spec, block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """torch.bool [num_heads, Nq, Nkv] (or [B, num_heads, Nq, Nkv] when batched
    block indices are given): True where query q may attend key kv."""
    if not isinstance(spec, Spec):
        raise TypeError(f"dense_mask: spec must be a patterngen.Spec, got {type(spec).__name__}")
    q = torch.arange(spec.nq)[:, None]
    kv = torch.arange(spec.nkv)[None, :]
    indices = normalize_block_indices(spec, block_indices)
    if indices is None:
        masks = {p: visible(p, q, kv, spec) for p in dict.fromkeys(spec.head_patterns)}
        return torch.stack([masks[p] for p in spec.head_patterns])
    bm = block_masks(spec, indices)
    out = torch.stack([torch.stack([visible(p, q, kv, spec, bm[b, h]) for h, p in enumerate(spec.head_patterns)])
                       for b in range(bm.shape[0])])
    return out if block_indices.dim() == 4 else out[0]
