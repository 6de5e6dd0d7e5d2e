"""Generated Triton kernels: exact against the dense oracle under TRITON_INTERPRET=1,
and compiled for real GPUs (sm_80, sm_90) without running them."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import cubin_resources
from tests.strategies import scaled

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
from patterngen.backends.reference import reference_attention  # noqa: E402
from patterngen.backends.triton import KernelConfig, TritonBackward, TritonForward, backward_tiling  # noqa: E402
from patterngen.backends.triton.cache import write_source  # noqa: E402


def dense_reference(q, k, v, spec, scale=None):
    """SDPA semantics with the oracle's mask; rows with no visible key give 0 and lse -inf."""
    mask = pg.dense_mask(spec)
    g = spec.num_heads // spec.num_kv_heads
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).float(), lse.float()


def pow2_tiles(ndim: int):
    """Power-of-two tile volumes >= 16 (tl.dot), flat or boxes."""
    flat = st.sampled_from([16, 32]).map(lambda t: (t, t))
    if ndim == 1:
        return st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32]))
    box = st.lists(st.sampled_from([1, 2, 4, 8]), min_size=ndim, max_size=ndim).filter(
        lambda b: 16 <= math.prod(b) <= 32).map(tuple)
    return st.one_of(flat, st.tuples(box, box))


@st.composite
def specs(draw):
    ndim = draw(st.sampled_from([1, 1, 2, 3]))
    if ndim == 1:
        nq = draw(st.integers(1, 90))
        nkv = draw(st.sampled_from([nq, draw(st.integers(1, 90))]))
        shape, kv_shape = (nq,), (nkv,)
    else:
        shape = tuple(draw(st.integers(2, 9)) for _ in range(ndim))
        kv_shape = shape
    nkv = math.prod(kv_shape)

    def window():
        size, stride, dil, causal = [], [], [], []
        for n in shape:
            d = draw(st.integers(1, max(1, n // 2)))
            w = n // d if n // d < 2 else draw(st.integers(2, n // d))
            size.append(w), stride.append(draw(st.integers(1, w))), dil.append(d), causal.append(draw(st.booleans()))
        return pg.Window(tuple(size), tuple(stride), tuple(dil), tuple(causal))

    leaves = [lambda: pg.Causal(), lambda: pg.Band(draw(st.integers(0, 20)), draw(st.integers(0, 20))),
              lambda: pg.Sink(draw(st.integers(1, nkv))),
              lambda: pg.Strided(3, draw(st.integers(0, 2)), draw(st.sampled_from([1, 1, 5, 16]))),
              lambda: pg.Global(draw(st.integers(1, nkv))), lambda: pg.Full()]
    if shape == kv_shape:
        leaves += [window, window]

    def pattern(depth=0):
        if depth < 2 and draw(st.booleans()):
            a, b = pattern(depth + 1), pattern(depth + 1)
            return a | b if draw(st.booleans()) else a & b
        return draw(st.sampled_from(leaves))()

    num_kv_heads = draw(st.sampled_from([1, 2]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2]))
    pat = pg.Heads([pattern() for _ in range(num_heads)]) if draw(st.booleans()) else pattern()
    head_dim = draw(st.sampled_from([16, 24, 32]))
    tq, tk = draw(pow2_tiles(ndim))
    return pg.Spec(pat, shape, kv_shape, num_heads, num_kv_heads, head_dim), pg.Tiling(tq, tk)


@settings(max_examples=scaled(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(0, 2**16))
def test_forward_matches_oracle(case, seed):
    spec, tiling = case
    torch.manual_seed(seed)
    q = torch.randn(2, spec.num_heads, spec.nq, spec.head_dim)
    k = torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim)
    v = torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim)
    out, lse = TritonForward(spec, tiling)(q, k, v, scale=0.3)
    ref_out, ref_lse = dense_reference(q, k, v, spec, scale=0.3)
    assert (out - ref_out).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4, rtol=0)


