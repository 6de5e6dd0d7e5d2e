"""`pg.Clustered()` (issue 16 item 4): query i sees key j iff their run-time cluster ids are
equal (-1: in no cluster). Oracle: softmax over the cluster-equality mask (and the rest of
the pattern, from the element-wise semantics), in float64; the kernels' packed path under the
interpreter."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import dispatch
from patterngen.routing.clusters import sorted_documents
from patterngen.dispatch import compile_options
from tests.strategies import scaled


def oracle(q, k, v, spec: pg.Spec, cq, ck):
    """float64 attention over pg.dense_mask(spec, clusters=...) per batch entry; empty rows 0."""
    g = spec.num_heads // spec.num_kv_heads
    outs = []
    for b in range(q.shape[0]):
        mask = pg.dense_mask(spec, clusters=(cq[b], ck[b]))
        kk, vv = (t[b].double().repeat_interleave(g, 0) for t in (k, v))
        s = (q[b].double() @ kk.transpose(-1, -2) / spec.head_dim ** 0.5).masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(s, -1).nan_to_num(0.0) @ vv)
    return torch.stack(outs)


def check_gradients(out, want, inputs, g):
    """The gradients of a random float64 loss of `out` equal those through `want` (an input
    that `want` does not depend on gets none or zeros)."""
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    ref = torch.autograd.grad(want, inputs, dout, allow_unused=True)
    for a, b in zip(got, ref):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, atol=1e-10, rtol=0)


def run_on_kernels(spec: pg.Spec, q, k, v, cq, ck):
    """(out, {role: launches}) of pg.attention on the Triton backend (the interpreter here),
    forward and backward of out.sum()."""
    before = dispatch.calls.copy()
    out = pg.attention(q, k, v, spec, q_clusters=cq, kv_clusters=ck, _options=compile_options("triton", None))
    out.sum().backward()
    return out, {role: dispatch.calls[role, "triton"] - before[role, "triton"] for role in ("forward", "backward")}


def draw_ids(draw, shape, clusters: int) -> torch.Tensor:
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(-1, clusters, shape, generator=torch.Generator().manual_seed(seed))
    return ids


PATTERNS = [lambda H: pg.Clustered(), lambda H: pg.Clustered() & pg.Causal(), lambda H: pg.Clustered() | pg.Band(3),
            lambda H: pg.Heads([pg.Clustered() if h % 2 else (pg.Clustered() | pg.Sink(2)) & pg.Causal()
                                for h in range(H)])]


@settings(max_examples=scaled(25), deadline=None)
@given(st.integers(1, 2), st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(0, 30), st.integers(0, 30),
       st.integers(1, 6), st.sampled_from(range(len(PATTERNS))), st.booleans(), st.data())
def test_forward_and_gradients_against_the_mask(B, heads, nq, nkv, clusters, which, kv_per_kv_head, data):
    """Every call form: pure Clustered (sorted, packed documents) and compositions (patterngen.runtime),
    GQA with kv ids per query head or per kv head, -1 ids, empty sides."""
    H, Hkv = heads
    spec = pg.Spec(PATTERNS[which](H), num_heads=H, num_kv_heads=Hkv, head_dim=8)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(B, H, nq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, nkv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cq = draw_ids(data.draw, (B, H, nq), clusters)
    ck = draw_ids(data.draw, (B, Hkv if kv_per_kv_head else H, nkv), clusters)
    out = pg.attention(q, k, v, spec, q_clusters=cq, kv_clusters=ck)
    ck_heads = ck.repeat_interleave(H // Hkv, 1) if kv_per_kv_head else ck
    bound = spec.bind(nq, nkv)
    want = oracle(q, k, v, bound, cq, ck_heads)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    if not out.requires_grad:  # no pair at all: nothing flows back
        assert nq * nkv == 0 or not want.any()
        return
    check_gradients(out, want, (q, k, v), g)


def test_packed_path_computes_only_same_cluster_pairs():
    """The sorted documents' query x key products sum to the same-cluster pairs, not Nq x Nkv."""
    cq = torch.tensor([[[0, 1, 1, -1, 2, 0]]])
    ck = torch.tensor([[[1, 1, 0, 2, -1, 3, 1]]])
    _, _, docs_q, docs_k = sorted_documents(cq, ck)
    same = (cq[0, 0, :, None] == ck[0, 0, None, :]) & (cq[0, 0, :, None] >= 0)
    assert int((docs_q * docs_k).sum()) == int(same.sum()) == 2 * 1 + 2 * 3 + 1 * 1


def test_kernels_run_the_packed_documents():
    """With the Triton backend (the interpreter here), a pure Clustered spec runs as one packed
    launch of the generated forward kernel and one of each backward kernel, equal to the oracle."""
    spec = pg.Spec(pg.Clustered(), num_heads=2, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 40, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 33, 16, generator=g, requires_grad=True) for _ in range(2))
    cq, ck = pg.cluster(q, k, 4)
    out, ran = run_on_kernels(spec, q, k, v, cq, ck)
    # one launch for all (head, cluster) documents, forward and backward
    assert ran == {"forward": 1, "backward": 1}
    torch.testing.assert_close(out.double(), oracle(q, k, v, spec.bind(40, 33), cq, ck), atol=1e-4, rtol=0)


