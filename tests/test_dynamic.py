"""One length-free spec for every length: torch.compile traces it once with dynamic shapes,
torch.export and AOTInductor carry it inside the artifact, and a fresh process that only
imports patterngen runs that artifact at a length it was never traced with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: before triton is imported

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import patterngen as pg
from patterngen import dispatch, op

STREAM = pg.Spec((pg.Sink(4) | pg.Band(15)) & pg.Causal(), num_heads=4, num_kv_heads=2, head_dim=16)
PREFILL = [33, 40, 57, 64, 100, 129, 200, 90]
MIXED = [(1, 57), (1, 300), (3, 129), (70, 90), (2, 2), (1, 1000), (5, 6), (250, 251)]


def _inputs(nq, nkv, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, nq, 16, generator=g)
    k, v = (torch.randn(2, 2, nkv, 16, generator=g) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _oracle(q, k, v, spec):
    mask = pg.dense_mask(spec.bind(q.shape[2], k.shape[2]))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)


def test_length_free_spec_binds_per_call():
    assert STREAM.length_free and STREAM.ndim == 1 and "q_shape" not in repr(STREAM)
    bound = STREAM.bind(3, 129)
    assert (bound.nq, bound.nkv) == (3, 129) and bound.unbound() == STREAM
    with pytest.raises(ValueError, match="length-free"):
        STREAM.nq
    with pytest.raises(ValueError, match="Window.*needs a grid"):
        pg.Spec(pg.Window(3), num_heads=1)
    with pytest.raises(ValueError, match="kv_shape.*needs a q_shape"):
        pg.Spec(pg.Causal(), kv_shape=8)
    with pytest.raises(ValueError, match="fixed lengths"):
        pg.Spec(pg.Causal(), 8).bind(9)
    routed = pg.Spec(pg.Routed(16, 3), num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="topk 3 exceeds the 2 key blocks"):
        routed.bind(32, 32)  # checked per call, against that call's key blocks
    assert pg.from_json(STREAM.to_json()) == STREAM


def test_compile_traces_once_for_every_length():
    """dynamic=True, fullgraph, forward and backward: eight prefill lengths, one graph. Then
    decoding and cross lengths: torch itself specialises a size of 1 and, having seen Nq == Nkv,
    duck-sizes them equal, so those add two graphs in all, never one per length."""
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def f(q, k, v):
        return pg.attention(q, k, v, STREAM) * 2

    def check(nq, nkv):
        q, k, v = _inputs(nq, nkv, grad=True)
        out = f(q, k, v)
        assert (out - 2 * _oracle(q, k, v, STREAM)).abs().max() < 1e-5
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    for n in PREFILL:
        check(n, n)
    assert counter.frame_count == 1
    for nq, nkv in MIXED:
        check(nq, nkv)
    assert counter.frame_count == 3


def test_mark_dynamic_and_compiled_kernels_trace_once():
    """mark_dynamic on the sequence dim (no specialisation error), and a pg.compile kernel in
    the same graph: both go through the op."""
    counter = CompileCounterWithBackend("aot_eager")
    kernel = pg.compile(STREAM, backend="reference")

    @torch.compile(backend=counter, fullgraph=True)
    def f(q, k, v):
        return pg.attention(q, k, v, STREAM) + kernel(q, k, v)

    for n in (33, 48, 65, 80):
        q, k, v = _inputs(n, n)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
        assert (f(q, k, v) - 2 * _oracle(q, k, v, STREAM)).abs().max() < 1e-5
    assert counter.frame_count == 1


FRESH = textwrap.dedent("""
    import sys, torch, patterngen as pg
    path, kind = sys.argv[1], sys.argv[2]
    q = torch.randn(2, 4, 77, 16); k = torch.randn(2, 2, 91, 16); v = torch.randn(2, 2, 91, 16)
    if kind == "export":
        out = torch.export.load(path).module()(q, k, v)
    else:
        out = torch._inductor.aoti_load_package(path)(q, k, v)
    spec = pg.Spec((pg.Sink(4) | pg.Band(15)) & pg.Causal(), 77, 91, num_heads=4, num_kv_heads=2, head_dim=16)
    mask = pg.dense_mask(spec)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    print("ERR", float((out - 2 * ref).abs().max()))
""")


class _Model(torch.nn.Module):
    def forward(self, q, k, v):
        return pg.attention(q, k, v, STREAM) * 2


def _exported():
    nq, nkv = torch.export.Dim("nq", min=2, max=4096), torch.export.Dim("nkv", min=2, max=4096)
    return torch.export.export(_Model(), tuple(_inputs(40, 48)),
                               dynamic_shapes=({2: nq}, {2: nkv}, {2: nkv}))


def _fresh_process(path, kind) -> float:
    """Run the artifact in a new interpreter that imports only torch and patterngen."""
    done = subprocess.run([sys.executable, "-c", FRESH, str(path), kind], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split("ERR")[-1])


def test_export_carries_the_spec_into_a_fresh_process(tmp_path):
    ep = _exported()
    assert STREAM.to_json() in str(ep.graph_module.code)  # the spec itself, not a process-local key
    torch.export.save(ep, tmp_path / "pg.pt2")
    assert _fresh_process(tmp_path / "pg.pt2", "export") < 1e-5


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    path = torch._inductor.aoti_compile_and_package(_exported(), package_path=str(tmp_path / "pg_aoti.pt2"))
    assert _fresh_process(path, "aoti") < 1e-5


def test_decode_calls_plan_nothing_and_caches_stay_bounded():
    """A decoding loop (one query, a new key length every step) on the reference path: no plan
    per step, and every cache within its documented size."""
    before = op.cache_entries()
    for n in range(1, 301):
        q, k, v = _inputs(1, n)
        pg.attention(q, k, v, STREAM)
    after = op.cache_entries()
    assert after["plans"] == before["plans"]  # the small-call path builds no plan
    from patterngen import registry
    from patterngen.ir.spec import _bound
    assert after["bound_specs"] <= _bound.cache_info().maxsize
    assert after["specs"] <= registry.MAX_SPECS and after["plans"] <= op.MAX_PLANS
    assert after["kernels"] <= dispatch.MAX_KERNELS
