"""Mixture-of-Head routing: which heads each query token uses, and with what weight.

MoH (Jin et al., 2024) treats heads as experts: a few shared heads are always on,
and a router picks the top-k of the others per token. `route_heads` turns router
scores into the `head_indices` that `pg.attention` takes (so only the chosen
(token, head) pairs are computed) and the gates that weight the heads' outputs.
The selection is not differentiable; the gates are, through torch.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _shared_heads(shared, num_heads: int) -> list[int]:
    if isinstance(shared, bool) or not isinstance(shared, (int, Sequence)):
        raise TypeError(f"shared: expected an int (the first `shared` heads) or a sequence of head indices, "
                        f"got {shared!r}")
    heads = list(range(shared)) if isinstance(shared, int) else list(shared)
    if isinstance(shared, int) and not 0 <= shared <= num_heads:
        raise ValueError(f"shared: must lie in [0, {num_heads}] for {num_heads} heads, got {shared}")
    if any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads for h in heads) \
            or len(set(heads)) != len(heads):
        raise ValueError(f"shared: expected distinct head indices in [0, {num_heads}), got {shared!r}")
    return heads


def route_heads(scores: torch.Tensor, topk: int, shared=0, balance: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(head_indices [B, Nq, S + topk] int64, gates [B, Nq, S + topk]) from router scores [B, Nq, H].

    shared: the always-on heads, an int S (heads 0..S-1) or a sequence of head indices.
    The other heads are routed: each token takes the `topk` with the highest scores.
    Gates follow MoH: a softmax over the shared heads' scores, and a softmax over all
    routed heads' scores read at the chosen ones; `balance` [B, Nq, 2], if given, are
    logits whose softmax weighs the shared against the routed part (else both weigh 1).
    The first S columns are the shared heads; a layer's output is
    sum_j gates[..., j] * head_output[head_indices[..., j]].
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores: expected a float tensor [B, Nq, heads], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    H = scores.shape[-1]
    heads = _shared_heads(shared, H)
    routed = [h for h in range(H) if h not in set(heads)]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= len(routed):
        raise ValueError(f"topk: expected an int in [0, {len(routed)}] (the routed heads), got {topk!r}")
    if balance is not None and (not isinstance(balance, torch.Tensor) or balance.shape != (*scores.shape[:2], 2)):
        raise ValueError(f"balance: expected a tensor [B, Nq, 2] = {(*scores.shape[:2], 2)}, got "
                         f"{tuple(balance.shape) if isinstance(balance, torch.Tensor) else balance!r}")
    weight = balance.softmax(-1) if balance is not None else scores.new_ones(*scores.shape[:2], 2)
    parts_idx, parts_gate = [], []
    if heads:
        idx = torch.tensor(heads, device=scores.device)
        parts_idx.append(idx.expand(*scores.shape[:2], len(heads)))
        parts_gate.append(scores[..., idx].softmax(-1) * weight[..., :1])
    if topk:
        ridx = torch.tensor(routed, device=scores.device)
        probs = scores[..., ridx].softmax(-1)
        top = probs.detach().topk(topk, dim=-1).indices
        parts_idx.append(ridx[top])
        parts_gate.append(probs.gather(-1, top) * weight[..., 1:])
    if not parts_idx:
        raise ValueError("route_heads: shared=0 and topk=0 choose no head")
    return torch.cat(parts_idx, -1), torch.cat(parts_gate, -1)


def gate_heads(head_indices: torch.Tensor, gates: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Dense gates [B, H, Nq] (0 for unchosen heads) from `route_heads`' indices and gates,
    to weigh an attention output [B, H, Nq, D] head by head."""
    idx = torch.where(head_indices < 0, num_heads, head_indices).long()
    dense = gates.new_zeros(*gates.shape[:2], num_heads + 1).scatter_add(2, idx, gates)
    return dense[..., :num_heads].transpose(1, 2)


__all__ = ["gate_heads", "route_heads"]
