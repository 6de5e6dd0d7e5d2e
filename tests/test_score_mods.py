"""Score modifications (issue 14 items 7, 8): `softcap=c` (Gemma 2) turns each scaled score s into
c * tanh(s / c); `alibi_slopes=m` then adds -m[h] * |i - j|, query i at position i + Nkv - Nq.
Oracle: the dense masked softmax of the modified scores, float64, written here from those
definitions; every backend and walk is held to it, forward and backward, with sinks too."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as the other kernel tests

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import dispatch
from tests.helpers import oracle_attention
from tests.strategies import scaled

PATTERNS = [pg.Causal(), (pg.Sink(2) | pg.Band(6)) & pg.Causal(), pg.Band(3, 5), pg.Strided(3, 1), pg.Full(),
            pg.Heads([pg.Causal(), pg.Band(4) & pg.Causal()])]


def check(spec, batch, dtype, seed, run, tol, softcap=None, alibi=False, sinks=False, lse_loss=False,
          block_indices=None):
    """`run(q, k, v, softcap=..., alibi_slopes=..., sinks=...)` -> (out, lse) equals the oracle, and so
    do the gradients of a random linear loss of out (and of lse's finite rows when `lse_loss`)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, spec.num_heads, spec.nq, spec.head_dim)] + 2 * [(batch, spec.num_kv_heads, spec.nkv,
                                                                        spec.head_dim)]
    x = [(torch.randn(s, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_() for s in shapes]
    slopes = torch.rand(spec.num_heads, generator=g, dtype=torch.float64) * 0.5 if alibi else None
    sink = (torch.randn(spec.num_heads, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_() \
        if sinks else None
    ref = [t.detach().double().requires_grad_() for t in x]
    ref_sink = None if sink is None else sink.detach().double().requires_grad_()
    out, lse = run(*x, softcap=softcap, alibi_slopes=None if slopes is None else slopes.to(dtype), sinks=sink)
    want_out, want_lse = oracle_attention(*ref, spec, softcap, slopes, ref_sink, block_indices)
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                       dtype=torch.float64)
    finite = torch.isfinite(want_lse)

    def loss(o, l):
        return (o * w_out.to(o.dtype)).sum() + ((l.masked_fill(~finite, 0) * w_lse.to(l.dtype)).sum()
                                                if lse_loss else 0)
    leaves, ref_leaves = x + ([sink] if sinks else []), ref + ([ref_sink] if sinks else [])
    got, expected = torch.autograd.grad(loss(out, lse), leaves), torch.autograd.grad(loss(want_out, want_lse),
                                                                                    ref_leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, expected):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def mods():
    return st.tuples(st.one_of(st.none(), st.floats(0.5, 30.0)), st.booleans(), st.booleans())


@settings(max_examples=scaled(25), deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 40), st.integers(1, 40), st.sampled_from([(2, 1), (2, 2)]),
       st.integers(1, 2), mods(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_reference_backend(pattern, nq, nkv, heads, batch, mod, planned, lse_loss, seed):
    """The reference backend in float64: its small-call path, and (`planned`) the tile-plan path a
    pg.compile tiling forces, with rows that see nothing, GQA, sinks, gradients through lse."""
    softcap, alibi, sinks = mod
    spec = pg.Spec(pattern, nq, nkv, num_heads=heads[0], num_kv_heads=heads[1], head_dim=8)
    fn = pg.compile(spec, backend="reference", tiling=pg.Tiling(4, 8) if planned else None)
    check(spec, batch, torch.float64, seed, lambda *a, **kw: fn(*a, return_lse=True, **kw), 1e-9, softcap, alibi,
          sinks, lse_loss)


def test_reference_routed():
    """A Routed spec: routed blocks are scored with the same modifications."""
    spec = pg.Spec(pg.Routed(8, 2) | pg.Band(2), 40, 48, num_heads=2, head_dim=8)
    idx = torch.tensor([[[0, 3], [1, 5], [2, 0], [4, 1], [5, 2]], [[1, 2], [0, 4], [3, 5], [2, 1], [0, 5]]])
    check(spec, 1, torch.float64, 3,
          lambda *a, **kw: pg.attention(*a, spec, block_indices=idx, return_lse=True, **kw), 1e-9, 5.0, True,
          block_indices=idx)


KERNEL_CASES = {  # id: spec, tiling (each reaches a different kv walk of the templates)
    "closed-form": (pg.Spec((pg.Sink(3) | pg.Band(20)) & pg.Causal(), num_heads=4, num_kv_heads=2, head_dim=16),
                    pg.Tiling(16, 16)),
    "table": (pg.Spec(pg.Strided(5, 2) | (pg.Band(9) & pg.Causal()), 50, 70, num_heads=2, head_dim=16),
              pg.Tiling(16, 16)),
    "heads": (pg.Spec(pg.Heads([pg.Causal(), pg.Band(12, 3)]), 48, num_heads=2, head_dim=16), pg.Tiling(16, 16)),
    "window": (pg.Spec(pg.Window(13), 60, num_heads=2, head_dim=16), pg.Tiling(16, 16)),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", [(4.0, False, False), (None, True, True), (2.0, True, False)],
                         ids=["softcap", "alibi+sinks", "softcap+alibi"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_kernels(case, mod):
    """The generated forward and backward kernels through the op (interpreter, float32)."""
    pytest.importorskip("triton")
    spec, tiling = KERNEL_CASES[case]
    if spec.length_free:
        spec = spec.bind(40, 56)
    fn = pg.compile(KERNEL_CASES[case][0], backend="triton", tiling=tiling)
    before = dispatch.calls.copy()
    with dispatch.kernels_on_cpu():
        check(spec, 2, torch.float32, 1, lambda *a, **kw: fn(*a, return_lse=True, **kw), 3e-4, *mod)
    ran = dispatch.calls - before
    assert ran[("forward", "triton")] == 1 and ran[("backward", "triton")] == 1, ran


@pytest.mark.interpreter
def test_triton_routed_kernels():
    pytest.importorskip("triton")
    spec = pg.Spec(pg.Routed(32, 2, causal=True) | (pg.Band(5) & pg.Causal()), 96, num_heads=2, head_dim=16)
    idx = torch.tensor([[[0, -1], [0, 1], [2, 0]], [[0, 2], [1, 0], [1, -1]]])  # tiles of 16: 2 x 2 per block
    before = dispatch.calls.copy()
    with dispatch.kernels_on_cpu():
        check(spec, 1, torch.float32, 2, lambda *a, **kw: pg.compile(spec, backend="triton", tiling=pg.Tiling(16, 16))(
            *a, block_indices=idx, return_lse=True, **kw), 3e-4, 3.0, True, block_indices=idx)
    ran = dispatch.calls - before
    assert ran[("forward", "triton")] == 1 and ran[("backward", "triton")] == 1, ran


def test_compiles_without_graph_breaks():
    spec = pg.Spec(pg.Causal(), num_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25])
    fn = torch.compile(lambda q, k, v: pg.attention(q, k, v, spec, softcap=5.0, alibi_slopes=slopes),
                       fullgraph=True, backend="eager")
    got = fn(q, k, v)
    torch.testing.assert_close(got, pg.attention(q, k, v, spec, softcap=5.0, alibi_slopes=slopes))
    got.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(softcap=0.0), ValueError, "softcap: must be a positive finite number"),
    (dict(softcap=True), TypeError, "softcap: expected a positive float"),
    (dict(softcap=torch.tensor(2.0)), TypeError, "softcap: expected a positive float"),
    (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes: expected a float tensor \\[2\\]"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.long)), TypeError, "alibi_slopes: expected a floating-point"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes: expected shape \\[2\\]"),
    (dict(softcap=2.0, head_indices=torch.zeros(1, 8, 1, dtype=torch.long)), ValueError,
     "softcap: not supported together with head_indices"),
    (dict(alibi_slopes=torch.ones(2), head_indices=torch.zeros(1, 8, 1, dtype=torch.long)), ValueError,
     "alibi_slopes: not supported together with head_indices"),
])
def test_bad_inputs(kwargs, error, match):
    spec = pg.Spec(pg.Causal(), 8, num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match=match):
        pg.attention(q, q, q, spec, **kwargs)


def test_alibi_needs_a_1d_spec():
    spec = pg.Spec(pg.Window((3, 3)), (4, 4), num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="alibi_slopes: needs a 1-D spec"):
        pg.attention(q, q, q, spec, alibi_slopes=torch.ones(2))


@pytest.mark.parametrize("arch", [80, 90])
def test_modified_kernels_compile_for_gpu(arch):
    """With softcap and ALiBi on, the forward, dK/dV and dQ kernels of an LLM shape (Gemma 2's
    sliding window, head dim 128, bf16) compile for sm_80 and sm_90 as the plain ones do: no
    register spills, pipelined kv loops, warpgroup MMA on sm_90."""
    pytest.importorskip("triton")
    from patterngen.backends.triton import TritonBackward, TritonForward
    from patterngen.backends.triton.config import backward_tiling
    from patterngen.backends.triton.sass import read
    spec = pg.Spec(pg.Band(4095) & pg.Causal(), num_heads=8, num_kv_heads=4, head_dim=128)
    mods = {"SOFTCAP": True, "ALIBI": True}
    fwd = TritonForward(spec, pg.Tiling(128, 64))
    compiled = [fwd.cross_compile(arch, torch.bfloat16, mods=mods)]
    bwd = TritonBackward(TritonForward(spec, backward_tiling(pg.Tiling(128, 64), spec.head_dim, spec)))
    compiled += bwd.cross_compile(arch, torch.bfloat16, mods=mods)
    for c in compiled:
        r = read(c)
        print(f"{c.name} sm_{arch}: {r.registers} registers, full step {r.full_tile}, partial {r.partial_tile}")
        assert r.stack == 0 and r.spill_ops == 0, f"{c.name} sm_{arch}: register spills"
        assert r.pipelined and not r.serialized, f"{c.name} sm_{arch}: {r}"
        assert r.matmul == ("wgmma" if arch == 90 else "mma.sync"), f"{c.name} sm_{arch}: {r.matmul}"
