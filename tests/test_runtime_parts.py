"""Run-time nodes inside compositions (issue 16 item 5): `Clustered()` and box-routed `Routed`
under |, &, Heads and GQA (`patterngen.runtime`). Oracles: softmax over `pg.dense_mask` in
float64 (the element-wise semantics with the call's ids), forward and gradients; the split's
own law (`static_part`) checked element-wise; the work counted against the run-time pairs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import runtime
from patterngen.analysis.runtime import split_heads, static_part
from patterngen.core.semantics import visible
from patterngen.dispatch import compile_options
from patterngen.routing.blocks import block_masks, normalize_block_indices
from tests.helpers import dense_attention
from tests.strategies import runtime_specs, scaled
from tests.test_clustered import check_gradients, oracle, run_on_kernels


def _ids(g, shape, clusters: int) -> torch.Tensor:
    return torch.randint(-1, clusters, shape, generator=g)


def _box_indices(g, spec: pg.Spec, batch: int) -> torch.Tensor:
    boxes = spec.nq // spec.routed.volume
    return torch.randint(-1, boxes, (batch, spec.num_kv_heads, boxes, spec.routed.topk), generator=g)


@settings(max_examples=scaled(30), deadline=None)
@given(runtime_specs(box=False), st.integers(1, 2), st.integers(1, 5), st.booleans(), st.data())
def test_clustered_compositions_against_the_mask(spec_lengths, B, clusters, kv_per_kv_head, data):
    spec, (nq, nkv) = spec_lengths
    H, Hkv = spec.num_heads, spec.num_kv_heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(B, H, nq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, nkv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cq = _ids(g, (B, H, nq), clusters)
    ck = _ids(g, (B, Hkv if kv_per_kv_head else H, nkv), clusters)
    out = pg.attention(q, k, v, spec, q_clusters=cq, kv_clusters=ck)
    want = oracle(q, k, v, spec.bind(nq, nkv), cq, ck.repeat_interleave(H // Hkv, 1) if kv_per_kv_head else ck)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    if out.requires_grad:
        check_gradients(out, want, (q, k, v), g)


@settings(max_examples=scaled(30), deadline=None)
@given(runtime_specs(box=True), st.integers(1, 2), st.data())
def test_box_routed_compositions_against_the_mask(spec_lengths, B, data):
    spec, (n, _) = spec_lengths
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(B, spec.num_heads, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, spec.num_kv_heads, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    idx = _box_indices(g, spec, B)
    out = pg.attention(q, k, v, spec, block_indices=idx)
    want, _ = dense_attention(q, k, v, spec, idx)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    if out.requires_grad:
        check_gradients(out, want, (q, k, v), g)


@settings(max_examples=scaled(40), deadline=None)
@given(st.one_of(runtime_specs(box=False), runtime_specs(box=True)), st.data())
def test_static_part_law(spec_lengths, data):
    """For every head: S within p, and every pair of p outside S is a pair of the run-time node
    (same cluster; key box routed to the query's box), the law the split rests on."""
    spec, (nq, nkv) = spec_lengths
    bound = spec.bind(nq, nkv) if spec.length_free else spec
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    qi, kj = torch.arange(nq)[:, None], torch.arange(nkv)[None, :]
    mask = ids = None
    if spec.routed is not None:
        idx = _box_indices(g, spec, 1)
        mask = True
        masks = block_masks(bound, normalize_block_indices(bound, idx))[0]
    else:
        ids = (_ids(g, (nq,), 3), _ids(g, (nkv,), 3))
    split = split_heads(spec)
    for h, p in enumerate(bound.head_patterns):
        extra = {"block_mask": masks[h]} if mask is not None else {"clusters": ids}
        whole = visible(p, qi, kj, bound, **extra)
        node = visible(spec.routed if mask is not None else pg.Clustered(), qi, kj, bound, **extra)
        s = split.parts[h]
        assert s == static_part(p)
        part = torch.zeros_like(whole) if s is None else visible(s, qi, kj, bound).expand_as(whole)
        assert not (part & ~whole).any()
        assert not (whole & ~part & ~node).any()
        kind = "pure" if h in split.pure else ("mixed" if h in split.mixed else "static")
        assert (kind == "static") == (s == p)


def test_gathered_work_is_the_runtime_pairs(monkeypatch):
    """Mixed heads compute only the run-time node's pairs: each cluster's queries x keys, each
    query box x its routed boxes, never Nq x Nkv; their static parts go to the op."""
    scores = []

    def counting(Q, K, V, mask, scale, *args):
        scores.append(mask.numel())
        return masked(Q, K, V, mask, scale, *args)
    masked = runtime.masked_attention
    monkeypatch.setattr(runtime, "masked_attention", counting)
    n, C = 256, 8
    spec = pg.Spec(pg.Clustered() & pg.Causal(), num_heads=1, head_dim=8)
    q = torch.randn(1, 1, n, 8)
    ids = torch.arange(n).remainder(C).view(1, 1, n)  # 8 clusters of 32 tokens
    pg.attention(q, q, q, spec, q_clusters=ids, kv_clusters=ids)
    assert sum(scores) == C * (n // C) ** 2  # = n^2 / 8
    scores.clear()
    spec = pg.Spec(pg.Routed((4, 4), 2) | pg.Window(3), (16, 16), num_heads=1, head_dim=8)
    q = torch.randn(1, 1, 256, 8)
    pg.attention(q, q, q, spec, block_indices=pg.route(q.view(1, 1, 16, 16, 8), q.view(1, 1, 16, 16, 8), (4, 4), 2))
    assert sum(scores) == 256 * 2 * 16  # every query against its 2 routed boxes of 16 keys


def test_kernels_run_the_static_parts():
    """On the Triton backend (the interpreter here): one forward launch for the static heads and
    the static parts of mixed heads, the packed documents for the pure heads, equal to the
    oracle."""
    spec = pg.Spec(pg.Heads([pg.Clustered() & pg.Causal(), pg.Band(4, 0) | pg.Clustered(), pg.Clustered(),
                             pg.Band(8, 0)]), num_heads=4, num_kv_heads=2, head_dim=16)
    split = split_heads(spec)
    assert (split.static, split.pure, split.mixed) == ((3,), (2,), (0, 1))
    assert split.parts == (None, pg.Band(4, 0), None, pg.Band(8, 0))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(2))
    cq, ck = pg.cluster(q, k, 3)
    out, ran = run_on_kernels(spec, q, k, v, cq, ck)
    assert ran["forward"] == 2  # static part, packed documents
    torch.testing.assert_close(out.double(), oracle(q, k, v, spec.bind(40, 40), cq, ck), atol=1e-4, rtol=0)
    box = pg.Spec(pg.Heads([pg.Routed((4, 4), 2) | pg.Window(3), pg.Routed((4, 4), 2)]), (8, 8), num_heads=2,
                  head_dim=16)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    idx = pg.route(q.view(1, 2, 8, 8, 16), k.view(1, 2, 8, 8, 16), (4, 4), 2)
    out = pg.attention(q, k, v, box, block_indices=idx, _options=compile_options("triton", None))
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, box, idx)[0], atol=1e-4, rtol=0)


