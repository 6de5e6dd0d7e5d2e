"""A Spec built inside `torch.compile`d code.

Dynamo traces the construction of a Spec made inside the compiled function (directly, or by
an `lru_cache`d factory, which Dynamo traces through, as the Hugging Face integration does),
so the object exists only in its trace. `pg.attention` then hands the op the key of the
spec's repr: such code compiles with `fullgraph=True` and no graph break, equals eager and
the dense-mask oracle, forward and backward, and a fixed length never recompiles.
"""
from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_op.py: before triton is imported

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import patterngen as pg
from patterngen.registry import lookup_spec, spec_key

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")

TOL = 1e-5
OUTSIDE = pg.Spec(pg.Band(3) & pg.Causal(), 24, num_heads=4, num_kv_heads=2, head_dim=8)
PATTERN = (pg.Sink(2) | pg.Band(5)) & pg.Causal()  # from a config, as the HF integration reads it


@functools.lru_cache(maxsize=None)
def cached_spec(n, heads, kv_heads, head_dim):
    return pg.Spec(pg.Band(3) & pg.Causal(), q_shape=n, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@functools.lru_cache(maxsize=None)
def spec_from_pattern(pattern, nq, nkv, heads, kv_heads, head_dim):  # the HF integration's factory
    return pg.Spec(pattern, q_shape=nq, kv_shape=nkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


def shape(q, k):
    return dict(num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[3])


BUILDERS = {
    "inline": lambda q, k: pg.Spec(pg.Band(3) & pg.Causal(), q_shape=q.shape[2], **shape(q, k)),
    "lru_cache": lambda q, k: cached_spec(q.shape[2], q.shape[1], k.shape[1], q.shape[3]),
    "hf_factory": lambda q, k: spec_from_pattern(PATTERN, q.shape[2], k.shape[2], q.shape[1], k.shape[1],
                                                 q.shape[3]),
    "heads_pairs": lambda q, k: pg.Spec(pg.Heads([(slice(0, 2), pg.Causal()), (slice(2, None), pg.Band(2) | pg.Sink(1))]),
                                        q.shape[2], **shape(q, k)),
    "heads_list": lambda q, k: pg.Spec(pg.Heads([pg.Causal(), pg.Window(5), pg.Full(), pg.Global(2)]) & pg.Band(9, 9),
                                       q.shape[2], **shape(q, k)),
    "window_2d": lambda q, k: pg.Spec(pg.Window((3, 5), stride=(1, 2)), (4, 6), **shape(q, k)),
    "outside": lambda q, k: OUTSIDE,
}


def qkv(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, 8, generator=gen).requires_grad_() for h in (4, 2, 2)]


def oracle(q, k, v, spec):
    mask = pg.dense_mask(spec)[None]
    rep = spec.num_heads // spec.num_kv_heads
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)


def attend(build):
    def f(q, k, v):
        return pg.attention(q, k, v, build(q, k))
    return f


@pytest.mark.parametrize("name", BUILDERS)
def test_spec_built_inside_compiled_code(name):
    build = BUILDERS[name]
    f = attend(build)
    q, k, v = qkv()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.square().sum().backward()
    assert (got - want).abs().max() < TOL
    for g, t in zip(grads, (q, k, v)):
        assert (g - t.grad).abs().max() < TOL
    spec = build(q, k)
    assert (want - oracle(q, k, v, spec)).abs().max() < TOL


def test_inductor_compiles_a_spec_built_inside():
    f = attend(BUILDERS["inline"])
    q, k, v = (t.detach() for t in qkv())
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert (got - f(q, k, v)).abs().max() < TOL


def test_no_recompile_for_a_fixed_length_and_one_per_new_length():
    f = attend(BUILDERS["inline"])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for seed in range(3):
        q, k, v = (t.detach() for t in qkv(seed=seed))
        assert (compiled(q, k, v) - f(q, k, v)).abs().max() < TOL
    assert counter.frame_count == 1
    # a new length is a new Spec: Dynamo's dynamic size specializes in the Spec (one graph
    # per length) instead of failing to print a symbolic size
    for n in (16, 32, 16, 24, 32):
        q, k, v = (t.detach() for t in qkv(n))
        assert (compiled(q, k, v) - f(q, k, v)).abs().max() < TOL
    assert counter.frame_count == 3


def test_compiled_routed_spec_built_inside():
    def f(q, k, v, idx):
        spec = pg.Spec(pg.Routed(8, 2) | pg.Causal(), q.shape[2], **shape(q, k))
        return pg.attention(q, k, v, spec, block_indices=idx)

    q, k, v = (t.detach() for t in qkv(32))
    idx = pg.route(q, k, 8, 2, causal=True)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, idx)
    assert (got - f(q, k, v, idx)).abs().max() < TOL
    torch._dynamo.reset()
    with pytest.raises(Exception, match="block indices"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, None)


def test_spec_from_repr_rebuilds_or_refuses():
    from patterngen.registry import spec_from_repr
    spec = pg.Spec(pg.Heads([(slice(0, 2), pg.Causal()), (range(2, 4), pg.Window(3))]), 8, num_heads=4)
    rebuilt = spec_from_repr(repr(spec))
    assert rebuilt == spec and lookup_spec(spec_key(rebuilt)) == spec and spec_key(rebuilt) == spec_key(spec)
    assert spec_from_repr(repr(spec)) is rebuilt
    odd = pg.Spec(pg.Union((pg.Causal(), pg.Union((pg.Band(2), pg.Causal())))), 8)  # not what | builds
    assert spec_from_repr(repr(odd)) == odd  # prints as its constructor, so it rebuilds exactly
    with pytest.raises(ValueError, match="rebuilt from its repr.*Mystery.*outside the compiled function"):
        spec_from_repr("Spec(Mystery(), q_shape=(8,))")
    with pytest.raises(ValueError, match="rebuilt from its repr"):
        spec_from_repr("__import__('os')")
    with pytest.raises(TypeError, match="expected a patterngen.Spec"):
        spec_from_repr("Causal()")
