"""Run-time clusters (`Clustered`): the documents a clustered call is sorted into."""
from __future__ import annotations

import torch

from ..ir import Spec


def check_clusters(q_clusters, kv_clusters, spec: Spec, batch: int, nq: int, nkv: int, device) -> tuple:
    """The cluster ids as int64 [B, Hq, N] on `device` (kv ids given per kv head are spread to
    their query heads), or a ValueError naming the argument."""
    if (q_clusters is None) != (kv_clusters is None):
        raise ValueError("q_clusters, kv_clusters: give both (cluster ids of the queries and of the keys)")
    if q_clusters is None:
        raise ValueError(f"q_clusters, kv_clusters: {spec!r} holds Clustered(), so each call needs the cluster ids "
                         f"(see pg.cluster)")
    if not spec.clustered:
        raise ValueError(f"q_clusters, kv_clusters: {spec!r} holds no Clustered() node to use them")
    B, H = batch, spec.num_heads
    out = []
    for name, ids, n, heads in (("q_clusters", q_clusters, nq, (H,)),
                                ("kv_clusters", kv_clusters, nkv, tuple(dict.fromkeys((H, spec.num_kv_heads))))):
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got "
                             f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.dim() != 3 or ids.shape[0] != B or ids.shape[1] not in heads or ids.shape[2] != n:
            want = " or ".join(f"[{B}, {h}, {n}]" for h in heads)
            raise ValueError(f"{name}: expected shape {want}, got {list(ids.shape)}")
        if ids.numel() and int(ids.min()) < -1:
            raise ValueError(f"{name}: ids are >= 0, or -1 for no cluster; got {int(ids.min())}")
        ids = ids.to(device, torch.long)
        if ids.shape[1] != H:
            ids = ids.repeat_interleave(H // ids.shape[1], 1)
        out.append(ids)
    return tuple(out)


def sorted_documents(cq: torch.Tensor, ck: torch.Tensor):
    """Per (batch, head) the stable sort of tokens by cluster (-1 last), and the packed
    documents: one per (batch, head, cluster) with its query and key counts (keys in no
    cluster dropped, queries in none get a document with no keys)."""
    B, H, _ = cq.shape
    big = int(max(cq.max() if cq.numel() else 0, ck.max() if ck.numel() else 0)) + 1  # id of "no cluster"
    keyq = torch.where(cq < 0, big, cq)
    keyk = torch.where(ck < 0, big, ck)
    order_q = torch.sort(keyq, dim=-1, stable=True).indices
    order_k = torch.sort(keyk, dim=-1, stable=True).indices
    nq = torch.zeros(B, H, big + 1, dtype=torch.long, device=cq.device).scatter_add_(2, keyq, torch.ones_like(keyq))
    nk = torch.zeros(B, H, big + 1, dtype=torch.long, device=ck.device).scatter_add_(2, keyk, torch.ones_like(keyk))
    nk[..., big] = 0  # keys in no cluster: never seen
    return order_q, order_k, nq.flatten(), nk.flatten()


__all__ = ["check_clusters", "sorted_documents"]