def test_simulate_and_show_a_box_routed_composition():
    """Box-routed blocks with a neighbourhood: the static part's plan (the window) and per query
    box its routed keys' tiles, every one masked; `show` draws the mask from the semantics."""
    spec = pg.Spec(pg.Routed((4, 4), 2) | pg.Window(3), (16, 16), num_heads=1, head_dim=8)
    g = torch.Generator().manual_seed(0)
    idx = _box_indices(g, spec, 1)
    r = pg.simulate(spec, 16, 16, block_indices=idx, device="h100")
    assert [x.name for x in r.launches] == ["static", "gathered"] and r.predicted_time_s > 0
    kept = [len({b for b in row if b >= 0}) for row in idx[0, 0].tolist()]
    gathered = r.launches[1]
    assert (gathered.visited, gathered.full) == (sum(-(-16 * n // 16) for n in kept), 0)
    assert r.visible_pairs == int(pg.dense_mask(spec, idx).sum())
    with pytest.raises(ValueError, match="no tile plan ahead of a call"):
        pg.build_plan(spec)
    with pytest.raises(ValueError, match="world_size: not supported for specs with run-time ids"):
        pg.simulate(spec, block_indices=idx, world_size=2)
    from patterngen.tools.draw import draw_mask
    small = pg.Spec(pg.Routed((4, 4), 2) | pg.Window(3), (8, 8), num_heads=1, head_dim=8)
    idx = _box_indices(g, small, 1)
    lines, caption = draw_mask(small, 0, 0, 66, idx)
    mask = pg.dense_mask(small, idx)[0, 0]
    assert "one char per (q, kv) pair" in caption and len(lines) == 64 + 2
    drawn = torch.tensor([[c != " " for c in line[1:-1]] for line in lines[1:-1]])
    assert torch.equal(drawn, mask)  # one char per pair: exactly the oracle


def test_errors():
    spec = pg.Spec(pg.Heads([pg.Clustered() | pg.Routed((2, 2), 1), pg.Full()]), (4, 4), num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 16, 8)
    ids = torch.zeros(1, 2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="the pattern .* mixes Clustered\\(\\) with box-routed blocks"):
        pg.attention(q, q, q, spec, q_clusters=ids, kv_clusters=ids,
                     block_indices=torch.zeros(1, 2, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="softcap: not supported with Clustered\\(\\) or box-routed"):
        pg.attention(q, q, q, pg.Spec(pg.Routed((2, 2), 1) | pg.Window(3), (4, 4), num_heads=2, head_dim=8),
                     block_indices=torch.zeros(1, 2, 4, 1, dtype=torch.long), softcap=5.0)


@settings(max_examples=scaled(30), deadline=None)
@given(st.one_of(runtime_specs(box=False), runtime_specs(box=True)), st.integers(1, 2), st.data())
def test_simulate_counts_against_the_oracle(spec_lengths, B, data):
    """simulate(spec, clusters= / block_indices=): the exact visible pairs of every head class
    (the static part's closed form plus the gathered remainder) equal the oracle's, and the
    launches are the head classes present."""
    spec, (nq, nkv) = spec_lengths
    spec = spec.bind(nq, nkv) if spec.length_free else spec
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    if spec.clustered:
        cq, ck = _ids(g, (B, spec.num_heads, nq), 4), _ids(g, (B, spec.num_heads, nkv), 4)
        report = pg.simulate(spec, 8, 8, clusters=(cq, ck))
        want = sum(int(pg.dense_mask(spec, clusters=(cq[b], ck[b])).sum()) for b in range(B))
    else:
        idx = _box_indices(g, spec, B)
        report = pg.simulate(spec, 8, 8, block_indices=idx)
        want = int(pg.dense_mask(spec, idx).sum())
    assert report.visible_pairs == want
    split = split_heads(spec)
    if len(split.pure) == spec.num_heads and not spec.clustered:  # box routing alone: the flat simulation
        return
    names = {x.name for x in report.launches}
    assert ("static" in names) == any(p is not None for p in split.parts)
    assert ("gathered" in names) == bool(split.mixed)
    assert report.full <= report.visited
