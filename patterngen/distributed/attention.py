"""Sequence-sharded (context-parallel) attention on torch.distributed (issue 15).

Each rank holds its shard of the queries and keys (`plan`'s layout) and computes the attention
of its queries. It receives only the keys the plan says its q tiles visit, in the plan's
conflict-free rounds, sent as point-to-point operations by a helper thread while the rank
computes its queries against its own keys; then it computes them against the received keys
and merges the two partial results by log-sum-exp. Both parts evaluate the pattern at the
true token indices (`shard_attention`), so the result is the single-process attention's.
Backward: autograd differentiates both parts; the gradients of the received keys go back to
their owners in the same rounds, reversed, and are added to the owners' own.

Before any transfer, every rank checks its inputs and the ranks compare what they were given
(spec, shapes, dtype, scale, layout) in one collective, so bad input on one rank raises a clear
error on every rank instead of leaving the others waiting.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.distributed as dist

from ..api import attention as _attention
from ..backends.reference import check_scale, merge_partials, shard_attention
from ..ir import Band, Causal, Full, Intersection, Spec, Union
from ..registry import spec_key
from ..analysis.shards import DistributedPlan, plan

ROUND_TAG = 1 << 20
"""Tags of the transfers: ROUND_TAG + round (keys), + 2 * ROUND_TAG (values); gradients reuse them."""


@functools.lru_cache(maxsize=32)
def _cached_plan(spec: Spec, world_size: int, layout: str) -> DistributedPlan:
    return plan(spec, world_size, layout=layout)


def _rows(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """long [n]: the row of each token in a tensor holding `tokens` in order (-1: not held)."""
    rows = torch.full((n,), -1, dtype=torch.long)
    rows[tokens] = torch.arange(len(tokens))
    return rows


def _slices(x: torch.Tensor, ranges, rows: torch.Tensor) -> torch.Tensor:
    """x's rows (dim 2) of the tokens in `ranges` (each held whole, in consecutive rows), one
    contiguous tensor (a message)."""
    return torch.cat([x[:, :, int(rows[a]):int(rows[a]) + b - a] for a, b in ranges], 2).contiguous()


def _tokens(ranges) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges])


class _Exchange:
    """This rank's part of the plan's transfers: what it sends and receives in each round."""

    def __init__(self, dp: DistributedPlan, rank: int, group):
        self.dp, self.rank, self.group = dp, rank, group
        self.held = dp.held(rank)
        self.rows = _rows(self.held, dp.spec.nkv)
        self.rounds = [([t for t in rnd if t.src == rank], [t for t in rnd if t.dst == rank]) for rnd in dp.rounds]
        incoming = [t for _, recvs in self.rounds for t in recvs]
        self.received = (_tokens([r for t in incoming for r in t.ranges]) if incoming
                         else torch.zeros(0, dtype=torch.long))
        self.bytes_received = 0

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _run(self, sends, recvs, rounds_order) -> None:
        """Post each round's operations (peer, tensor, 0 for keys or 1 for values), wait for
        them, then the next round."""
        for i in rounds_order:
            ops = [dist.P2POp(dist.isend, t, self.peer(p), self.group, ROUND_TAG * (1 + j) + i) for p, t, j in sends[i]]
            ops += [dist.P2POp(dist.irecv, t, self.peer(p), self.group, ROUND_TAG * (1 + j) + i)
                    for p, t, j in recvs[i]]
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()

    def start(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Begin the forward transfers on a helper thread."""
        B, H, _, D = k.shape
        self.k_parts, self.v_parts = [k.new_empty(B, H, 0, D)], [v.new_empty(B, H, 0, D)]
        sends, recvs = [], []
        for out, inc in self.rounds:
            s, r = [], []
            for t in out:
                s += [(t.dst, _slices(k, t.ranges, self.rows), 0), (t.dst, _slices(v, t.ranges, self.rows), 1)]
            for t in inc:
                kb = k.new_empty(B, H, t.tokens, D)
                vb = v.new_empty(B, H, t.tokens, D)
                self.k_parts.append(kb)
                self.v_parts.append(vb)
                r += [(t.src, kb, 0), (t.src, vb, 1)]
            sends.append(s)
            recvs.append(r)
        self.bytes_received = sum(b.numel() * b.element_size() for b in self.k_parts + self.v_parts)
        self._error = None

        def run():
            try:
                self._run(sends, recvs, range(len(self.rounds)))
            except BaseException as e:  # noqa: BLE001 - re-raised by finish
                self._error = e

        self._thread = threading.Thread(target=run, name="patterngen-exchange", daemon=True)
        self._thread.start()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the forward transfers: the received keys and values [B, Hkv, received, D]."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return torch.cat(self.k_parts, 2), torch.cat(self.v_parts, 2)

    def return_grads(self, gk: torch.Tensor | None, gv: torch.Tensor | None, like: torch.Tensor):
        """Backward: send the received keys' gradients to their owners (the rounds reversed) and
        add the gradients of the keys this rank sent: (dk, dv) of its own keys."""
        B, H, n, D = like.shape
        dk, dv = like.new_zeros(B, H, n, D), like.new_zeros(B, H, n, D)
        sends, recvs, back = [], [], []
        at = 0
        for out, inc in self.rounds:
            s, r = [], []
            for t in inc:  # what this rank received now goes back
                s += [(t.src, gk[:, :, at:at + t.tokens].contiguous(), 0),
                      (t.src, gv[:, :, at:at + t.tokens].contiguous(), 1)]
                at += t.tokens
            for t in out:  # what this rank sent comes back as gradients
                bk, bv = like.new_empty(B, H, t.tokens, D), like.new_empty(B, H, t.tokens, D)
                r += [(t.dst, bk, 0), (t.dst, bv, 1)]
                back.append((t, bk, bv))
            sends.append(s)
            recvs.append(r)
        self._run(sends, recvs, reversed(range(len(self.rounds))))
        for t, bk, bv in back:
            idx = self.rows[_tokens(t.ranges)].to(like.device)
            dk.index_add_(2, idx, bk)
            dv.index_add_(2, idx, bv)
        return dk, dv


