"""Packed documents (cu_seqlens_q/k), valid key lengths (kv_lens) and paged KV caches (block_table),
issue 14 items 1-3. Oracle: the dense attention of every piece on its own (tests.helpers.
oracle_attention on the piece's tensors, positions from its start), forward and gradients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as the other kernel tests

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import dispatch, segments
from tests.helpers import oracle_attention
from tests.strategies import scaled

PATTERNS = [pg.Causal(), (pg.Sink(2) | pg.Band(5)) & pg.Causal(), pg.Band(3, 4), pg.Full(),
            pg.Heads([pg.Causal(), pg.Sink(3) & pg.Causal()])]
D = 8


def piece_oracle(q, k, v, spec, pieces, **mods):
    """(out, lse) of every piece (b, q0, q1, k0, k1) by the dense oracle, written into full-size
    tensors: float64, differentiable in q, k, v (and the sinks)."""
    outs, lses = torch.zeros(q.shape, dtype=torch.float64), torch.full(q.shape[:3], float("-inf"),
                                                                      dtype=torch.float64)
    outs, lses = list(outs.unbind(0)), list(lses.unbind(0))
    rows = {}
    for b, q0, q1, k0, k1 in pieces:
        if q1 > q0 and k1 > k0:
            o, l = oracle_attention(q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1],
                                    spec.bind(q1 - q0, k1 - k0), **mods)
        else:
            o = torch.zeros(1, q.shape[1], q1 - q0, D, dtype=torch.float64)
            l = torch.full((1, q.shape[1], q1 - q0), float("-inf"), dtype=torch.float64)
            if mods.get("sinks") is not None:
                l = l.clone().copy_(mods["sinks"][None, :, None].expand_as(l))
        rows.setdefault(b, []).append((q0, o[0], l[0]))
    for b, parts in rows.items():
        parts.sort(key=lambda p: p[0])
        outs[b] = torch.cat([p[1] for p in parts], 1)
        lses[b] = torch.cat([p[2] for p in parts], 1)
    return torch.stack(outs), torch.stack(lses)


def compare(run, q, k, v, spec, pieces, tol, sinks=False, seed=0, **mods):
    """run(q, k, v, sinks) -> (out, lse) equals `piece_oracle`, with the gradients of a random
    loss of out and lse's finite rows (a loss on lse sends the backward to the reference)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(spec.num_heads, generator=g, dtype=torch.float64) * 2).to(q.dtype).requires_grad_() \
        if sinks else None
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_s = None if s is None else s.detach().double().requires_grad_()
    out, lse = run(q, k, v, s)
    want_out, want_lse = piece_oracle(*ref, spec, pieces, sinks=ref_s, **mods)
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    leaves, ref_leaves = [q, k, v] + ([s] if sinks else []), ref + ([ref_s] if sinks else [])
    got = torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves)
    anchor = sum(t.sum() for t in ref_leaves) * 0  # every piece may be empty: the loss still has a graph
    want = torch.autograd.grad((want_out * w).sum() + anchor, ref_leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def tensors(batch, hq, hkv, nq, nkv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in ((batch, hq, nq, D), (batch, hkv, nkv, D), (batch, hkv, nkv, D))]


def cumulative(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@settings(max_examples=scaled(20), deadline=None)
@given(st.sampled_from(PATTERNS), st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=5),
       st.sampled_from([(2, 1), (2, 2)]), st.booleans(), st.one_of(st.none(), st.floats(1.0, 10.0)),
       st.integers(0, 2**16))
def test_packed_documents(pattern, docs, heads, sinks, softcap, seed):
    """Documents of random lengths (empty ones too, and more queries than keys) packed along the
    tokens equal each document on its own."""
    spec = pg.Spec(pattern, num_heads=heads[0], num_kv_heads=heads[1], head_dim=D)
    cq, ck = cumulative([d[0] for d in docs]), cumulative([d[1] for d in docs])
    q, k, v = tensors(1, *heads, int(cq[-1]), int(ck[-1]), seed=seed)
    pieces = [(0, int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])) for i in range(len(docs))]
    compare(lambda q, k, v, s: pg.attention(q, k, v, spec, return_lse=True, sinks=s, softcap=softcap,
                                            cu_seqlens_q=cq, cu_seqlens_k=ck), q, k, v, spec, pieces, 1e-9,
            sinks, seed, softcap=softcap)


