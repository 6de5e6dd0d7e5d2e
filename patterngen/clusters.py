"""Clustered attention (Routing Transformer): pairs chosen by run-time cluster ids.

`cluster(q, k, num_clusters)` assigns queries and keys to shared centroids by spherical
k-means, per batch entry and query head, as the Routing Transformer does.
`packed_clusters` runs the heads that are exactly `Clustered()`: the tokens of each (batch,
head) are sorted by cluster (stably), so that each cluster is a contiguous run of queries and
of keys; every (batch, head, cluster) becomes one packed document with full attention inside,
run through the op's packed-documents path (`cu_seqlens`: kernels on CUDA, one launch of each
kernel), and the sort is undone on the output. Only same-cluster pairs are computed.
Compositions holding `Clustered()` run through `patterngen.runtime`.

Cluster ids are ints >= -1; -1 puts a token in no cluster (its query row is zeros, lse -inf).
"""
from __future__ import annotations

import torch

from .ir import Full, Spec
from .routing.clusters import sorted_documents


def cluster(q: torch.Tensor, k: torch.Tensor, num_clusters: int, iters: int = 10,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_clusters [B, Hq, Nq], kv_clusters [B, Hq, Nkv]) int64: per batch entry and query head,
    queries and keys (the head's kv head under GQA) are normalised and clustered together by
    `iters` rounds of spherical k-means (assign to the closest centroid by cosine, centroid =
    normalised mean of its members; an emptied centroid stays), from `num_clusters` tokens
    seeded farthest-first (the first drawn with `seed`). The Routing Transformer shares
    centroids between queries and keys this way, so a query and the keys near it land in one
    cluster."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k: expected [B, Hq, Nq, D] and [B, Hkv, Nkv, D] with Hkv dividing Hq, got "
                         f"{list(q.shape)} and {list(k.shape)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters: expected an int >= 1, got {num_clusters!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters: expected an int >= 0, got {iters!r}")
    B, H, nq, _ = q.shape
    with torch.no_grad():
        kk = k.repeat_interleave(H // k.shape[1], 1)
        x = torch.nn.functional.normalize(torch.cat([q, kk], 2).float(), dim=-1)  # [B, H, N, D]
        n = x.shape[2]
        if n == 0:
            empty = torch.zeros(B, H, 0, dtype=torch.long, device=q.device)
            return empty, torch.zeros(B, H, k.shape[2], dtype=torch.long, device=q.device)
        # farthest-point seeding: a random token, then each next centroid the token least similar
        # to those chosen (well-separated groups each get one)
        g = torch.Generator().manual_seed(seed)
        first = int(torch.randint(n, (1,), generator=g))
        c = x[:, :, first:first + 1]  # [B, H, 1, D]
        for _ in range(min(num_clusters, n) - 1):
            nearest = (x @ c.transpose(-1, -2)).amax(-1)  # [B, H, N]
            far = nearest.argmin(-1)  # [B, H]
            c = torch.cat([c, x.gather(2, far[..., None, None].expand(B, H, 1, x.shape[-1]))], 2)
        for _ in range(iters):
            assign = (x @ c.transpose(-1, -2)).argmax(-1)  # [B, H, N]
            sums = torch.zeros_like(c).scatter_add_(2, assign[..., None].expand_as(x), x)
            moved = torch.nn.functional.normalize(sums, dim=-1)
            c = torch.where(sums.norm(dim=-1, keepdim=True) > 0, moved, c)
        assign = (x @ c.transpose(-1, -2)).argmax(-1)
    return assign[:, :, :nq], assign[:, :, nq:]


def packed_clusters(cq, ck, q, k, v, spec: Spec, scale: float, attention):
    """(out, lse) of a spec whose every head is exactly Clustered(), through sorted, packed
    documents (`attention`: pg.attention, whose packed path runs them)."""
    B, H, nq, D = q.shape
    g = H // spec.num_kv_heads
    order_q, order_k, docs_q, docs_k = sorted_documents(cq, ck)
    bh = torch.arange(B * H, device=q.device)
    b, h = bh // H, bh % H
    qs = q[b[:, None], h[:, None], order_q.view(B * H, -1)]  # [B*H, Nq, D], each row sorted by cluster
    ks = k[b[:, None], (h // g)[:, None], order_k.view(B * H, -1)]
    vs = v[b[:, None], (h // g)[:, None], order_k.view(B * H, -1)]
    keep_k = torch.where(ck.view(B * H, -1).gather(1, order_k.view(B * H, -1)) >= 0)
    ks, vs = ks[keep_k], vs[keep_k]  # keys in no cluster dropped: [total_k, D]
    cu = [torch.cat([torch.zeros(1, dtype=torch.long, device=q.device), d.cumsum(0)]).to(torch.int32)
          for d in (docs_q, docs_k)]
    free = Spec(Full(), num_heads=1, head_dim=D)
    out, lse = attention(qs.reshape(1, 1, -1, D), ks.reshape(1, 1, -1, D), vs.reshape(1, 1, -1, D), free,
                         scale=scale, return_lse=True, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
    inverse = torch.argsort(order_q.view(B * H, -1), dim=1)
    out = out.view(B * H, nq, D).gather(1, inverse[..., None].expand(B * H, nq, D))
    lse = lse.view(B * H, nq).gather(1, inverse)
    return out.view(B, H, nq, D), lse.view(B, H, nq)


__all__ = ["cluster", "packed_clusters"]
