"""Length-generic kernels: one length-free spec (no q_shape), one generated kernel per
(pattern, tiling), run at random lengths under TRITON_INTERPRET=1.

Each spec below is built once per run (`kernels`); every drawn (nq, nkv), nq < nkv, == and
>, ragged and whole tiles, runs its forward and backward against float64 attention over the
oracle's mask of `spec.bind(nq, nkv)`, and the fixed-length spec of those lengths must render
the very same module (so the lengths never enter the kernel text).
"""
import functools
import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import dense_attention
from tests.strategies import scaled

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
from patterngen.backends.triton import TritonBackward, TritonForward, TritonHeads, backward_tiling  # noqa: E402
from patterngen.backends.triton.tables import LENGTH_TABLES, LengthCache  # noqa: E402

ROUTED = pg.Routed(32, 2, causal=True)
# name -> (length-free spec, tiling); small heads and head dim keep the interpreter quick
CASES = {
    "causal": (pg.Spec(pg.Causal(), num_heads=2, num_kv_heads=1, head_dim=16), pg.Tiling(32, 32)),
    "band&causal": (pg.Spec(pg.Band(40) & pg.Causal(), num_heads=2, head_dim=16), pg.Tiling(16, 32)),
    "sinks+band (decode tiles)": (pg.Spec((pg.Sink(4) | pg.Band(50)) & pg.Causal(), num_heads=2, num_kv_heads=1,
                                          head_dim=16), pg.Tiling(16, 64)),
    "full": (pg.Spec(pg.Full(), num_heads=2, num_kv_heads=1, head_dim=16), pg.Tiling(32, 32)),
    "strided&causal": (pg.Spec(pg.Strided(3, 1) & pg.Causal(), num_heads=2, num_kv_heads=1, head_dim=16),
                       pg.Tiling(32, 32)),
    "global": (pg.Spec(pg.Global(5), num_heads=2, num_kv_heads=1, head_dim=16), pg.Tiling(32, 32)),
    "heads, gqa": (pg.Spec(pg.Heads([pg.Causal(), (pg.Sink(4) | pg.Band(40)) & pg.Causal(),
                                     pg.Strided(4) & pg.Causal(), pg.Full()]), num_heads=4, num_kv_heads=2,
                           head_dim=16), pg.Tiling(32, 32)),
    "routed|band": (pg.Spec(ROUTED | (pg.Band(31) & pg.Causal()), num_heads=2, num_kv_heads=1, head_dim=16),
                    pg.Tiling(32, 32)),
}
CLOSED_FORM = ("causal", "band&causal", "sinks+band (decode tiles)", "full")


@functools.cache
def kernels(name: str) -> tuple[TritonForward, TritonBackward]:
    """The forward and backward of one case, built once per run (as the op builds them)."""
    spec, tiling = CASES[name]
    return TritonForward(spec, tiling), TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim,
                                                                                            spec)))


def inputs(spec, nq, nkv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, spec.num_heads, nq, spec.head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, spec.num_kv_heads, nkv, spec.head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def block_indices(spec, q, k, use_route: bool, seed: int):
    """pg.route's choice, or random blocks with duplicates and unused (-1) slots."""
    if use_route:
        return pg.route(q, k, ROUTED.block, ROUTED.topk, causal=True)
    nqb, nkb = -(-q.shape[2] // ROUTED.block), -(-k.shape[2] // ROUTED.block)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, nkb, (1, spec.num_kv_heads, nqb, ROUTED.topk), generator=g)


def check_against_oracle(name, nq, nkv, seed, use_route=False, dtype=torch.float32, tol=1e-4):
    spec, tiling = CASES[name]
    fwd, bwd = kernels(name)
    bound = spec.bind(nq, nkv)
    q, k, v = inputs(spec, nq, nkv, seed, dtype)
    idx = block_indices(spec, q, k, use_route, seed) if spec.routed is not None else None
    out, lse = fwd(q, k, v, block_indices=idx)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, ref_lse = dense_attention(*leaves, bound, idx)
    assert (out.double() - ref).abs().max() < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite].detach(), atol=tol, rtol=0)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref.backward(dout.double())
    grads = bwd(q, k, v, out, lse, dout, block_indices=idx)
    for got, leaf in zip(grads, leaves):
        assert (got.double() - leaf.grad).abs().max() < tol * 10
    # the fixed-length spec of these lengths renders the same modules: no length in the text
    fixed = TritonForward(bound, tiling)
    assert fixed.module is fwd.module
    assert TritonBackward(TritonForward(bound, bwd.fwd.tiling)).module is bwd.module
    return fwd


lengths = st.integers(1, 300)