@settings(max_examples=scaled(20), deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 12),
       st.lists(st.tuples(st.integers(0, 24), st.integers(0, 24)), min_size=1, max_size=3), st.booleans(),
       st.booleans(), st.integers(0, 2**16))
def test_kv_lens(pattern, nq, ranges, offsets, alibi, seed):
    """Entry b keeps its first kv_lens[b] keys (from kv_offsets[b] when given: left padding), its
    queries aligned to the last of them; other keys get no gradient and never change the result."""
    spec = pg.Spec(pattern, num_heads=2, num_kv_heads=1, head_dim=D)
    q, k, v = tensors(len(ranges), 2, 1, nq, 24, seed=seed)
    starts = [min(a, b) if offsets else 0 for a, b in ranges]
    lens = [abs(b - a) if offsets else b for a, b in ranges]
    L, S = torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32) if offsets else None
    slopes = torch.tensor([0.3, 0.1], dtype=torch.float64) if alibi else None
    pieces = [(b, 0, nq, s, s + n) for b, (s, n) in enumerate(zip(starts, lens))]
    compare(lambda q, k, v, s: pg.attention(q, k, v, spec, return_lse=True, kv_lens=L, kv_offsets=S,
                                            alibi_slopes=slopes), q, k, v, spec, pieces, 1e-9, slopes=slopes)


@settings(max_examples=scaled(15), deadline=None)
@given(st.integers(1, 3), st.sampled_from([4, 8]), st.integers(1, 6), st.integers(0, 2**16))
def test_paged_cache(batch, page, nq, seed):
    """A paged cache (pages shuffled, one page shared by two entries) equals the contiguous keys
    with kv_lens, forward and gradients (a shared page gets both entries' parts)."""
    g = torch.Generator().manual_seed(seed)
    spec = pg.Spec((pg.Sink(2) | pg.Band(6)) & pg.Causal(), num_heads=2, num_kv_heads=1, head_dim=D)
    lens = torch.randint(0, 4 * page + 1, (batch,), generator=g).to(torch.int32)
    width = 4
    pages = batch * width + 1
    perm = torch.randperm(pages, generator=g)
    table = perm[:batch * width].view(batch, width).to(torch.int32)
    if batch > 1:
        table[1, 0] = table[0, 0]  # a shared prefix page
        lens[1] = max(int(lens[1]), 1)
        lens[0] = max(int(lens[0]), 1)
    table = torch.where(torch.arange(width)[None, :] * page < lens[:, None], table, -1).to(torch.int32)  # unused: -1
    q = torch.randn(batch, 2, nq, D, generator=g, dtype=torch.float64, requires_grad=True)
    kc, vc = (torch.randn(pages, 1, page, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = pg.attention(q, kc, vc, spec, return_lse=True, kv_lens=lens, block_table=table)
    # the same keys laid out contiguously, by hand
    k, v = (torch.cat([c[t.clamp_min(0).long()] for t in table]).view(batch, width, 1, page, D)
            .transpose(1, 2).reshape(batch, 1, width * page, D) for c in (kc, vc))
    want_out, want_lse = pg.attention(q, k, v, spec, return_lse=True, kv_lens=lens)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (q, kc, vc))
    want = torch.autograd.grad((want_out * w).sum(), (q, kc, vc))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("walk", ["closed_form", "table"])
@pytest.mark.parametrize("what", ["packed", "kv_lens", "paged"])
def test_triton_kernels(what, walk):
    """The generated kernels run every piece (interpreter, float32), forward and backward: a
    closed-form walk all pieces in one launch (`VARLEN`) of the forward and of each backward
    kernel, a table walk one launch per piece."""
    pytest.importorskip("triton")
    pattern = (pg.Sink(3) | pg.Band(20)) & pg.Causal() if walk == "closed_form" else \
        pg.Strided(5, 2) | (pg.Band(9) & pg.Causal())
    spec = pg.Spec(pattern, num_heads=4, num_kv_heads=2, head_dim=16)
    fn = pg.compile(spec, backend="triton", tiling=pg.Tiling(16, 16))
    global D
    D, saved = 16, D
    try:
        if what == "packed":
            lens = [(40, 40), (0, 0), (17, 33), (1, 50)]
            cq, ck = cumulative([a for a, _ in lens]), cumulative([b for _, b in lens])
            q, k, v = tensors(1, 4, 2, int(cq[-1]), int(ck[-1]), torch.float32)
            pieces = [(0, int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])) for i in range(len(lens))]
            kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck)
        else:
            q, k, v = tensors(3, 4, 2, 20, 48, torch.float32)
            L = torch.tensor([48, 0, 31], dtype=torch.int32)
            pieces = [(b, 0, 20, 0, int(n)) for b, n in enumerate(L)]
            kw = dict(kv_lens=L)
            if what == "paged":
                table = torch.tensor([[5, 1, 3], [0, 0, 0], [2, 4, -1]], dtype=torch.int32)
                kc, vc = (torch.zeros(6, 2, 16, 16) for _ in range(2))
                for b, row in enumerate(table.tolist()):
                    for i, page in enumerate(row):
                        if page >= 0 and b != 1:
                            kc[page], vc[page] = k[b, :, 16 * i:16 * i + 16].detach(), v[b, :, 16 * i:16 * i + 16].detach()
                kw["block_table"] = table
        before = dispatch.calls.copy()
        with dispatch.kernels_on_cpu():
            if what == "paged":
                out, lse = fn(q, kc, vc, return_lse=True, **kw)
                want_out, want_lse = piece_oracle(q.detach().double(), k.detach().double(), v.detach().double(), spec,
                                                  pieces)
                torch.testing.assert_close(out.double(), want_out, atol=3e-4, rtol=3e-4)
                torch.testing.assert_close(lse.double(), want_lse, atol=3e-4, rtol=3e-4)
                out.sum().backward()
            else:
                compare(lambda q, k, v, s: fn(q, k, v, return_lse=True, **kw), q, k, v, spec, pieces, 3e-4)
        ran = dispatch.calls - before
        nonempty = sum(1 for _, q0, q1, k0, k1 in pieces if q1 > q0 and k1 > k0)
        launches = 1 if walk == "closed_form" else nonempty  # closed form: every piece in one launch each way
        assert ran[("forward", "triton")] == launches and ran[("backward", "triton")] == launches, ran
    finally:
        D = saved


