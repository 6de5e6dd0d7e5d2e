"""GPU checks: `pg.attention` on a CUDA device (the generated Triton forward and backward
kernels) against the same op in float64 (the exact reference backend, which the CPU tests
hold to the dense-mask oracle), and against dense SDPA with the oracle's mask.

Skipped without CUDA. `make gpu-check` runs this file with pytest where pytest is
installed and as a script (`python tests/test_gpu.py`) where it is not.
"""
from __future__ import annotations

import math
import os

import torch

import patterngen as pg
from patterngen import dispatch

try:
    import pytest
except ImportError:  # the GPU machines may lack pytest: run as a script then
    pytest = None
else:
    pytestmark = [pytest.mark.gpu,
                  pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="needs a CUDA GPU and TRITON_INTERPRET unset")]

CASES = {
    "causal": pg.Spec(pg.Causal(), q_shape=1024, num_heads=4, num_kv_heads=2, head_dim=64),
    "sliding_window": pg.Spec(pg.Band(255) & pg.Causal(), q_shape=2048, num_heads=4, head_dim=128),
    "streaming": pg.Spec((pg.Sink(4) | pg.Band(127)) & pg.Causal(), q_shape=1000, num_heads=2, head_dim=64),
    "neighborhood_2d": pg.Spec(pg.Window((7, 9)), q_shape=(32, 48), num_heads=2, head_dim=64),
    "strided_3d": pg.Spec(pg.Window((4, 8, 8), stride=(2, 4, 4)), q_shape=(8, 16, 16), num_heads=2, head_dim=64),
    "per_head": pg.Spec(pg.Heads([pg.Causal(), pg.Band(63) & pg.Causal()]), q_shape=777, num_heads=2, head_dim=64),
    "s2_blocks": pg.Spec(pg.Heads([(pg.Band(255) | pg.Strided(8, 7 - h, block=64)) & pg.Causal() for h in range(2)]),
                         q_shape=3000, num_heads=2, head_dim=128),
    "swin_shifted": pg.Spec(pg.Blocks(7, shift=3), q_shape=(56, 56), num_heads=3, head_dim=32),
}
FREE = pg.Spec((pg.Sink(4) | pg.Band(255)) & pg.Causal(), num_heads=8, num_kv_heads=2, head_dim=128)
"""A length-free spec: one decode and one prefill kernel for every length below."""
FREE_LENGTHS = [(1, 1000), (7, 333), (1000, 1000), (640, 2600), (1, 4097), (1537, 1537)]
TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-2}  # TF32 dots in float32


def _inputs(spec: pg.Spec, dtype: torch.dtype, seed: int = 0, lengths=None):
    nq, nkv = lengths or (spec.nq, spec.nkv)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, spec.num_heads, nq, spec.head_dim, device="cuda", generator=g)
    k, v = (torch.randn(2, spec.num_kv_heads, nkv, spec.head_dim, device="cuda", generator=g)
            for _ in range(2))
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)]