class _Received(torch.autograd.Function):
    """The received keys and values [B, Hkv, received, D], as a function of this rank's own k and
    v: the backward sends their gradients to the owners and returns the ones of the keys this
    rank sent (`_Exchange.return_grads`). The forward only waits for the transfers."""

    @staticmethod
    def forward(ctx, k, v, exchange: _Exchange):
        ctx.exchange = exchange
        ctx.save_for_backward(k)
        kr, vr = exchange.finish()
        return kr, vr

    @staticmethod
    def backward(ctx, gk, gv):
        (k,) = ctx.saved_tensors
        dk, dv = ctx.exchange.return_grads(gk, gv, k)
        return dk, dv, None


class _Join(torch.autograd.Function):
    """`out` unchanged, joined to the (empty) received tensors so that the exchange's backward
    runs on a rank that received nothing: it still gets the gradients of the keys it sent."""

    @staticmethod
    def forward(ctx, out, kr, vr):
        ctx.save_for_backward(kr, vr)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        kr, vr = ctx.saved_tensors
        return grad, torch.zeros_like(kr), torch.zeros_like(vr)


def _describe(q, k, v, spec, scale, layout) -> tuple:
    """What the ranks must agree on (compared), and the spec's repr (for the message)."""
    return (spec_key(spec), tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), scale, layout), repr(spec)


