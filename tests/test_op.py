"""`pg.attention` as the `patterngen::attention` custom op.

Outputs and gradients equal the reference backend's; a transformer block using
it compiles with `fullgraph=True`, forward and backward, with zero graph breaks
and the same results as eager; a new batch size does not fail; the spec is
carried as a registry key, so equal specs share one op argument; opcheck
validates the schema, the fake kernels and the autograd registration.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: before triton is imported

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import patterngen as pg
from patterngen import dispatch
from patterngen.op import attention_backward_op, attention_op
from patterngen.registry import lookup_spec, spec_key
from tests.helpers import dense_attention

TOL = 1e-5

CAUSAL_BAND = pg.Spec(pg.Band(5, 0) | pg.Sink(2), 40, num_heads=2, head_dim=16)
WINDOW_2D = pg.Spec(pg.Window((3, 5)), (6, 8), num_heads=2, head_dim=16)
GQA_HEADS = pg.Spec(pg.Heads([pg.Causal(), pg.Window(7), pg.Full(), pg.Band(3, 2) | pg.Global(2)]), 36,
                    num_heads=4, num_kv_heads=2, head_dim=8)
ROUTED = pg.Spec(pg.Routed(16, 2) | pg.Causal(), 64, num_heads=2, head_dim=16)
SPECS = {"causal_band": CAUSAL_BAND, "window_2d": WINDOW_2D, "gqa_heads": GQA_HEADS, "routed": ROUTED}


def inputs(spec, batch=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, spec.num_heads, spec.nq, spec.head_dim)] + [(batch, spec.num_kv_heads, spec.nkv,
                                                                  spec.head_dim)] * 2
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def indices_for(spec, q, k):
    if spec.routed is None:
        return None
    return pg.route(q.detach(), k.detach(), spec.routed.block, spec.routed.topk, causal=True)


@pytest.mark.parametrize("name", SPECS)
def test_outputs_and_gradients_equal_dense_attention_with_the_oracle_mask(name):
    spec = SPECS[name]
    q, k, v = inputs(spec)
    idx = indices_for(spec, q, k)
    out, lse = pg.attention(q, k, v, spec, block_indices=idx, return_lse=True)
    assert out.grad_fn is not None and "patterngen_attention" in type(out.grad_fn).__name__
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_attention(qr, kr, vr, spec, idx)
    assert (out - ref).abs().max() < TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < TOL
    # a loss that uses the lse too, so both output gradients flow
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=gen)
    wl = torch.randn(lse.shape, generator=gen)
    (out * w).sum().add((torch.where(fin, lse, 0) * wl).sum()).backward()
    (ref * w).sum().add((torch.where(fin, ref_lse, 0) * wl).sum()).backward()
    for t, r in ((q, qr), (k, kr), (v, vr)):
        assert t.grad.shape == t.shape
        assert (t.grad - r.grad).abs().max() < TOL


def test_spec_key_is_stable_and_shared():
    again = pg.Spec(pg.Band(5, 0) | pg.Sink(2), 40, num_heads=2, head_dim=16)
    assert again is not CAUSAL_BAND and spec_key(again) == spec_key(CAUSAL_BAND)
    assert lookup_spec(spec_key(again)) == again
    assert spec_key(WINDOW_2D) != spec_key(CAUSAL_BAND)
    with pytest.raises(ValueError, match="not a Spec's JSON form"):
        lookup_spec("nope")
    # the op's spec argument is the spec itself: a fresh process reads it without any registration
    assert json.loads(spec_key(CAUSAL_BAND))["type"] == "Spec"


def test_fp64_lse_dtype_and_gradcheck():
    spec = pg.Spec(pg.Causal() | pg.Sink(1), 6, num_heads=2, num_kv_heads=1, head_dim=2)
    q, k, v = inputs(spec, batch=1, dtype=torch.float64)
    out, lse = pg.attention(q, k, v, spec, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b, c: pg.attention(a, b, c, spec, return_lse=True), (q, k, v),
                                    fast_mode=True)


# -- torch.compile --------------------------------------------------------------------
class Block(torch.nn.Module):
    """Pre-norm attention block: layernorm, qkv projection, pg.attention, output projection."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        d = spec.num_heads * spec.head_dim
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        s = self.spec
        B, N, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                                 s.num_kv_heads * s.head_dim], dim=-1)
        q = q.view(B, N, s.num_heads, s.head_dim).transpose(1, 2)
        k = k.view(B, N, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, N, s.num_kv_heads, s.head_dim).transpose(1, 2)
        a = pg.attention(q, k, v, s)
        return x + self.proj(a.transpose(1, 2).reshape(B, N, -1))


