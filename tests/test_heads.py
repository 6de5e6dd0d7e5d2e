"""Mixture-of-Head routing (`head_indices`): only the chosen (token, head) pairs are computed.

The oracle is "compute every head, then zero the unchosen (token, head) rows"; the
generated kernels run under TRITON_INTERPRET=1 and are compiled for sm_80/sm_90."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import scaled
from patterngen.backends.reference import reference_attention

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
from patterngen.backends.triton import TritonHeads, backward_tiling  # noqa: E402
from tests.helpers import cubin_resources  # noqa: E402


def chosen_mask(head_indices, num_heads):
    """bool [B, H, Nq] by brute force."""
    B, N, _ = head_indices.shape
    m = torch.zeros(B, num_heads, N, dtype=torch.bool)
    for b in range(B):
        for n in range(N):
            for h in head_indices[b, n].tolist():
                if h >= 0:
                    m[b, h, n] = True
    return m


def all_heads_then_zero(q, k, v, spec, head_indices, scale):
    """(out, lse, leaves) of the oracle, differentiable through the reference backend."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference_attention(*leaves, spec, scale=scale)
    m = chosen_mask(head_indices, spec.num_heads)
    return out * m[..., None], lse.masked_fill(~m, float("-inf")), leaves


@st.composite
def routed_cases(draw):
    kind = draw(st.sampled_from(["causal", "window", "sink+window", "2-D", "2-D flat", "heads"]))
    num_kv = draw(st.sampled_from([1, 2]))
    H = num_kv * draw(st.sampled_from([1, 2, 3]))
    if kind.startswith("2-D"):
        shape = (draw(st.integers(3, 10)), draw(st.integers(3, 10)))
        pattern = pg.Window((draw(st.integers(2, shape[0])), draw(st.integers(2, shape[1]))),
                            causal=(draw(st.booleans()), False))
        tiling = pg.Tiling(16, 16) if kind == "2-D flat" else pg.Tiling((4, 4), (4, 4))
    else:
        n = draw(st.integers(1, 90))
        shape = (n,)
        w = min(n, draw(st.integers(2, 40)))
        pattern = {"causal": pg.Causal(), "window": pg.Window(w, causal=draw(st.booleans())),
                   "sink+window": (pg.Sink(3) | pg.Band(w)) & pg.Causal(),
                   "heads": pg.Heads([[pg.Causal(), pg.Full(), pg.Window(w)][i % 3] for i in range(H)])}[kind]
        tiling = pg.Tiling(*draw(st.sampled_from([(16, 16), (16, 32), (32, 16)])))
    spec = pg.Spec(pattern, shape, num_heads=H, num_kv_heads=num_kv, head_dim=16)
    B, N, kslots = 2, spec.nq, draw(st.integers(1, 3))
    routing = draw(st.sampled_from(["random", "shared only", "head 0 unused", "every head"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, H, (B, N, kslots), generator=g)
    if routing == "shared only":  # some tokens use only head 0, the shared one
        idx[:, ::2, 0], idx[:, ::2, 1:] = 0, -1
    elif routing == "head 0 unused":
        idx = torch.where(idx == 0, -1, idx)
    elif routing == "every head":
        idx = torch.arange(H).expand(B, N, H).clone()
    return spec, tiling, idx, seed


@settings(max_examples=scaled(25), deadline=None)
@given(routed_cases())
def test_kernels_equal_all_heads_then_zero(case):
    """Forward (out, lse) and gradients of the head-routed kernels equal the oracle."""
    spec, tiling, idx, seed = case
    torch.manual_seed(seed)
    B = idx.shape[0]
    q = torch.randn(B, spec.num_heads, spec.nq, 16)
    k = torch.randn(B, spec.num_kv_heads, spec.nkv, 16)
    v = torch.randn(B, spec.num_kv_heads, spec.nkv, 16)
    kern = TritonHeads(spec, tiling)
    out, lse = kern.forward(q, k, v, idx, scale=0.4)
    ref_out, ref_lse, leaves = all_heads_then_zero(q, k, v, spec, idx, 0.4)
    assert (out - ref_out).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4, rtol=0)
    dout = torch.randn_like(out)
    ref_out.backward(dout)
    bwd = TritonHeads(spec, backward_tiling(tiling, spec.head_dim))
    grads = bwd.backward(q, k, v, out, lse, dout, idx, scale=0.4)
    for got, leaf in zip(grads, leaves):
        assert (got - leaf.grad).abs().max() < 1e-4


def test_compaction_is_stable_and_counts_per_tile():
    spec = pg.Spec(pg.Window((3, 3)), (6, 8), num_heads=3, head_dim=16)
    kern = TritonHeads(spec, pg.Tiling((2, 8), (2, 8)))
    idx = torch.randint(-1, 3, (2, spec.nq, 2), generator=torch.Generator().manual_seed(1))
    slots, pref = kern.compact(idx)
    chosen = chosen_mask(idx, 3)
    tokens = kern.fwd.q_grid.tokens(torch.arange(kern.fwd.q_grid.count)).flatten()  # slot -> token
    for b in range(2):
        for h in range(3):
            want = [s for s, t in enumerate(tokens.tolist()) if t >= 0 and chosen[b, h, t]]
            n = int(pref[b, h, -1])
            assert slots[b, h, :n].tolist() == want
            per_tile = [sum(1 for s in want if s // 16 < t) for t in range(kern.fwd.q_grid.count + 1)]
            assert pref[b, h].tolist() == per_tile


@settings(max_examples=scaled(15), deadline=None)
@given(st.integers(1, 40), st.sampled_from(["causal", "window", "full"]), st.integers(1, 3), st.integers(0, 2**16))
def test_op_reference_and_gradients(n, kind, kslots, seed):
    """`pg.attention(..., head_indices=)` on CPU: the oracle's outputs and gradients."""
    torch.manual_seed(seed)
    pattern = {"causal": pg.Causal(), "window": pg.Window(min(9, n)), "full": pg.Full()}[kind]
    spec = pg.Spec(pattern, n, num_heads=4, num_kv_heads=2, head_dim=8)
    q = torch.randn(2, 4, n, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(-1, 4, (2, n, kslots))
    out, lse = pg.attention(q, k, v, spec, head_indices=idx, return_lse=True)
    ref_out, ref_lse, leaves = all_heads_then_zero(q, k, v, spec, idx, None)
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out.backward(dout)
    for t, leaf in zip((q, k, v), leaves):
        assert torch.allclose(t.grad, leaf.grad, atol=1e-10)


def test_gradcheck_fp64():
    spec = pg.Spec(pg.Window(5), 12, num_heads=2, head_dim=4)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    idx = torch.randint(-1, 2, (1, 12, 1))
    assert torch.autograd.gradcheck(lambda a, b, c: pg.attention(a, b, c, spec, head_indices=idx), (q, k, v))


def test_compiled_triton_backend_takes_head_indices():
    spec = pg.Spec(pg.Causal(), 40, num_heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    idx = torch.randint(-1, 2, (1, 40, 1))
    got = pg.compile(spec, backend="triton", tiling=pg.Tiling(16, 16))(q, k, v, head_indices=idx)
    want = pg.compile(spec, backend="reference")(q, k, v, head_indices=idx)
    assert (got - want).abs().max() < 1e-5


def test_route_heads_moh_gates():
    scores = torch.randn(2, 7, 6, requires_grad=True)
    idx, gates = pg.route_heads(scores, topk=2, shared=[0, 3])
    assert idx.shape == gates.shape == (2, 7, 4)
    assert (idx[..., :2] == torch.tensor([0, 3])).all()
    routed = idx[..., 2:]
    assert not torch.isin(routed, torch.tensor([0, 3])).any() and (routed[..., 0] != routed[..., 1]).all()
    # routed gates: the softmax over the routed heads, read at the top-2 (which they are)
    probs = scores[..., [1, 2, 4, 5]].softmax(-1)
    assert torch.allclose(gates[..., 2:], probs.topk(2, -1).values)
    assert torch.allclose(gates[..., :2].sum(-1), torch.ones(2, 7))
    dense = pg.gate_heads(idx, gates, 6)
    assert dense.shape == (2, 6, 7) and torch.allclose(dense.sum(1), gates.sum(-1))
    dense.sum().backward()
    assert scores.grad is not None
    balanced = pg.route_heads(scores, 1, shared=1, balance=torch.zeros(2, 7, 2))[1]
    assert torch.allclose(balanced[..., 0], torch.full((2, 7), 0.5))


@pytest.mark.parametrize("call,match", [
    (lambda s: pg.route_heads(s, topk=6, shared=1), "topk"),
    (lambda s: pg.route_heads(s, topk=1, shared=7), "shared"),
    (lambda s: pg.route_heads(s, topk=1, shared=[0, 0]), "shared"),
    (lambda s: pg.route_heads(s, topk=0, shared=0), "no head"),
    (lambda s: pg.route_heads(s[0], topk=1), "scores"),
])
def test_route_heads_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 3, 6))


@pytest.mark.parametrize("idx,err,match", [
    (torch.zeros(1, 10, 1), TypeError, "integer"),
    (torch.zeros(1, 9, 1, dtype=torch.long), ValueError, "shape"),
    (torch.full((1, 10, 1), 2), ValueError, r"\[-1, 2\)"),
    (torch.full((1, 10, 1), -2), ValueError, r"\[-1, 2\)"),
    ([0, 1], TypeError, "torch.Tensor"),
])
def test_head_indices_errors(idx, err, match):
    spec = pg.Spec(pg.Causal(), 10, num_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with pytest.raises(err, match=match):
        pg.attention(q, k, v, spec, head_indices=idx)


# (name, spec, tiling, stack bytes allowed): the per-head case walks the tile-class table with two
# mask functions; on sm_80 its backward kernels spill a few bytes (16-32 B with triton 3.9)
HEAD_CASES = [
    ("causal 32 heads d128", pg.Spec(pg.Causal(), 4096, num_heads=32, num_kv_heads=8, head_dim=128),
     pg.Tiling(64, 64), 0),
    ("2-D NA 8x8 boxes d128", pg.Spec(pg.Window((13, 13)), (64, 64), num_heads=8, head_dim=128),
     pg.Tiling((8, 8), (8, 8)), 0),
    ("per-head shards d64", pg.Spec(pg.Heads([pg.Causal(), (pg.Sink(4) | pg.Band(255)) & pg.Causal()]), 2048,
                                    num_heads=2, head_dim=64), pg.Tiling(64, 64), 32),
]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name,spec,tiling,spill", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_head_kernels_compile_for_gpu(name, spec, tiling, spill, arch):
    """Compaction, forward, dQ and dK/dV compile for sm_80/sm_90 without spills (the
    backward at its backward tiling, as the op runs it)."""
    fwd = TritonHeads(spec, tiling)
    bwd = TritonHeads(spec, backward_tiling(tiling, spec.head_dim))
    kernels = (fwd.cross_compile(arch, torch.bfloat16, names=("compact_heads", "attention_fwd_heads"))
               + bwd.cross_compile(arch, torch.bfloat16, names=("attention_bwd_dq_heads", "attention_bwd_dkdv_heads")))
    assert [c.name for c in kernels] == ["compact_heads", "attention_fwd_heads", "attention_bwd_dq_heads",
                                         "attention_bwd_dkdv_heads"]
    for compiled in kernels:
        regs, stack = cubin_resources(compiled)
        print(f"{name} {compiled.name} sm_{arch}: {regs} registers, {stack} B stack, {compiled.shared} B shared")
        assert compiled.shared <= (163 if arch == 80 else 227) * 1024
        assert stack <= spill, f"register spills: {stack} bytes of stack"