@pytest.mark.parametrize("name", [n for n in CASES if n != "routed|band"])
@settings(max_examples=scaled(4), deadline=None)
@given(nq=lengths, nkv=lengths, seed=st.integers(0, 2**16))
@example(nq=1, nkv=300, seed=0)
@example(nq=300, nkv=33, seed=1)
def test_one_kernel_any_length(name, nq, nkv, seed):
    """Forward and backward of one length-free kernel equal the bound spec's oracle."""
    fwd = check_against_oracle(name, nq, nkv, seed)
    if name in CLOSED_FORM:  # the walk needs no table: none is planned for a forward call
        assert fwd.walk.name == "closed_form"
        assert "groups" not in vars(fwd.lengths(nq, nkv))


@settings(max_examples=scaled(5), deadline=None)
@given(nq=lengths, nkv=st.integers(33, 300), use_route=st.booleans(), seed=st.integers(0, 2**16))
@example(nq=300, nkv=33, use_route=False, seed=0)
def test_routed_any_length(nq, nkv, use_route, seed):
    """Routed blocks (pg.route or random) on a length-free spec: block indices
    [B, H, ceil(nq / block), topk] per call; topk fits from two key blocks on."""
    check_against_oracle("routed|band", nq, nkv, seed, use_route)


def test_fp16_and_the_edges():
    """fp16, and the lengths at tile edges: 1, a tile, a tile plus one, one kv tile short."""
    for nq, nkv in ((1, 1), (16, 64), (17, 65), (64, 63), (2, 129)):
        check_against_oracle("sinks+band (decode tiles)", nq, nkv, nq + nkv, dtype=torch.float16, tol=2e-2)


def test_one_source_per_kernel(tmp_path, monkeypatch):
    """Kernels of one length-free spec, and the fixed specs of any lengths, share one file each
    in a fresh kernel cache (one forward, one backward per case)."""
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    for name, (spec, tiling) in CASES.items():
        before = set((tmp_path / "kernels").glob("*.py")) if (tmp_path / "kernels").exists() else set()
        for s in (spec, spec.bind(33, 33), spec.bind(40, 300), spec.bind(300, 40), spec.bind(64, 64)):
            TritonBackward(TritonForward(s, tiling))
        new = set((tmp_path / "kernels").glob("*.py")) - before
        assert len(new) == 2, f"{name}: {len(new)} kernel sources for one pattern and tiling"


def test_closed_form_walks_and_tables():
    """Sequence patterns walk closed-form segments at every length (sample-checked); tables
    are kept for at most LENGTH_TABLES lengths, least recently used dropped."""
    for name in CLOSED_FORM:
        spec, tiling = CASES[name]
        assert TritonForward(spec, tiling).walk.name == "closed_form", name
    assert TritonForward(*CASES["strided&causal"]).walk.name == "table"
    made = []
    cache = LengthCache(lambda nq, nkv: made.append((nq, nkv)) or (nq, nkv), size=3)
    for n in (1, 2, 3, 1, 4, 5):
        assert cache.get(n, n) == (n, n)
    assert len(cache) == 3 and made == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    assert LENGTH_TABLES >= 8 and kernels("causal")[0]._cache.size == LENGTH_TABLES


LAUNCHED = ("attention_fwd", "merge_splits", "bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq",
            "compact_heads", "attention_fwd_heads", "attention_bwd_dq_heads", "attention_bwd_dkdv_heads")
CHANGING = {"nq", "nkv", "num_q_tiles", "num_kv_tiles", "num_splits", "batch", "rows"}
"""Kernel arguments that change with the call's lengths, batch or kv splits: Triton must not
specialise on them (value 1, multiples of 16), or a new length re-JITs the same source (seen
on an H200: merge_splits recompiled at the first length that is a multiple of 16)."""


def _unspecialised(kernel) -> set[str]:
    names = getattr(kernel, "do_not_specialize", None)  # a JITFunction
    if names is None:  # under the interpreter
        names = kernel.kwargs.get("do_not_specialize") or []
    params = list(inspect.signature(kernel.fn).parameters)
    return {params[n] if isinstance(n, int) else n for n in names}


def test_length_arguments_are_not_specialised():
    """Every launched kernel of the forward, backward and head-routed modules leaves the
    arguments that change between calls unspecialised: one compilation per variant."""
    from patterngen.backends.triton.heads import TritonHeads
    modules = [k.module for name in ("causal", "strided&causal", "routed|band") for k in kernels(name)]
    spec = pg.Spec(pg.Heads([pg.Causal(), pg.Band(20) & pg.Causal()]), num_heads=2, head_dim=16)
    modules.append(TritonHeads(spec, pg.Tiling(16, 16)).module)
    seen = set()
    for module in modules:
        for name in LAUNCHED:
            if hasattr(module, name):
                kernel = getattr(module, name)
                params = set(inspect.signature(kernel.fn).parameters)
                missing = (params & CHANGING) - _unspecialised(kernel)
                assert not missing, f"{name} specialises on {sorted(missing)}"
                seen.add(name)
    assert seen == set(LAUNCHED), f"kernels not checked: {set(LAUNCHED) - seen}"


