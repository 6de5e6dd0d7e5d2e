"""Learned sinks (gpt-oss): `pg.attention(..., sinks=s)`, a logit per query head that joins every
row's softmax denominator with no value; gradients flow to it. Oracle: the dense masked softmax
with the sink as an extra column, dropped before the values."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as the other kernel tests

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import dispatch
from tests.strategies import scaled

PATTERNS = [pg.Causal(), (pg.Sink(2) | pg.Band(6)) & pg.Causal(), pg.Band(3, 5), pg.Strided(3, 1)]


def sink_oracle(q, k, v, spec, sinks):
    """(out, lse) in float64: the masked scores with the sink column appended (always finite, so
    autograd through it is exact, also for rows that see no key)."""
    mask = pg.dense_mask(spec)
    g = spec.num_heads // spec.num_kv_heads
    k, v = (t.repeat_interleave(g, 1) for t in (k, v))
    s = (q @ k.transpose(-1, -2) * spec.head_dim ** -0.5).masked_fill(~mask, float("-inf"))
    s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], -1)
    return torch.softmax(s, -1)[..., :-1] @ v, torch.logsumexp(s, -1)


def leaves(spec: pg.Spec, batch: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, spec.num_heads, spec.nq, spec.head_dim), (batch, spec.num_kv_heads, spec.nkv, spec.head_dim),
              (batch, spec.num_kv_heads, spec.nkv, spec.head_dim), (spec.num_heads,)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * (3 if len(s) == 1 else 1)).to(dtype).requires_grad_()
            for s in shapes]


def check(spec: pg.Spec, batch: int, dtype, seed: int, lse_loss: bool, run, tol: float) -> None:
    """`run(q, k, v, sinks)` -> (out, lse) equals the oracle, and so do the gradients of a random
    linear loss of out (and of lse when `lse_loss`) in q, k, v and the sinks."""
    x = leaves(spec, batch, dtype, seed)
    ref = [t.detach().double().requires_grad_() for t in x]
    out, lse = run(*x)
    want_out, want_lse = sink_oracle(*ref[:3], spec, ref[3])
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    g = torch.Generator().manual_seed(seed + 1)
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                       dtype=torch.float64)
    loss = (out * w_out.to(dtype)).sum() + ((lse * w_lse.to(lse.dtype)).sum() if lse_loss else 0)
    want = (want_out * w_out).sum() + ((want_lse * w_lse).sum() if lse_loss else 0)
    got, expected = torch.autograd.grad(loss, x), torch.autograd.grad(want, ref)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, expected):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@settings(max_examples=scaled(12), deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 40), st.integers(1, 40), st.sampled_from([(2, 1), (4, 2), (3, 3)]),
       st.integers(1, 2), st.booleans(), st.integers(0, 2**16))
def test_reference_backend(pattern, nq, nkv, heads, batch, lse_loss, seed):
    """The reference backend, float64, with rows that see no key (nq > nkv under Causal)."""
    spec = pg.Spec(pattern, nq, nkv, num_heads=heads[0], num_kv_heads=heads[1], head_dim=8)
    check(spec, batch, torch.float64, seed, lse_loss,
          lambda q, k, v, s: pg.attention(q, k, v, spec, sinks=s, return_lse=True), 1e-9)


@pytest.mark.interpreter
@pytest.mark.parametrize("spec", [pg.Spec((pg.Sink(2) | pg.Band(20)) & pg.Causal(), 50, 70, num_heads=4,
                                          num_kv_heads=2, head_dim=16),
                                  pg.Spec(pg.Window((3, 5), stride=(1, 2)), (6, 9), num_heads=2, head_dim=16)],
                         ids=["sinks+band, nkv > nq, GQA", "2-D window"])
def test_triton_kernels(spec):
    """The generated kernels through the op (interpreter, float32): the forward's (out, lse)
    rescaled by the sink, and the kernel backward run on them (no gradient flows into lse)."""
    pytest.importorskip("triton")
    before = dispatch.calls.copy()
    with dispatch.kernels_on_cpu():
        check(spec, 2, torch.float32, 0, False,
              lambda q, k, v, s: pg.compile(spec, backend="triton")(q, k, v, sinks=s, return_lse=True), 2e-4)
    ran = dispatch.calls - before
    assert ran[("forward", "triton")] == 1 and ran[("backward", "triton")] == 1, ran


def test_compiles_without_graph_breaks():
    spec = pg.Spec(pg.Causal(), num_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    fn = torch.compile(lambda q, k, v, s: pg.attention(q, k, v, spec, sinks=s), fullgraph=True, backend="eager")
    got = fn(q, k, v, sinks)
    torch.testing.assert_close(got, pg.attention(q, k, v, spec, sinks=sinks))
    got.sum().backward()
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all()


@pytest.mark.parametrize("sinks,error,match", [
    ([0.0, 0.0], TypeError, "sinks: expected a float tensor \\[2\\]"),
    (torch.zeros(2, dtype=torch.int32), TypeError, "sinks: expected a floating-point tensor"),
    (torch.zeros(3), ValueError, "sinks: expected shape \\[2\\]"),
    (torch.zeros(1, 2), ValueError, "sinks: expected shape \\[2\\]"),
])
def test_bad_sinks(sinks, error, match):
    spec = pg.Spec(pg.Causal(), 8, num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match=match):
        pg.attention(q, q, q, spec, sinks=sinks)


def test_sinks_with_head_routing_are_refused():
    spec = pg.Spec(pg.Causal(), 8, num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="sinks: not supported together with head_indices"):
        pg.attention(q, q, q, spec, head_indices=torch.zeros(1, 8, 1, dtype=torch.long), sinks=torch.zeros(2))


def test_transformers_attention_takes_gpt_oss_sinks():
    """gpt-oss hands its sink logits to the attention function as `s_aux`."""
    from types import SimpleNamespace

    from patterngen.integrations.transformers import patterngen_attention_forward
    pattern = (pg.Sink(2) | pg.Band(4)) & pg.Causal()
    module = SimpleNamespace(config=SimpleNamespace(patterngen_pattern=pattern), layer_idx=0, training=False)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([0.3, -2.0], dtype=torch.float64)
    got, _ = patterngen_attention_forward(module, q, k, v, None, s_aux=sinks)
    want, _ = sink_oracle(q, k, v, pg.Spec(pattern, 10, num_heads=2, head_dim=8), sinks)
    torch.testing.assert_close(got, want.transpose(1, 2))


@pytest.mark.interpreter
def test_kernel_launcher_without_keys_gives_the_sink_as_lse():
    """A launch with no key never runs the kernel: zeros, and lse = the sink (as apply_sinks gives)."""
    pytest.importorskip("triton")
    from patterngen.backends.triton import TritonForward
    spec = pg.Spec(pg.Causal(), num_heads=2, head_dim=16)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 0, 16)
    sinks = torch.tensor([0.5, -3.0])
    out, lse = TritonForward(spec, pg.Tiling(16, 16))(q, k, k, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(lse, sinks[None, :, None].expand(1, 2, 5))