def _run(spec, q, k, v, **kwargs):
    out = pg.attention(q, k, v, spec, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out, grads


def check_against_float64(name: str, dtype: torch.dtype, lengths=None) -> float:
    """Largest error of out, dq, dk, dv, relative to each tensor's largest magnitude."""
    spec = CASES[name] if lengths is None else FREE
    q, k, v = _inputs(spec, dtype, lengths=lengths)
    before = dispatch.calls.copy()
    out, grads = _run(spec, q, k, v)
    ran = {role: dispatch.calls[role, "triton"] - before[role, "triton"] for role in ("forward", "backward")}
    assert ran == {"forward": 1, "backward": 1}, f"{name} {dtype}: {pg.explain(spec, q, k)}"
    want, want_grads = _run(spec, *(t.detach().double().requires_grad_(True) for t in (q, k, v)))
    worst = 0.0
    for got, ref in zip((out, *grads), (want, *want_grads)):
        err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        worst = max(worst, err)
    assert math.isfinite(worst) and worst < TOL[dtype], f"{name} {dtype}: relative error {worst:.2e}"
    return worst


def check_against_sdpa(name: str) -> float:
    """The kernel's output against dense SDPA given the oracle's mask (an independent path)."""
    spec = CASES[name]
    q, k, v = (t.detach() for t in _inputs(spec, torch.float16))
    mask = pg.dense_mask(spec).to("cuda")
    g = spec.num_heads // spec.num_kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1), attn_mask=mask)
    err = (pg.attention(q, k, v, spec).float() - want).abs().max().item()
    assert err < 1e-2, f"{name}: |out - sdpa| = {err:.2e}"
    return err


if pytest is not None:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("name", list(CASES))
    def test_kernels_against_float64(name, dtype):
        check_against_float64(name, dtype)

    @pytest.mark.parametrize("name", list(CASES))
    def test_kernels_against_sdpa_with_the_oracle_mask(name):
        check_against_sdpa(name)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_length_free_kernels_every_length(dtype):
        check_length_free(dtype)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_serving_call_forms(dtype):
        check_serving(dtype)


def check_serving(dtype: torch.dtype) -> float:
    """Issue 14's call forms on the kernels, each against the float64 reference: softcap, ALiBi
    and learned sinks in a prefill and in a split-KV decode (one query, 8 heads x 2 entries
    leave most SMs idle; GQA-packed, four heads a program), a ragged decode (kv_lens, its piece
    table built on the device), and packed documents."""
    worst = 0.0
    slopes = torch.linspace(0.01, 0.2, FREE.num_heads, device="cuda")
    sinks = torch.linspace(-1.0, 1.0, FREE.num_heads, device="cuda")
    docs = torch.tensor([0, 700, 701, 2000], dtype=torch.int32, device="cuda")
    calls = [((600, 1500), dict(softcap=30.0, alibi_slopes=slopes, sinks=sinks)),
             ((1, 5000), dict(softcap=30.0, alibi_slopes=slopes, sinks=sinks)),
             ((3, 5000), dict(kv_lens=torch.tensor([5000, 1234], dtype=torch.int32, device="cuda"), sinks=sinks)),
             ((2000, 2000), dict(cu_seqlens_q=docs, cu_seqlens_k=docs))]
    for lengths, kwargs in calls:
        q, k, v = _inputs(FREE, dtype, lengths=lengths)
        if "cu_seqlens_q" in kwargs:
            q, k, v = (t.detach()[:1].requires_grad_(True) for t in (q, k, v))
        out, grads = _run(FREE, q, k, v, **kwargs)
        want, want_grads = _run(FREE, *(t.detach().double().requires_grad_(True) for t in (q, k, v)),
                                **{n: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
                                   for n, a in kwargs.items()})
        for got, ref in zip((out, *grads), (want, *want_grads)):
            err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            assert math.isfinite(err) and err < TOL[dtype], f"{lengths} {list(kwargs)} {dtype}: {err:.2e}"
            worst = max(worst, err)
    return worst


def check_length_free(dtype: torch.dtype) -> float:
    """One length-free spec at decode and prefill lengths: each against float64, and no kernel
    built past the first of each variant (decode, prefill) and role."""
    worst = max(check_against_float64(f"free {nq}x{nkv}", dtype, (nq, nkv)) for nq, nkv in FREE_LENGTHS)
    from patterngen.registry import spec_key
    built = {slot[1:] for slot in dispatch._KERNELS if slot[0] == spec_key(FREE)}
    assert built <= {(role, var) for role in ("forward", "backward") for var in ("decode", "prefill")}, built
    return worst


def _report(label: str, check, what: str) -> bool:
    """Run one check as the script does: print its figure or why it failed."""
    try:
        print(f"{label} {what} {check():.2e}")
        return True
    except Exception as exc:  # report every case, then fail
        print(f"{label} FAILED: {type(exc).__name__}: {exc}")
        return False


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    results = []
    for case in CASES:
        for dt in (torch.float16, torch.bfloat16):
            results.append(_report(f"{case:16s} {str(dt):15s}", lambda: check_against_float64(case, dt),
                                   "relative error"))
        results.append(_report(f"{case:16s} vs sdpa         ", lambda: check_against_sdpa(case), "max error"))
    for dt in (torch.float16, torch.bfloat16):
        for label, check in (("length-free", check_length_free), ("serving", check_serving)):
            results.append(_report(f"{label:16s} {str(dt):15s}", lambda: check(dt), "relative error"))
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    raise SystemExit(0 if all(results) else 1)