@settings(max_examples=scaled(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(0, 2**16))
def test_backward_matches_reference(case, seed):
    """dq, dk, dv of the generated backward kernels equal autograd through the reference
    (GQA sums over the query heads of each kv head; rows with no visible key give 0)."""
    spec, tiling = case
    torch.manual_seed(seed)
    q = torch.randn(2, spec.num_heads, spec.nq, spec.head_dim, requires_grad=True)
    k = torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim, requires_grad=True)
    v = torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim, requires_grad=True)
    forward = TritonForward(spec, tiling)
    out, lse = forward(q.detach(), k.detach(), v.detach(), scale=0.3)
    dout = torch.randn_like(out)
    dq, dk, dv = TritonBackward(forward)(q.detach(), k.detach(), v.detach(), out, lse, dout, scale=0.3)
    ref, _ = reference_attention(q, k, v, spec, scale=0.3)
    ref.backward(dout)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert (got - want).abs().max() < 1e-4


@settings(max_examples=scaled(12), deadline=None)
@given(st.integers(1, 80), st.sampled_from([None, 20, 100]), st.integers(1, 4), st.booleans(),
       st.sampled_from(["routed", "routed|band", "heads"]), st.integers(0, 2**16))
def test_routed_matches_oracle(nq, nkv, topk, causal, form, seed):
    """Run-time block indices, with duplicates and unused (-1) slots; never a block twice;
    the backward kernels' gradients equal the reference's."""
    nkv = nq if nkv is None else nkv
    routed = pg.Routed(16, min(topk, -(-nkv // 16)), causal=causal)
    pattern = {"routed": routed, "routed|band": routed | (pg.Band(9) & pg.Causal()),
               "heads": pg.Heads([routed | pg.Sink(min(2, nkv)), pg.Causal()])}[form]
    spec = pg.Spec(pattern, nq, nkv, num_heads=2, num_kv_heads=1, head_dim=16)
    torch.manual_seed(seed)
    q, k, v = torch.randn(2, 2, nq, 16), torch.randn(2, 1, nkv, 16), torch.randn(2, 1, nkv, 16)
    idx = torch.randint(-1, -(-nkv // 16), (2, 1, -(-nq // 16), routed.topk))
    forward = TritonForward(spec)
    out, lse = forward(q, k, v, block_indices=idx)
    mask = pg.dense_mask(spec, idx)
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(torch.logsumexp(s, -1)))
    dout = torch.randn_like(out)
    grads = TritonBackward(forward)(q, k, v, out, lse, dout, block_indices=idx)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference_attention(*leaves, spec, block_indices=idx)[0].backward(dout)
    for got, leaf in zip(grads, leaves):
        assert (got - leaf.grad).abs().max() < 1e-4


def check_routed(spec, tiling, q, k, v, idx):
    """Forward (out, lse) against dense attention under the oracle's mask of the run-time
    blocks, and dq, dk, dv of the backward (dK/dV on the forward's tiling, dQ on its transpose)
    against autograd through the reference."""
    bound = spec.bind(q.shape[2], k.shape[2]) if spec.length_free else spec
    forward = TritonForward(spec, tiling)
    out, lse = forward(q, k, v, block_indices=idx)
    g = spec.num_heads // spec.num_kv_heads
    kd, vd = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = (q.double() @ kd.transpose(-1, -2) / math.sqrt(spec.head_dim)).masked_fill(~pg.dense_mask(bound, idx),
                                                                                    float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    assert (out - torch.softmax(s, -1).nan_to_num(0.0) @ vd).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=0)  # none finite: nothing routed
    dout = torch.randn_like(out)
    grads = TritonBackward(forward)(q, k, v, out, lse, dout, block_indices=idx)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference_attention(*leaves, bound, block_indices=idx)[0].backward(dout)
    for got, leaf in zip(grads, leaves):
        assert (got - leaf.grad).abs().max() < 1e-4


@settings(max_examples=scaled(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([32, 64]), st.integers(1, 150), st.sampled_from([None, 45, 150]), st.integers(1, 3),
       st.booleans(), st.sampled_from(["routed", "routed|band", "heads"]), st.sampled_from([16, 32]),
       st.sampled_from([16, 32]), st.sampled_from([1, 2]), st.integers(0, 2**16))
def test_routed_blocks_larger_than_tiles(block, nq, nkv, topk, causal, form, tq, tk, gqa, seed):
    """A routed block of several kernel tiles (q and kv tiles of their own sizes) is walked as
    its tiles, each once; lengths need not be multiples of the block; GQA shares the routing."""
    nkv = nq if nkv is None else nkv
    routed = pg.Routed(block, min(topk, -(-nkv // block)), causal=causal)
    pattern = {"routed": routed, "routed|band": routed | (pg.Band(20) & pg.Causal()),
               "heads": pg.Heads([routed | pg.Sink(min(5, nkv))] * gqa + [pg.Causal()] * gqa)}[form]
    spec = pg.Spec(pattern, nq, nkv, num_heads=2 * gqa, num_kv_heads=2, head_dim=16)
    torch.manual_seed(seed)
    q, k, v = torch.randn(2, 2 * gqa, nq, 16), torch.randn(2, 2, nkv, 16), torch.randn(2, 2, nkv, 16)
    idx = torch.randint(-1, -(-nkv // block), (2, 2, -(-nq // block), routed.topk))
    check_routed(spec, pg.Tiling(tq, tk), q, k, v, idx)


@pytest.mark.parametrize("causal", [False, True])
def test_routed_sub_tiles_length_free_and_wide_heads(causal):
    """A length-free Routed(64) spec on 16 x 32 tiles at head dim 80 (a padded BLOCK_D), called
    at two lengths, with duplicate and unused slots and a q block routed to no block."""
    spec = pg.Spec(pg.Routed(64, 3, causal=causal) | pg.Sink(3), num_heads=2, num_kv_heads=1, head_dim=80)
    torch.manual_seed(0)
    for nq, nkv, idx in ((150, 150, [[0, 2, 0], [1, -1, 1], [-1, -1, -1]]), (40, 170, [[2, 1, 0]])):
        q, k, v = torch.randn(1, 2, nq, 80), torch.randn(1, 1, nkv, 80), torch.randn(1, 1, nkv, 80)
        check_routed(spec, pg.Tiling(16, 32), q, k, v, torch.tensor([[idx]]))


def test_strided_inputs_and_empty_rows():
    """Non-contiguous q/k/v (a transposed layout) and rows that see nothing (Nq > Nkv, causal)."""
    spec = pg.Spec(pg.Causal(), 40, 24, num_heads=2, head_dim=16)
    q = torch.randn(1, 40, 2, 16).transpose(1, 2)
    k = torch.randn(1, 24, 2, 16).transpose(1, 2)
    v = torch.randn(1, 2, 16, 24).transpose(2, 3)
    out, lse = TritonForward(spec, pg.Tiling(16, 16))(q, k, v)
    ref_out, ref_lse = dense_reference(q, k, v, spec)
    assert (out - ref_out).abs().max() < 1e-5
    assert torch.isinf(lse[:, :, :16]).all() and (out[:, :, :16] == 0).all()


def test_tiling_must_suit_tl_dot():
    with pytest.raises(ValueError, match="power of two"):
        TritonForward(pg.Spec(pg.Causal(), 64), pg.Tiling(24, 16))


def test_cache_rebuilds_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    kernel = TritonForward(pg.Spec(pg.Band(3), 32, head_dim=16), pg.Tiling(16, 16))
    (path,) = (tmp_path / "kernels").glob("*.py")
    assert str(tmp_path) not in path.read_text() and os.path.expanduser("~") not in path.read_text()
    path.write_text("garbage")
    assert write_source(kernel.source) == path and path.read_text() == kernel.source


FREE = pg.Spec((pg.Sink(4) | pg.Band(255)) & pg.Causal(), num_heads=8, num_kv_heads=2, head_dim=128)
GPU_CASES = [
    ("causal 128x64 d128", pg.Spec(pg.Causal(), 4096, num_heads=8, num_kv_heads=2, head_dim=128), pg.Tiling(128, 64)),
    ("sinks+window d128", pg.Spec((pg.Sink(4) | pg.Band(1023)) & pg.Causal(), 4096, head_dim=128), pg.Tiling(64, 64)),
    ("2-D NA box 8x8 d128", pg.Spec(pg.Window((13, 13)), (64, 64), head_dim=128), pg.Tiling((8, 8), (8, 8))),
    ("3-D GNA 2x4x8 d128", pg.Spec(pg.Window((6, 12, 12), stride=(4, 4, 4)), (12, 24, 40), head_dim=128),
     pg.Tiling((2, 4, 8), (2, 4, 8))),
    ("per-head shards d128", pg.Spec(pg.Heads([pg.Causal(), (pg.Band(256) | pg.Strided(64, 3)) & pg.Causal()]),
                                     2048, num_heads=2, head_dim=128), pg.Tiling(64, 64)),
    ("head dim 64", pg.Spec(pg.Band(100, 100), 1000, head_dim=64), pg.Tiling(128, 64)),
    ("head dim 96", pg.Spec(pg.Causal(), 1000, head_dim=96), pg.Tiling(64, 64)),
    ("head dim 256", pg.Spec(pg.Causal(), 1000, head_dim=256), pg.Tiling(64, 32)),
    ("routed top-8 d128", pg.Spec(pg.Routed(64, 8, causal=True) | (pg.Band(63) & pg.Causal()), 4096, num_heads=4,
                                  num_kv_heads=2, head_dim=128), pg.Tiling(64, 64)),
    # MoBA: a 512-token routed block walked as 64 x 64 tiles (512 x 512 tiles needed 655,360 B of shared memory)
    ("MoBA routed 512 as 64x64 d128", pg.Spec(pg.Routed(512, 3, causal=True), 8192, num_heads=32, num_kv_heads=8,
                                              head_dim=128), pg.Tiling(64, 64)),
    # length-free (lengths are run-time arguments): a prefill and a 16-row decode tiling, 128 x 64
    # (the register budget of the tiling policy keeps 128 x 128 out at head dim 128)
    ("length-free prefill 128x64 d128", FREE, pg.Tiling(128, 64)),
    ("length-free decode 16x64 d128", FREE, pg.Tiling(16, 64)),
]


BACKWARD_CASES = [c for c in GPU_CASES if c[1].head_dim == 128]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name,spec,tiling", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_compiles_for_gpu(name, spec, tiling, arch):
    backward = TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim, spec)))
    for compiled in backward.cross_compile(arch, torch.bfloat16):
        regs, stack = cubin_resources(compiled)
        print(f"{name} {compiled.name} sm_{arch}: {regs} registers, {stack} B stack, {compiled.shared} B shared")
        assert compiled.shared <= (163 if arch == 80 else 227) * 1024
        assert stack == 0, f"register spills: {stack} bytes of stack"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name,spec,tiling", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_compiles_for_gpu(name, spec, tiling, arch):
    kernel = TritonForward(spec, tiling)
    compiled = kernel.cross_compile(arch, torch.bfloat16)
    regs, stack = cubin_resources(compiled)
    print(f"{name} sm_{arch}: {regs} registers, {stack} B stack, {compiled.shared} B shared, "
          f"{kernel.config.num_warps} warps")
    assert compiled.shared <= (163 if arch == 80 else 227) * 1024
    if spec.head_dim == 128:
        assert stack == 0, f"register spills: {stack} bytes of stack"


def test_compile_triton_backend_matches_attention():
    spec = pg.Spec((pg.Sink(4) | pg.Band(20)) & pg.Causal(), 70, num_heads=2, num_kv_heads=1, head_dim=16)
    q, k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 1, 70, 16), torch.randn(1, 1, 70, 16)
    kernel = pg.compile(spec, backend="triton", tiling=pg.Tiling(16, 16))
    out, lse = kernel(q, k, v, return_lse=True)
    assert TritonForward(spec, pg.Tiling(16, 16)).segments is not None  # sinks + window: closed form, no table
    ref, ref_lse = pg.attention(q, k, v, spec, return_lse=True)
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    with pytest.raises(ValueError, match="head_dim"):
        kernel(q[..., :8], k[..., :8], v[..., :8])


def test_autotune_candidates_and_cache(tmp_path, monkeypatch):
    """Candidates follow the caller's ranking and fit shared memory; without a GPU the first
    is taken, without a ranking the policy's default; a stored winner is reused (on a GPU
    machine the first call times the candidates and writes it)."""
    from patterngen.analysis.tiling import default_tiling
    from patterngen.backends.triton import autotune
    from patterngen.sim import ranked_kernel_tilings
    spec = pg.Spec(pg.Window((9, 9), stride=(8, 8)), (32, 32), head_dim=128)
    ranked = ranked_kernel_tilings(spec)
    cands = autotune.candidates(spec, shared_limit=100 * 1024, tilings=ranked)
    assert cands and all(autotune.shared_bytes(math.prod(c.tiling.q_tile) if isinstance(c.tiling.q_tile, tuple)
                                               else c.tiling.q_tile, 64, 128, c.config.num_stages) <= 100 * 1024
                         for c in cands if c.tiling.kv_tile in (64, (8, 8)))
    assert [c.tiling for c in cands] == sorted((c.tiling for c in cands), key=ranked.index)
    best = cands[0].tiling
    assert isinstance(best.q_tile, tuple)  # boxes beat flat rows for a 2-D neighbourhood
    cpu = autotune.tuned_kernel(spec, torch.zeros(1), None, None, tilings=ranked)
    assert cpu.q_grid.tile == best.q_tile  # deterministic without a GPU
    assert {c.tiling for c in autotune.candidates(spec)} == {default_tiling(spec)}
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    path = tmp_path / "tuning" / "x.json"
    autotune._store(path, {"q_tile": [8, 8], "kv_tile": [8, 8], "config": {"num_warps": 8, "num_stages": 3}})
    assert autotune._load(path) == autotune.LaunchCandidate(pg.Tiling((8, 8), (8, 8)), KernelConfig(8, 3))
    path.write_text("{corrupt")
    assert autotune._load(path) is None


def test_op_backward_uses_generated_kernels():
    """The custom op's CUDA backward takes the generated kernels (here run by the interpreter)."""
    from patterngen import dispatch
    from patterngen.registry import spec_key
    spec = pg.Spec(pg.Window((5, 5)), (8, 8), num_heads=2, num_kv_heads=1, head_dim=16)
    key = spec_key(spec)
    backward = dispatch.kernel(key, "backward")
    assert isinstance(backward, TritonBackward)
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    out, lse = dispatch.kernel(key, "forward")(q, k, v)
    dout = torch.randn_like(out)
    got = backward(q, k, v, out, lse, dout)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref, _ = reference_attention(qr, kr, vr, spec)
    ref.backward(dout)
    for g, w in zip(got, (qr.grad, kr.grad, vr.grad)):
        assert (g - w).abs().max() < 1e-4
    assert isinstance(dispatch.kernel(spec_key(pg.Spec(pg.Routed(16, 1), 32, head_dim=16)), "backward"), TritonBackward)


def test_default_kernel_tiling_uses_boxes_on_grids():
    """Without a tiling, grids get 64-token boxes (fast analysis, few tiles per neighbourhood)."""
    spec = pg.Spec(pg.Window((5, 5)), (16, 16), head_dim=16)
    kernel = TritonForward(spec)
    assert kernel.q_grid.tile == (8, 8) and kernel.kv_grid.tile == (8, 8)
    q, k, v = (torch.randn(1, 1, 256, 16) for _ in range(3))
    out, _ = kernel(q, k, v)
    assert (out - dense_reference(q, k, v, spec)[0]).abs().max() < 1e-4