def test_compiles_without_graph_breaks():
    spec = pg.Spec(pg.Causal(), num_heads=2, head_dim=D)
    q, k, v = tensors(1, 2, 2, 12, 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    fn = torch.compile(lambda q, k, v, cu: pg.attention(q, k, v, spec, cu_seqlens_q=cu, cu_seqlens_k=cu),
                       fullgraph=True, backend="eager")
    got = fn(q, k, v, cu)
    torch.testing.assert_close(got, pg.attention(q, k, v, spec, cu_seqlens_q=cu, cu_seqlens_k=cu))
    got.sum().backward()
    assert q.grad is not None


FREE = pg.Spec(pg.Causal(), num_heads=2, head_dim=D)
I32 = torch.int32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=I32)), ValueError, "packed documents need both"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 8]), cu_seqlens_k=torch.tensor([0, 4, 8])), TypeError,
     "cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 7], dtype=I32), cu_seqlens_k=torch.tensor([0, 4, 8], dtype=I32)),
     ValueError, "cu_seqlens_q: expected cumulative lengths rising from 0 to q's 8"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 8], dtype=I32), cu_seqlens_k=torch.tensor([0, 4, 4, 8], dtype=I32)),
     ValueError, "cu_seqlens_q: values must be >= 0|cu_seqlens_q: expected cumulative"),
    (dict(cu_seqlens_q=torch.tensor([0, 8], dtype=I32), cu_seqlens_k=torch.tensor([0, 4, 8], dtype=I32)),
     ValueError, "the same number"),
    (dict(kv_lens=torch.tensor([9], dtype=I32)), ValueError, "kv_lens: values must be <= the 8 keys"),
    (dict(kv_lens=torch.tensor([-1], dtype=I32)), ValueError, "kv_lens: values must be >= 0"),
    (dict(kv_lens=torch.tensor([4, 4], dtype=I32)), ValueError, "kv_lens: expected one row per batch"),
    (dict(kv_lens=torch.tensor([4], dtype=I32), kv_offsets=torch.tensor([5], dtype=I32)), ValueError,
     "kv_offsets \\+ kv_lens: values must be <= the 8 keys"),
    (dict(kv_offsets=torch.tensor([5], dtype=I32)), ValueError, "kv_offsets: needs kv_lens"),
    (dict(kv_lens=[4]), TypeError, "kv_lens: expected an int32 tensor"),
    (dict(block_table=torch.zeros(1, 2, dtype=I32)), ValueError, "block_table: a paged cache needs kv_lens"),
    (dict(kv_lens=torch.tensor([4], dtype=I32), cu_seqlens_q=torch.tensor([0, 8], dtype=I32),
          cu_seqlens_k=torch.tensor([0, 8], dtype=I32)), ValueError, "kv_lens: not taken together"),
])
def test_bad_inputs(kwargs, error, match):
    q = torch.randn(1, 2, 8, D)
    with pytest.raises(error, match=match):
        pg.attention(q, q, q, FREE, **kwargs)