def test_cluster_assigns_to_shared_centroids():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1) * 10
    pick = torch.randint(0, 3, (1, 1, 60), generator=g)
    q = centres[pick] + 0.01 * torch.randn(1, 1, 60, 16, generator=g)
    k = q[:, :, :30].clone()  # keys equal to the first 30 queries: same clusters
    cq, ck = pg.cluster(q, k, 3)
    assert torch.equal(ck, cq[:, :, :30])
    # three tight groups: the clustering recovers them up to names
    relabel = {int(a): int(b) for a, b in zip(pick.flatten(), cq.flatten())}
    assert len(set(relabel.values())) == 3
    assert all(relabel[int(a)] == int(b) for a, b in zip(pick.flatten(), cq.flatten()))
    assert torch.equal(pg.cluster(q, k, 3)[0], cq)  # deterministic


def test_errors():
    spec = pg.Spec(pg.Clustered(), num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 5, 8)
    ids = torch.zeros(1, 2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the cluster ids"):
        pg.attention(q, q, q, spec)
    with pytest.raises(ValueError, match="give both"):
        pg.attention(q, q, q, spec, q_clusters=ids)
    with pytest.raises(ValueError, match="kv_clusters: expected shape \\[1, 2, 5\\], got \\[1, 2, 4\\]"):
        pg.attention(q, q, q, spec, q_clusters=ids, kv_clusters=ids[:, :, :4])
    with pytest.raises(ValueError, match="ids are >= 0, or -1"):
        pg.attention(q, q, q, spec, q_clusters=ids - 2, kv_clusters=ids)
    with pytest.raises(ValueError, match="expected an integer tensor"):
        pg.attention(q, q, q, spec, q_clusters=ids.float(), kv_clusters=ids)
    with pytest.raises(ValueError, match="sinks: not supported with Clustered"):
        pg.attention(q, q, q, spec, q_clusters=ids, kv_clusters=ids, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="holds no Clustered"):
        pg.attention(q, q, q, pg.Spec(pg.Causal(), num_heads=2, head_dim=8), q_clusters=ids, kv_clusters=ids)
    fixed = pg.Spec(pg.Clustered() & pg.Causal(), 64, num_heads=1, head_dim=8)
    for call in (lambda: pg.build_plan(fixed), lambda: pg.simulate(fixed)):
        with pytest.raises(ValueError, match="Clustered"):
            call()
    with pytest.raises(ValueError, match="num_clusters: expected an int >= 1"):
        pg.cluster(q, q, 0)


def test_simulate_counts_the_work_on_given_ids():
    """simulate(spec, clusters=...): exact visible pairs (against the oracle), and the tiles the
    packed documents visit: per (head, cluster), ceil(q / 16) q tiles each over ceil(k / 16) kv
    tiles, the last partial when the keys do not fill it; a composition the same tiles, all masked."""
    cq = torch.tensor([[[0] * 20 + [1] * 12 + [-1] * 8]])  # 40 queries: 20 in cluster 0, 12 in 1
    ck = torch.tensor([[[1] * 5 + [0] * 33 + [2] * 2]])  # 40 keys: 33 in cluster 0, 5 in 1, 2 in 2
    spec = pg.Spec(pg.Clustered(), 40, num_heads=1, head_dim=16)
    r = pg.simulate(spec, 16, 16, clusters=(cq, ck), device="h100")
    assert r.packed and r.visible_pairs == 20 * 33 + 12 * 5 == int(pg.dense_mask(spec, clusters=(cq[0], ck[0])).sum())
    assert (r.visited, r.full) == (2 * 3 + 1 * 1, 2 * 2)  # cluster 0: 2 q tiles x 3 kv tiles (2 full)
    assert r.tile_pairs == 9 and r.predicted_time_s > 0 and "packed cluster documents 7" in r.summary()
    both = pg.Spec(pg.Clustered() & pg.Causal(), 40, num_heads=1, head_dim=16)
    m = pg.simulate(both, 16, 16, clusters=(cq, ck))
    # the composition's pairs lie within the clusters: 2 x 3 + 1 x 1 tile pairs, every one masked
    assert [x.name for x in m.launches] == ["gathered"] and (m.visited, m.full) == (7, 0)
    assert m.visible_pairs == int(pg.dense_mask(both, clusters=(cq[0], ck[0])).sum())
    with pytest.raises(ValueError, match="give them, simulate\\(spec, clusters="):
        pg.simulate(spec)
    with pytest.raises(ValueError, match="clusters: .* holds no Clustered"):
        pg.simulate(pg.Spec(pg.Causal(), 40), clusters=(cq, ck))
    with pytest.raises(ValueError, match="q_tile: a Clustered spec runs on flat tiles"):
        pg.simulate(spec, (4, 4), 16, clusters=(cq, ck))