def _local_error(q, k, v, spec, world: int, layout: str, scale) -> str | None:
    """Why this rank's inputs are bad, or None; never raises (the ranks must agree first)."""
    try:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
        check_scale(scale, spec.head_dim)
        _cached_plan(spec, world, layout)  # raises on what the plan refuses (a grid that does not divide)
        B = q.shape[0] if q.dim() == 4 else None
        for name, t, heads, n in (("q", q, spec.num_heads, spec.nq), ("k", k, spec.num_kv_heads, spec.nkv),
                                  ("v", v, spec.num_kv_heads, spec.nkv)):
            want = (B, heads, n // world, spec.head_dim)
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(f"{name}: expected this rank's shard [B, H, N / world_size, D] = {list(want)} "
                                 f"({n} tokens over {world} ranks, {layout} layout), got {list(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
            raise ValueError(f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
        return None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
        return f"{type(e).__name__}: {e}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, group=None, *,
              scale: float | None = None, layout: str = "contiguous", stats: dict | None = None) -> torch.Tensor:
    """This rank's output [B, Hq, N / world_size, D] of `spec`'s attention over the sequence
    sharded across the ranks of `group` (default: the world): q [B, Hq, Nq / world, D] and k, v
    [B, Hkv, Nkv / world, D] hold this rank's tokens of `pg.distributed.plan(spec, world,
    layout=layout)` (contiguous: the r-th equal chunk of the flattened sequence, a slab along
    the first dimension of a grid; zigzag: chunks r and 2 * world - 1 - r of 2 * world, in
    that order). Equal to the single-process `pg.attention` on the gathered tensors, exactly in
    float64. Differentiable in q, k and v: every rank must call backward (the kv gradients go
    back to their owners). `stats`, if a dict, receives this rank's received tokens and bytes
    and the number of rounds.

    Where the pattern depends on key - query alone (Causal, Band, Full and their compositions)
    and a rank receives one run of keys just before its own (causal windows and causal
    attention, contiguous layout), its attention is one call of `pg.attention` on [received;
    own] keys (the generated kernels on CUDA), after the transfers. Otherwise it runs the
    exact reference computation along the tile plan (torch ops, on any device), its own keys
    while the transfers run.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("pg.distributed.attention: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    error = _local_error(q, k, v, spec, world, layout, scale)
    views = [None] * world
    dist.all_gather_object(views, (error, _describe(q, k, v, spec, scale, layout) if error is None else None),
                           group=group)
    bad = [(r, e) for r, (e, _) in enumerate(views) if e is not None]
    if bad:
        raise ValueError("pg.distributed.attention: bad input on " + "; ".join(f"rank {r}: {e}" for r, e in bad))
    if len({d for _, (d, _) in views}) > 1:
        lines = "; ".join(f"rank {r}: {text}, q {list(d[1])}, k {list(d[2])}, dtype {d[4]}, scale {d[5]}, "
                          f"layout {d[6]}" for r, (_, (d, text)) in enumerate(views))
        raise ValueError(f"pg.distributed.attention: the ranks were given different calls ({lines}); every rank "
                         f"must pass the same spec, scale and layout, and shards of one shape")
    dp = _cached_plan(spec, world, layout)
    exchange = _Exchange(dp, rank, group)
    exchange.start(k.detach(), v.detach())
    if _left_halo(dp, rank, exchange):
        # one call of the op on [received keys; own keys]: its bottom-right alignment puts this
        # rank's first query right after the received keys, where it is in the whole sequence
        kr, vr = _Received.apply(k, v, exchange)
        order = torch.argsort(exchange.received).to(k.device)  # the runs arrive in round order
        kr, vr = kr[:, :, order], vr[:, :, order]
        free = Spec(spec.pattern, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
        out = _attention(q, torch.cat([kr, k], 2), torch.cat([vr, v], 2), free, scale)
        path = "op"
    else:
        q_rows = _rows(dp.held(rank, "q"), spec.nq)
        tiles = dp.q_tiles(rank)
        own = shard_attention(q, k, v, spec, dp.tile_plan, tiles, q_rows, exchange.rows, scale)
        kr, vr = _Received.apply(k, v, exchange)
        if kr.shape[2]:
            out, _ = merge_partials([own, shard_attention(q, kr, vr, spec, dp.tile_plan, tiles, q_rows,
                                                  _rows(exchange.received, spec.nkv), scale)])
        else:  # nothing received: the exchange's node stays in the graph, for the keys this rank sent
            out = _Join.apply(own[0], kr, vr)
        path = "reference"
    if stats is not None:
        stats.update(received_tokens=len(exchange.received), received_bytes=exchange.bytes_received,
                     rounds=len(exchange.rounds), path=path)
    return out


SHIFT_INVARIANT = (Causal, Band, Full, Union, Intersection)
"""Nodes whose visibility depends on key - query alone (with the bottom-right alignment)."""


def _left_halo(dp: DistributedPlan, rank: int, exchange: _Exchange) -> bool:
    """Whether this rank's attention is the op's on [received; own] keys: a 1-D pattern that
    depends on key - query alone, queries and keys sharded alike, and the received keys one run
    ending where this rank's own keys begin (causal windows, causal attention)."""
    spec = dp.spec
    if dp.layout != "contiguous" or spec.ndim != 1 or spec.nq != spec.nkv:
        return False
    if not all(isinstance(n, SHIFT_INVARIANT) for p in spec.head_patterns.unique for n in p.walk()):
        return False
    got = exchange.received.sort().values
    return len(got) == 0 or (int(got[-1]) == dp.kv_shards[rank][0][0] - 1 and bool((got.diff() == 1).all()))


__all__ = ["attention"]
