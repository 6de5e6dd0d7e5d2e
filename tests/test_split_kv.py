"""Split-KV forward (issue 14 item 4): for a few queries against a long cache, each work item's
kv tiles are cut into `num_splits` shares walked by separate programs and merged by
log-sum-exp (`merge_splits`). Oracle: the dense attention (tests.helpers.oracle_attention)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as the other kernel tests

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import oracle_attention
from tests.strategies import scaled

pytestmark = pytest.mark.interpreter

SPECS = {  # one per walk that splits
    "closed_form": pg.Spec((pg.Sink(3) | pg.Band(40)) & pg.Causal(), num_heads=4, num_kv_heads=2, head_dim=16),
    "table": pg.Spec(pg.Strided(5, 2) | (pg.Band(9) & pg.Causal()), num_heads=2, head_dim=16),
}


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from patterngen.backends.triton import TritonForward
    out = {name: TritonForward(spec, pg.Tiling(16, 16)) for name, spec in SPECS.items()}
    assert {name: k.walk_name for name, k in out.items()} == {name: name for name in SPECS}
    return out


@settings(max_examples=scaled(20), deadline=None)
@given(st.sampled_from(sorted(SPECS)), st.integers(1, 20), st.integers(1, 160), st.integers(1, 9), st.booleans(),
       st.booleans(), st.integers(0, 2**16))
def test_split_kv_equals_the_oracle(kernels, walk, nq, nkv, splits, sinks, mods, seed):
    """Any split count (more splits than kv tiles too, which leaves some empty), rows that see
    nothing, sinks merged after the splits, softcap and ALiBi inside them."""
    spec = SPECS[walk]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, spec.num_heads, nq, 16, generator=g)
    k, v = (torch.randn(2, spec.num_kv_heads, nkv, 16, generator=g) for _ in range(2))
    s = torch.randn(spec.num_heads, generator=g) if sinks else None
    slopes = torch.rand(spec.num_heads, generator=g) * 0.2 if mods else None
    softcap = 3.0 if mods else None
    out, lse = kernels[walk](q, k, v, num_splits=splits, sinks=s, softcap=softcap, alibi_slopes=slopes)
    want_out, want_lse = oracle_attention(q.double(), k.double(), v.double(), spec.bind(nq, nkv), softcap,
                                          None if slopes is None else slopes.double(),
                                          None if s is None else s.double())
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)


def test_split_choice():
    from patterngen.backends.triton.launch import MAX_SPLITS, kv_splits
    assert kv_splits(32, 512, 132) == 5  # decoding 32 heads: every SM gets a program
    assert kv_splits(4, 512, 132) == MAX_SPLITS
    assert kv_splits(4, 3, 132) == 3  # never more than a row's kv tiles
    assert kv_splits(264, 512, 132) == 1 and kv_splits(4, 512, None) == 1  # a full grid; off CUDA


@pytest.mark.parametrize("arch", [80, 90])
def test_split_kernels_compile_for_gpu(arch):
    """The split-KV forward (decode tiles, head dim 128, bf16), also over pieces (VARLEN),
    compiles as the plain one does:
    pipelined, the same matmul instructions (16-row tiles take mma.sync on sm_90 too), no spill
    in a kv-tile step (one 4-byte value, the output's batch entry, is spilled around the loops on
    sm_90: one store and one load per program); and so does the merge."""
    pytest.importorskip("triton")
    from patterngen.backends.triton import TritonForward
    from patterngen.backends.triton.cross_compile import compile_generated
    from patterngen.backends.triton.launch import MERGE_ROWS
    from patterngen.backends.triton.sass import read
    spec = pg.Spec((pg.Sink(4) | pg.Band(4095)) & pg.Causal(), num_heads=32, num_kv_heads=8, head_dim=128)
    fwd = TritonForward(spec, pg.Tiling(16, 64))
    plain = read(fwd.cross_compile(arch, torch.bfloat16))
    for mods in ({"SPLIT_KV": True}, {"SPLIT_KV": True, "VARLEN": True}):
        r = read(fwd.cross_compile(arch, torch.bfloat16, mods=mods))
        print(f"{mods} sm_{arch}: {r.registers} registers, full step {r.full_tile} (plain {plain.full_tile})")
        assert r.step_spills == 0 and r.spill_ops <= 2 and r.pipelined and not r.serialized, r
        assert r.matmul == plain.matmul and r.full_tile <= plain.full_tile + 4, (r, plain)
    merge = compile_generated(fwd.source, "merge_splits", fwd.module.merge_splits.arg_names,
                              {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_R": MERGE_ROWS, "HAS_SINKS": True},
                              torch.bfloat16, arch, fwd.config_for(arch, 2), 128)
    assert read(merge).spill_ops == 0


@settings(max_examples=scaled(12), deadline=None)
@given(st.integers(1, 4), st.lists(st.tuples(st.integers(0, 70), st.integers(0, 30)), min_size=1, max_size=4),
       st.integers(1, 5), st.booleans(), st.integers(0, 2**16))
def test_pieces_in_one_launch(kernels, nq, entries, splits, sinks, seed):
    """`VARLEN`: batch entries with their own key lengths and offsets (decoding a ragged batch) in
    one launch, with and without kv splits; each entry equals the oracle on its own keys."""
    spec = SPECS["closed_form"]
    g = torch.Generator().manual_seed(seed)
    B, nkv = len(entries), 100
    q = torch.randn(B, spec.num_heads, nq, 16, generator=g)
    k, v = (torch.randn(B, spec.num_kv_heads, nkv, 16, generator=g) for _ in range(2))
    s = torch.randn(spec.num_heads, generator=g) if sinks else None
    segs = torch.tensor([[b, 0, nq, off, off + n] for b, (n, off) in enumerate(entries)], dtype=torch.int32)
    out, lse = kernels["closed_form"](q, k, v, num_splits=splits, sinks=s, pieces=(segs, nq))
    for b, (n, off) in enumerate(entries):
        if n == 0:
            want_out = torch.zeros(1, spec.num_heads, nq, 16, dtype=torch.float64)
            want_lse = torch.full((1, spec.num_heads, nq), float("-inf"), dtype=torch.float64)
            if sinks:
                want_lse = s.double()[None, :, None].expand_as(want_lse)
        else:
            want_out, want_lse = oracle_attention(q[b:b + 1].double(), k[b:b + 1, :, off:off + n].double(),
                                                  v[b:b + 1, :, off:off + n].double(), spec.bind(nq, n),
                                                  sinks=None if s is None else s.double())
        torch.testing.assert_close(out[b:b + 1].double(), want_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads, pack", [((8, 2), 4), ((8, 1), 4), ((6, 2), 1), ((4, 4), 1)])
def test_gqa_packed_decoding(heads, pack):
    """Decoding (one q tile holds every query): PACK query heads of a kv head share a program, so
    each kv tile is read once for them (8 q / 2 kv heads: 4 a program; 8 / 1: 4, two programs a kv
    head; a group of 3 or MHA: none), equal to the float64 reference with key lengths (one VARLEN
    launch), splits, sinks and ALiBi; a prefill (more queries than a q tile) is not packed."""
    pytest.importorskip("triton")
    from patterngen.backends.triton import TritonForward
    from patterngen.segments import length_segments
    H, Hkv = heads
    spec = pg.Spec((pg.Sink(3) | pg.Band(40)) & pg.Causal(), num_heads=H, num_kv_heads=Hkv, head_dim=16)
    kernel = TritonForward(spec, pg.Tiling(16, 16))
    assert kernel.walk_name == "closed_form" and kernel.gqa_pack(16) == pack and kernel.gqa_pack(17) == 1
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([150, 0, 37], dtype=torch.int32)
    for nq, splits in ((1, 1), (3, 4), (16, 2)):
        q = torch.randn(3, H, nq, 16, generator=g)
        k, v = (torch.randn(3, Hkv, 150, 16, generator=g) for _ in range(2))
        s, slopes = torch.randn(H, generator=g), torch.rand(H, generator=g) * 0.2
        out, lse = kernel(q, k, v, num_splits=splits, sinks=s, alibi_slopes=slopes,
                          pieces=(length_segments(q, k, lens), nq))
        want, want_lse = pg.attention(q.double(), k.double(), v.double(), spec, return_lse=True, kv_lens=lens,
                                      sinks=s.double(), alibi_slopes=slopes.double())
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