def train_step(block, x):
    loss = block(x).square().mean()
    loss.backward()
    return loss.detach()


def grads(block):
    return {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block(GQA_HEADS)


def test_explain_reports_no_graph_breaks(block):
    torch._dynamo.reset()
    x = torch.randn(2, GQA_HEADS.nq, 32, requires_grad=True)
    fwd = torch._dynamo.explain(block)(x)
    assert fwd.graph_break_count == 0 and fwd.graph_count == 1, fwd.break_reasons
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # loss.backward() inside the graph
        step = torch._dynamo.explain(train_step)(block, x)
    assert step.graph_break_count == 0, step.break_reasons
    ops = [str(n.target) for g in fwd.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("patterngen.attention" in o for o in ops), ops


def test_compiled_block_equals_eager_forward_and_backward(block):
    torch._dynamo.reset()
    x = torch.randn(2, GQA_HEADS.nq, 32)
    eager_loss = train_step(block, x)
    eager = grads(block)
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    assert (out - block(x)).abs().max() < TOL
    compiled_loss = out.square().mean()
    compiled_loss.backward()
    assert (compiled_loss - eager_loss).abs() < TOL
    for name, g in grads(block).items():
        assert (g - eager[name]).abs().max() < TOL, name


@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_compiled_training_step_and_new_batch_size(block):
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: the op's fake kernels under symbolic batch sizes, without a second
    # slow Inductor C++ build (test_compiled_block_equals_eager covers Inductor)
    step = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        x = torch.randn(batch, GQA_HEADS.nq, 32)
        block.zero_grad()
        loss = step(block, x)
        got = grads(block)
        block.zero_grad()
        assert (loss - train_step(block, x)).abs() < TOL
        for name, g in grads(block).items():
            assert (g - got[name]).abs().max() < TOL, (batch, name)
    # the new batch size costs one dynamic-shape recompile, as for any torch module
    assert counters["stats"]["unique_graphs"] <= 2


def test_compiled_routed_attention():
    torch._dynamo.reset()
    q, k, v = inputs(ROUTED)
    idx = indices_for(ROUTED, q, k)

    def f(q, k, v, idx):
        out, lse = pg.attention(q, k, v, ROUTED, block_indices=idx, return_lse=True)
        return out.sum() + lse.sum()

    assert torch._dynamo.explain(f)(q, k, v, idx).graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, idx)
    got.backward()
    g = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v, idx)
    want.backward()
    assert (got - want).abs() < 1e-4
    for a, t in zip(g, (q, k, v)):
        assert (a - t.grad).abs().max() < TOL


def test_compiled_head_routed_attention():
    """MoH head routing through the op: zero graph breaks, compiled equals eager, with gates."""
    torch._dynamo.reset()
    q, k, v = inputs(GQA_HEADS)
    scores = torch.randn(2, GQA_HEADS.nq, 4, requires_grad=True)

    def f(q, k, v, scores):
        idx, gates = pg.route_heads(scores, 1, shared=1)
        out = pg.attention(q, k, v, GQA_HEADS, head_indices=idx)
        return (out * pg.gate_heads(idx, gates, 4)[..., None]).sum()

    assert torch._dynamo.explain(f)(q, k, v, scores).graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, scores)
    got.backward()
    g = [t.grad.clone() for t in (q, k, v, scores)]
    for t in (q, k, v, scores):
        t.grad = None
    want = f(q, k, v, scores)
    want.backward()
    assert (got - want).abs() < 1e-4
    for a, t in zip(g, (q, k, v, scores)):
        assert (a - t.grad).abs().max() < TOL


# -- opcheck --------------------------------------------------------------------------
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("name", ["gqa_heads", "routed"])
def test_opcheck_forward(name):
    spec = SPECS[name]
    q, k, v = inputs(spec)
    idx = indices_for(spec, q, k)
    # non-contiguous q: the fake kernel must still promise the real strides
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for args in ((q, k, v, spec_key(spec), 0.3, idx), (qt, k, v, spec_key(spec), None, idx)):
        torch.library.opcheck(attention_op, args, test_utils=OPCHECK)
    if idx is None:  # MoH head routing: token 3 uses no head, the others one or two
        heads = torch.randint(-1, spec.num_heads, (q.shape[0], spec.nq, 2), generator=torch.Generator().manual_seed(2))
        heads[:, 3] = -1
        torch.library.opcheck(attention_op, (q, k, v, spec_key(spec), None, None, heads), test_utils=OPCHECK)