def test_lengths_are_checked():
    spec = pg.Spec(pg.Causal(), num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="flat"):
        TritonForward(spec, pg.Tiling((4, 4), (4, 4)))
    fixed = TritonForward(spec.bind(40, 40), pg.Tiling(16, 16))
    q = torch.randn(1, 1, 41, 16)
    with pytest.raises(ValueError, match="nq=40"):
        fixed(q, q, q)
    fwd, bwd = kernels("causal")  # no key or no query: zeros and lse -inf, nothing launched
    q, k, v = inputs(CASES["causal"][0], 5, 0, 0)
    out, lse = fwd(q, k, v)
    assert (out == 0).all() and torch.isinf(lse).all()
    assert all((g == 0).all() for g in bwd(q, k, v, out, lse, out))


@settings(max_examples=scaled(3), deadline=None)
@given(nq=st.integers(1, 120), nkv=st.integers(1, 120), seed=st.integers(0, 2**16))
def test_head_routed_any_length(nq, nkv, seed):
    """Head-routed (MoH) kernels of a length-free spec: only the chosen (token, head) rows,
    equal to all heads then zeroing the others."""
    spec = pg.Spec(pg.Heads([pg.Causal(), (pg.Sink(2) | pg.Band(20)) & pg.Causal()]), num_heads=2, head_dim=16)
    heads = _heads(spec)
    q, k, v = inputs(spec, nq, nkv, seed)
    idx = torch.randint(-1, 2, (1, nq, 2), generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(1, 2, nq, dtype=torch.bool)
    for h in range(2):
        chosen[:, h] = (idx == h).any(-1)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, ref_lse = dense_attention(*leaves, spec.bind(nq, nkv))
    ref = ref * chosen[..., None]
    out, lse = heads.forward(q, k, v, idx)
    assert (out.double() - ref).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse) | ~chosen)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    for got, leaf in zip(heads.backward(q, k, v, out, lse, dout, idx), leaves):
        assert (got.double() - leaf.grad).abs().max() < 1e-3


@functools.cache
def _heads(spec):
    return TritonHeads(spec, pg.Tiling(16, 16))


@settings(max_examples=scaled(25), deadline=None)
@given(st.data(), st.sampled_from([(16, 16), (32, 128), (128, 32), (16, 64)]))
def test_closed_form_tables_agree_with_the_analysis(data, tiles):
    """From its second length on, a length-free spec's tables come from the closed-form segments
    (torch arithmetic, no tile analysis): the same visited tile pairs per group, forward and
    transposed, at any lengths, a tile full only where the analysis finds it full."""
    from patterngen.backends.triton.ranges import closed_form
    from patterngen.backends.triton.tables import LengthTables
    from tests.strategies import patterns
    assert closed_form(pg.Causal(), *tiles) is not None  # so that the draws below are not all skipped
    pattern = data.draw(patterns((300,), (300,), window=False, depth=1))
    code = closed_form(pattern, *tiles)
    if code is None:  # no closed form (a stride): the analysis plans every length
        return
    free = pg.Spec(pattern, head_dim=16)
    for _ in range(3):
        nq, nkv = data.draw(st.integers(1, 700)), data.draw(st.integers(1, 700))
        args = (free.bind(nq, nkv), pg.Tiling(*tiles), [pattern], torch.zeros(1, 1, dtype=torch.long),
                torch.zeros(1, dtype=torch.bool))
        exact, fast = LengthTables(*args), LengthTables(*args, segments=[code])
        (a,), (b,) = exact.groups, fast.groups
        assert torch.equal(a.q_ptr, b.q_ptr) and torch.equal(a.kv_tiles, b.kv_tiles)
        assert not (b.full & ~a.full).any()
        if torch.equal(a.full, b.full):
            for x, y in zip(exact.transposed, fast.transposed):
                assert torch.equal(x, y)


def test_lengths_after_the_first_plan_from_segments():
    """The launcher takes the segments from a spec's second length on (one length: no sympy)."""
    spec, tiling = CASES["sinks+band (decode tiles)"]
    fwd = TritonForward(spec, tiling)
    assert fwd.lengths(40, 300).segments is None
    assert fwd.lengths(41, 300).segments is not None and fwd.lengths(41, 300).segments == fwd._segments
