"""A spec as PyTorch FlexAttention sees it: a `mask_mod` and a `BlockMask`.

The benchmark compares patterngen with FlexAttention on the *same* pattern, so
the mask_mod is built from `patterngen.core.semantics.visible`, the one element-wise
definition of the semantics, rather than written again by hand. FlexAttention
calls it on scalar index tensors (under vmap or while tracing its Triton
template), which `visible` handles since it only broadcasts.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir import Spec
from ..routing.blocks import block_masks, normalize_block_indices
from ..core.semantics import visible

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_spec(spec) -> Spec:
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    return spec


def _routed_table(spec: Spec, block_indices) -> torch.Tensor | None:
    """bool [B, H, q_blocks, kv_blocks] of the selected blocks of a Routed spec (None otherwise)."""
    if spec.routed is not None and block_indices is None:
        raise ValueError(f"spec: {spec.routed!r} selects key blocks at run time, which a static FlexAttention "
                         f"mask_mod cannot express; pass block_indices (see patterngen.route) to capture them "
                         f"as a table, or use a spec without Routed nodes")
    indices = normalize_block_indices(spec, block_indices)  # also refuses indices without Routed nodes
    return None if indices is None else block_masks(spec, indices)


def _head_runs(heads: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of consecutive head indices."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


def mask_mod_for(spec: Spec, block_indices: torch.Tensor | None = None,
                 head_chosen: torch.Tensor | None = None) -> MaskMod:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` equal to `pg.dense_mask(spec)[h]`;
    with `head_chosen` [B, H, Nq] (Mixture-of-Head routing), also false where token
    q_idx did not choose head h (captured as a table on its device).

    Heads with different patterns are told apart by comparing `h` with the runs
    of heads that share a pattern (plain integer comparisons: no captured table,
    so the same function works on any device and inside compiled kernels).
    A Routed spec needs its run-time `block_indices`: they are captured as a
    bool table [B, H, q_blocks, kv_blocks] on their device, indexed by (b, h).
    """
    spec = _check_spec(spec)
    if head_chosen is not None:
        base = mask_mod_for(spec, block_indices)

        def head_routed_mask_mod(b, h, q_idx, kv_idx):
            return base(b, h, q_idx, kv_idx) & head_chosen[b, h, q_idx]

        head_routed_mask_mod.__name__ = head_routed_mask_mod.__qualname__ = "patterngen_head_routed_mask_mod"
        return head_routed_mask_mod
    table = _routed_table(spec, block_indices)
    if table is not None:
        heads = spec.head_patterns

        def routed_mask_mod(b, h, q_idx, kv_idx):
            blocks = table[b, h]
            out = visible(heads[0], q_idx, kv_idx, spec, blocks)
            for hh in range(1, len(heads)):
                if heads[hh] != heads[0]:
                    out = torch.where(h == hh, visible(heads[hh], q_idx, kv_idx, spec, blocks), out)
            return out

        routed_mask_mod.__name__ = routed_mask_mod.__qualname__ = "patterngen_routed_mask_mod"
        return routed_mask_mod
    patterns = list(spec.head_patterns.unique)
    # the most common pattern is the default branch: it needs no head test
    members = {p: [h for h, hp in enumerate(spec.head_patterns) if hp == p] for p in patterns}
    patterns.sort(key=lambda p: -len(members[p]))
    default, others = patterns[0], [(p, _head_runs(members[p])) for p in patterns[1:]]

    def mask_mod(b, h, q_idx, kv_idx):
        out = visible(default, q_idx, kv_idx, spec)
        for pattern, runs in others:
            in_group = None
            for start, stop in runs:
                hit = (h == start) if stop == start + 1 else ((h >= start) & (h < stop))
                in_group = hit if in_group is None else (in_group | hit)
            out = torch.where(in_group, visible(pattern, q_idx, kv_idx, spec), out)
        return out

    mask_mod.__name__ = "patterngen_mask_mod"
    mask_mod.__qualname__ = mask_mod.__name__
    return mask_mod


def shared_pattern(spec: Spec) -> bool:
    """True when every head has the same pattern (the block mask then needs no head dim)."""
    return len(spec.head_patterns.unique) == 1


def block_mask_for(spec: Spec, block_size: int | tuple[int, int] = 128, device: str | torch.device = "cpu",
                   compile: bool | None = None, block_indices: torch.Tensor | None = None,
                   head_chosen: torch.Tensor | None = None):
    """FlexAttention `BlockMask` of the spec: B=None (the pattern does not depend on the
    batch), H=None when all heads share one pattern, else num_heads. Routed specs take
    `block_indices` (moved to `device`) and get B and H from them; head routing
    (`head_chosen` [B, H, Nq] bool, see `mask_mod_for`) gets B and H from that.

    `compile` builds it through `torch.compile(create_block_mask)`, which avoids
    materialising Nq x Nkv booleans at once; default: on CUDA only.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    spec = _check_spec(spec)
    sizes = block_size if isinstance(block_size, tuple) else (block_size,)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"block_size: expected a positive int or a pair of them, got {block_size!r}")
    device = torch.device(device)
    if compile is None:
        compile = device.type == "cuda"
    batch, heads = None, (None if shared_pattern(spec) else spec.num_heads)
    if spec.routed is not None:
        if block_indices is None:
            _routed_table(spec, None)  # raises the explanation
        block_indices = block_indices.to(device)
        batch = block_indices.shape[0] if block_indices.dim() == 4 else None
        heads = spec.num_heads
    if head_chosen is not None:
        head_chosen = head_chosen.to(device)
        batch, heads = head_chosen.shape[0], spec.num_heads
    build = _compiled_create_block_mask() if compile else create_block_mask
    return build(mask_mod_for(spec, block_indices, head_chosen), B=batch, H=heads, Q_LEN=spec.nq, KV_LEN=spec.nkv,
                 device=device, BLOCK_SIZE=block_size)


_COMPILED = None


def _compiled_create_block_mask():
    """`torch.compile(create_block_mask)`, made once: FlexAttention's advice for long
    sequences (the mask is evaluated block by block inside generated code instead of as
    one Nq x Nkv tensor). Each new spec is one recompilation, so a caller building many
    block masks should raise `torch._dynamo.config.recompile_limit`."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import create_block_mask
        _COMPILED = torch.compile(create_block_mask)
    return _COMPILED


def dense_mask_via_flex(spec: Spec, device: str | torch.device = "cpu",
                        block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """bool [num_heads, Nq, Nkv] (batch 0 of the routing) evaluated through FlexAttention's
    `create_mask`: a check that the mask_mod means what the oracle means; small sizes only."""
    from torch.nn.attention.flex_attention import create_mask

    spec = _check_spec(spec)
    if block_indices is not None:
        block_indices = block_indices.to(device)
    return create_mask(mask_mod_for(spec, block_indices), 1, spec.num_heads, spec.nq, spec.nkv, device=device)[0]


__all__ = ["mask_mod_for", "block_mask_for", "dense_mask_via_flex", "shared_pattern"]