def test_opcheck_backward():
    spec = GQA_HEADS
    q, k, v = (t.detach() for t in inputs(spec))
    out, lse = attention_op(q, k, v, spec_key(spec), None, None)
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(attention_backward_op, (dout, dlse, q, k, v, out, lse, spec_key(spec), None, None),
                              test_utils=("test_schema", "test_faketensor"))


# -- the op's kernel path, run here on CPU tensors by the Triton interpreter ----------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize("name", ["gqa_band", "routed"])
def test_kernel_path_runs_the_triton_kernels(name):
    """The generated forward and backward (and for static specs the MoH head-routed ones)
    against float64 dense attention; the counters show the kernels ran."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    spec = ROUTED if name == "routed" else pg.Spec(pg.Band(20) | pg.Sink(4), 128, num_heads=2, num_kv_heads=1,
                                                      head_dim=16)
    q, k, v = inputs(spec)
    idx = indices_for(spec, q, k)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strided like a qkv projection
    ref, ref_lse = dense_attention(q.detach(), k.detach(), v.detach(), spec, idx)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    with dispatch.kernels_on_cpu():
        assert pg.explain(spec, q).startswith("forward triton: the generated forward kernel")
        before = dispatch.calls.copy()
        out, lse = pg.attention(qt, k, v, spec, block_indices=idx, return_lse=True)
        out.backward(dout)
        assert dispatch.calls["forward", "triton"] == before["forward", "triton"] + 1
        assert dispatch.calls["backward", "triton"] == before["backward", "triton"] + 1
    assert out.is_contiguous() and out.dtype == q.dtype and lse.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    want = _dense_grads(q, k, v, spec, idx, dout)
    for t, w in zip((qt, k, v), want):
        assert (t.grad - w).abs().max() < 1e-4
    if idx is None:
        heads = torch.randint(-1, spec.num_heads, (q.shape[0], spec.nq, 1), generator=torch.Generator().manual_seed(3))
        chosen = pg.gate_heads(heads, torch.ones(heads.shape), spec.num_heads) > 0
        qh, kh, vh = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with dispatch.kernels_on_cpu():
            before = dispatch.calls.copy()
            out, lse = pg.attention(qh, kh, vh, spec, return_lse=True, head_indices=heads)
            out.backward(dout)
            assert dispatch.calls["heads_forward", "triton"] == before["heads_forward", "triton"] + 1
            assert dispatch.calls["heads_backward", "triton"] == before["heads_backward", "triton"] + 1
        assert (out - ref * chosen[..., None]).abs().max() < 1e-5
        assert torch.equal(torch.isinf(lse), ~chosen)
        want = _dense_grads(q, k, v, spec, None, dout * chosen[..., None])
        for t, w in zip((qh, kh, vh), want):
            assert (t.grad - w).abs().max() < 1e-4


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
def test_kernel_path_walks_routed_blocks_larger_than_its_tiles():
    """A length-free MoBA-style Routed(256) spec through the op: the policy's tiles (128 x 64
    forward, 32 x 64 dK/dV, 64 x 32 dQ) walk each routed block as its tiles, at lengths that
    are not multiples of the block, with pg.route's causal blocks."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    spec = pg.Spec(pg.Routed(256, 2, causal=True), num_heads=2, num_kv_heads=1, head_dim=16)
    assert dispatch.policy_tiling(spec, "prefill") == pg.Tiling(128, 64)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 300, 16, generator=gen).requires_grad_() for h in (2, 1, 1))
    idx = pg.route(q.detach(), k.detach(), 256, 2, causal=True)
    bound = spec.bind(300, 300)
    ref, ref_lse = dense_attention(q.detach(), k.detach(), v.detach(), bound, idx)
    dout = torch.randn(q.shape, generator=gen)
    with dispatch.kernels_on_cpu():
        before = dispatch.calls.copy()
        out, lse = pg.attention(q, k, v, spec, block_indices=idx, return_lse=True)
        out.backward(dout)
        assert dispatch.calls["backward", "triton"] == before["backward", "triton"] + 1
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    for t, w in zip((q, k, v), _dense_grads(q, k, v, bound, idx, dout)):
        assert (t.grad - w).abs().max() < 1e-4


def _dense_grads(q, k, v, spec, idx, dout):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = dense_attention(q, k, v, spec, idx)
    return [g.float() for g in torch.autograd.grad(out, (q, k, v), dout.double())]


def test_import_does_not_import_triton_or_dynamo():
    """So that TRITON_INTERPRET can still be set after `import patterngen`."""
    code = "import sys, patterngen; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.split() == ["False", "False"]
