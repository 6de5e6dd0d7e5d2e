"""Calls made of independent pieces: packed documents (`cu_seqlens_q`/`cu_seqlens_k`), valid key
lengths (`kv_lens`), and paged KV caches (`block_table`).

Each piece, a `Segment`, is a plain call of the (length-free, 1-D) spec on views of the tensors:
the rows q[b, :, q0:q1] against the keys k[b, :, k0:k1], positions counted from the piece's
start, queries aligned bottom-right to its keys. The op runs every piece on the backend
`dispatch` picks for it (a length-free spec's kernels take any lengths, so nothing is
recompiled) and writes the results in place: no tile spans two documents, and no key past an
entry's length is read. A closed-form forward takes all pieces in one launch (the op's
`_one_launch`, the kernel's VARLEN), and so do the backward kernels where the dQ walk is in
closed form (`_one_launch_backward`); other walks run a launch per piece, which gives every
walk exactly. The lengths are read on the host (one sync a call), except by the
one-launch forward of `kv_lens` on contiguous keys (`length_segments`: decoding steps).

A paged cache is gathered into contiguous [B, Hkv, pages * page_size, D] keys and values first
(`gather_pages`); its gradient goes back to the pages (`scatter_pages`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Batch entry b's queries [q0, q1) against its keys [k0, k1)."""

    b: int
    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def row(self) -> tuple[int, int, int, int, int]:
        """(b, q0, q1, k0, k1): the piece's row of the kernels' SEGS table."""
        return self.b, self.q0, self.q1, self.k0, self.k1

    @property
    def empty(self) -> bool:
        """No (query, key) pair: zeros, lse -inf (or the sink), no gradient."""
        return self.q1 == self.q0 or self.k1 == self.k0

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        """The piece's rows of a [B, H, Nq, ...] tensor (q, out, dout, lse, dlse, dq)."""
        return t[self.b:self.b + 1, :, self.q0:self.q1]

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """The piece's keys of a [B, Hkv, Nkv, D] tensor (k, v, dk, dv)."""
        return t[self.b:self.b + 1, :, self.k0:self.k1]

    def heads(self, head_indices: torch.Tensor | None) -> torch.Tensor | None:
        """The piece's rows of head indices [B, Nq, k]."""
        return None if head_indices is None else head_indices[self.b:self.b + 1, self.q0:self.q1]


def _host(name: str, t: torch.Tensor) -> list[int]:
    values = t.tolist()  # one device sync: the pieces are launched from the host
    if any(x < 0 for x in values):
        raise ValueError(f"{name}: values must be >= 0, got {values}")
    return values


def segments(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
             kv_lens: torch.Tensor | None, kv_offsets: torch.Tensor | None = None) -> list[Segment]:
    """The pieces of a call, with its length tensors checked against the tensors (shapes and
    dtypes were checked by `backends.inputs.check_segments`)."""
    if cu_seqlens_q is not None:
        cq, ck = _host("cu_seqlens_q", cu_seqlens_q), _host("cu_seqlens_k", cu_seqlens_k)
        for name, cu, total, who in (("cu_seqlens_q", cq, q.shape[2], "q"), ("cu_seqlens_k", ck, k.shape[2], "k")):
            if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] != total:
                raise ValueError(f"{name}: expected cumulative lengths rising from 0 to {who}'s {total} tokens "
                                 f"(FlashAttention's convention), got {cu}")
        return [Segment(0, cq[d], cq[d + 1], ck[d], ck[d + 1]) for d in range(len(cq) - 1)]
    lens = _host("kv_lens", kv_lens)
    starts = [0] * len(lens) if kv_offsets is None else _host("kv_offsets", kv_offsets)
    if any(s + n > k.shape[2] for s, n in zip(starts, lens)):
        what = "kv_lens" if kv_offsets is None else "kv_offsets + kv_lens"
        raise ValueError(f"{what}: values must be <= the {k.shape[2]} keys of k, got "
                         f"{[s + n for s, n in zip(starts, lens)]}")
    return [Segment(b, 0, q.shape[2], s, s + n) for b, (s, n) in enumerate(zip(starts, lens))]


def length_segments(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor,
                    kv_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """SEGS int32 [B, 5] (batch entry, q0, q1, k0, k1) of a `kv_lens` call for the one-launch
    kernel, built where the lengths live, with no read on the host: a decoding step stays
    asynchronous (and capturable in a CUDA graph). The values are still checked: on the host
    where they live there (the same errors as `segments`), else by a device-side assertion,
    which fails the stream (torch._assert_async) rather than let a kernel read past the keys."""
    if kv_lens.device.type == "cpu":
        segments(q, k, None, None, kv_lens, kv_offsets)  # free on the host: its clear errors
    lens = kv_lens.long()
    starts = torch.zeros_like(lens) if kv_offsets is None else kv_offsets.long()
    if kv_lens.device.type != "cpu":
        torch._assert_async(((lens >= 0) & (starts >= 0) & (starts + lens <= k.shape[2])).all(),
                            "kv_lens, kv_offsets: values must be >= 0 with kv_offsets + kv_lens <= the keys of k")
    b = torch.arange(len(lens), device=lens.device)
    segs = torch.stack([b, torch.zeros_like(b), torch.full_like(b, q.shape[2]), starts, starts + lens], 1)
    return segs.to(torch.int32)


def _used_pages(block_table: torch.Tensor, kv_lens: torch.Tensor, page: int) -> torch.Tensor:
    """bool [B, max_pages]: the table entries that hold some of entry b's first kv_lens[b] keys."""
    return torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page < kv_lens[:, None]


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, max_pages * page_size, D] keys (or values) of a paged cache [pages, Hkv,
    page_size, D]: batch entry b's page i is cache[block_table[b, i]]. Only the pages that hold
    its first kv_lens[b] keys are read (and checked to lie in the cache); the others are left
    zero."""
    pages, hkv, page, d = cache.shape
    B, width = block_table.shape
    used = _used_pages(block_table, kv_lens, page)
    table = block_table.long()
    bad = used & ((table < 0) | (table >= pages))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table: entry [{b}, {i}] = {int(table[b, i])} points outside the cache's {pages} "
                         f"pages (kv_lens[{b}] = {int(kv_lens[b])} keys use {-(-int(kv_lens[b]) // page)} pages)")
    out = cache[torch.where(used, table, 0)] * used[..., None, None, None].to(cache.dtype)  # [B, width, Hkv, page, D]
    return out.transpose(1, 2).reshape(B, hkv, width * page, d)


def scatter_pages(grad: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                  kv_lens: torch.Tensor) -> torch.Tensor:
    """The gradient of `gather_pages`: grad [B, Hkv, max_pages * page_size, D] summed into the
    pages it was read from (a page shared by several entries gets each one's part)."""
    pages, hkv, page, d = cache.shape
    B, width = block_table.shape
    used = _used_pages(block_table, kv_lens, page).flatten()
    parts = grad.reshape(B, hkv, width, page, d).transpose(1, 2).reshape(B * width, hkv, page, d)
    out = torch.zeros_like(cache)
    return out.index_add_(0, block_table.long().flatten()[used], parts[used].to(cache.dtype))