def test_bad_specs_and_pages():
    q = torch.randn(1, 2, 8, D)
    with pytest.raises(ValueError, match="kv_lens: the spec applies to pieces of different lengths"):
        pg.attention(q, q, q, pg.Spec(pg.Causal(), 8, num_heads=2, head_dim=D), kv_lens=torch.tensor([4], dtype=I32))
    with pytest.raises(ValueError, match="packed documents come as one batch entry"):
        q2 = torch.randn(2, 2, 8, D)
        cu = torch.tensor([0, 8], dtype=I32)
        pg.attention(q2, q2, q2, FREE, cu_seqlens_q=cu, cu_seqlens_k=cu)
    cache = torch.randn(3, 2, 4, D)
    with pytest.raises(ValueError, match=r"block_table: entry \[0, 1\] = 3 points outside the cache's 3 pages"):
        pg.attention(q[:, :, :1], cache, cache, FREE, kv_lens=torch.tensor([6], dtype=I32),
                     block_table=torch.tensor([[0, 3, 7]], dtype=I32))


def test_key_lengths_are_not_read_on_the_host():
    """The one-launch forward's pieces of a kv_lens call are built where the lengths live: on meta
    tensors (which no host read survives) as on the CPU, equal to `segments`' pieces there."""
    q, k = torch.empty(3, 4, 5, 16, device="meta"), torch.empty(3, 2, 48, 16, device="meta")
    lens = torch.empty(3, dtype=torch.int32, device="meta")
    assert segments.length_segments(q, k, lens, lens).shape == (3, 5)
    q, k = torch.zeros(3, 4, 5, 16), torch.zeros(3, 2, 48, 16)
    lens, starts = torch.tensor([48, 0, 31], dtype=I32), torch.tensor([0, 7, 17], dtype=I32)
    want = [[s.b, s.q0, s.q1, s.k0, s.k1] for s in segments.segments(q, k, None, None, lens, starts)]
    assert segments.length_segments(q, k, lens, starts).tolist() == want
    with pytest.raises(ValueError, match="kv_offsets \\+ kv_lens: values must be <= the 48 keys"):
        segments.length_segments(q, k, lens, starts + 1)


@pytest.fixture(scope="module")
def one_launch():
    """A closed-form spec's kernels (GQA, sinks in a band, causal), built once for the draws below."""
    pytest.importorskip("triton")
    spec = pg.Spec((pg.Sink(3) | pg.Band(20)) & pg.Causal(), num_heads=4, num_kv_heads=2, head_dim=16)
    return spec, pg.compile(spec, backend="triton", tiling=pg.Tiling(16, 32))


@pytest.mark.interpreter
@settings(max_examples=scaled(8), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=5), st.booleans(),
       st.integers(0, 2**16))
def test_one_launch_backward_of_random_documents(one_launch, lengths, sinks, seed):
    """Packed documents of random lengths (empty ones, more queries than keys and fewer): the
    forward and each backward kernel run once for all of them, equal to the oracle per piece,
    gradients included (keys and rows outside every piece get zeros)."""
    spec, fn = one_launch
    global D
    D, saved = 16, D
    try:
        cq, ck = cumulative([a for a, _ in lengths]), cumulative([b for _, b in lengths])
        q, k, v = tensors(1, 4, 2, int(cq[-1]), int(ck[-1]), torch.float32, seed)
        pieces = [(0, int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])) for i in range(len(lengths))]
        before = dispatch.calls.copy()
        with dispatch.kernels_on_cpu():
            compare(lambda q, k, v, s: fn(q, k, v, return_lse=True, sinks=s, cu_seqlens_q=cq, cu_seqlens_k=ck),
                    q, k, v, spec, pieces, 3e-4, sinks=sinks, seed=seed)
        ran = dispatch.calls - before
        if q.shape[2] and k.shape[2]:
            assert ran[("forward", "triton")] == 1 and ran[("backward", "triton")] == 1, ran
    finally:
        D = saved
