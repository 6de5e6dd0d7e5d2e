"""Bad input to pg.attention / pg.compile fails early, naming the argument and what is valid."""
from __future__ import annotations

import pytest
import torch

import patterngen as pg
from patterngen.backends.reference import reference_attention

SPEC = pg.Spec(pg.Causal() | pg.Sink(2), 12, num_heads=4, num_kv_heads=2, head_dim=8)
ROUTED = pg.Spec(pg.Routed(4, 2), 12, num_heads=2, head_dim=8)


def qkv(spec=SPEC, batch=2, dtype=torch.float32):
    q = torch.randn(batch, spec.num_heads, spec.nq, spec.head_dim, dtype=dtype)
    k = torch.randn(batch, spec.num_kv_heads, spec.nkv, spec.head_dim, dtype=dtype)
    return q, k, torch.randn_like(k)


def test_valid_call_works():
    q, k, v = qkv()
    assert pg.attention(q, k, v, SPEC).shape == q.shape


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"^{which}: expected a torch.Tensor, got list"):
        pg.attention(args["q"], args["k"], args["v"], SPEC)


def test_spec_must_be_a_spec():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="spec: expected a patterngen.Spec, got Causal"):
        pg.attention(q, k, v, pg.Causal())
    with pytest.raises(TypeError, match="spec: expected a patterngen.Spec"):
        pg.compile("causal")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"{which}: expected a 4-D tensor .* got shape \("):
        pg.attention(args["q"], args["k"], args["v"], SPEC)


def test_integer_dtype():
    q, k, v = (t.long() for t in qkv())
    with pytest.raises(TypeError, match=r"q: dtype torch.int64 is not supported \(valid: float16, bfloat16"):
        pg.attention(q, k, v, SPEC)


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=rf"{which}: dtype torch.float64 differs from q's torch.float32"):
        pg.attention(args["q"], args["k"], args["v"], SPEC)


def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k: device cuda"):
        pg.attention(q, k.cuda(), v, SPEC)


def test_wrong_head_count():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: has 3 heads .* spec needs 4 = spec.num_heads"):
        pg.attention(q[:, :3], k, v, SPEC)


def test_gqa_mismatch():
    q, k, v = qkv()
    k3, v3 = torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)
    with pytest.raises(ValueError, match=r"k: has 3 heads .* spec needs 2 = spec.num_kv_heads"):
        pg.attention(q, k3, v3, SPEC)
    # all-heads k/v (MHA layout) against a GQA spec is also refused, not silently broadcast
    with pytest.raises(ValueError, match=r"k: has 4 heads"):
        pg.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), SPEC)


def test_wrong_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: has 4 head_dim .* spec needs 8 = spec.head_dim"):
        pg.attention(q[..., :4], k, v, SPEC)
    with pytest.raises(ValueError, match=r"k: has 4 head_dim"):
        pg.attention(q, k[..., :4], v[..., :4], SPEC)


def test_wrong_token_counts():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: has 10 tokens .* spec.nq \(q_shape=\(12,\)\)"):
        pg.attention(q[:, :, :10], k, v, SPEC)
    with pytest.raises(ValueError, match=r"k: has 10 tokens .* spec.nkv"):
        pg.attention(q, k[:, :, :10], v[:, :, :10], SPEC)


def test_k_v_shape_and_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v: shape \(2, 2, 11, 8\) differs from k's \(2, 2, 12, 8\)"):
        pg.attention(q, k, v[:, :, :11], SPEC)
    with pytest.raises(ValueError, match=r"k: batch size 1 differs from q's 2"):
        pg.attention(q, k[:1], v[:1], SPEC)


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError),
                                        (torch.tensor(0.1), TypeError)])
def test_bad_scale(scale, exc):
    q, k, v = qkv()
    with pytest.raises(exc, match="scale: "):
        pg.attention(q, k, v, SPEC, scale=scale)
    with pytest.raises(exc, match="scale: "):
        pg.compile(SPEC)(q, k, v, scale=scale)


def test_routed_needs_block_indices():
    q, k, v = qkv(ROUTED)
    with pytest.raises(ValueError, match=r"block_indices: the spec contains Routed\(4, 2\)"):
        pg.attention(q, k, v, ROUTED)
    with pytest.raises(ValueError, match="block_indices: the spec contains"):
        pg.compile(ROUTED)(q, k, v)


def test_block_indices_for_a_static_spec():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block_indices: given, but the spec has no Routed pattern"):
        pg.attention(q, k, v, SPEC, block_indices=torch.zeros(4, 2, 1, dtype=torch.long))


def test_block_indices_out_of_range():
    q, k, v = qkv(ROUTED)
    idx = torch.zeros(2, 3, 2, dtype=torch.long)
    idx[1, 2, 0] = 3  # 12 keys in blocks of 4: valid 0..2
    with pytest.raises(ValueError, match=r"block_indices: entries must be in -1..2"):
        pg.attention(q, k, v, ROUTED, block_indices=idx)
    idx[1, 2, 0] = -2
    with pytest.raises(ValueError, match=r"block_indices: entries must be in -1..2"):
        pg.attention(q, k, v, ROUTED, block_indices=idx)


def test_block_indices_bad_shape_dtype_and_batch():
    q, k, v = qkv(ROUTED)
    with pytest.raises(ValueError, match=r"block_indices: expected shape"):
        pg.attention(q, k, v, ROUTED, block_indices=torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="block_indices: expected an integer tensor"):
        pg.attention(q, k, v, ROUTED, block_indices=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match=r"block_indices: batch size 3 must be 1 or q's batch size 2"):
        pg.attention(q, k, v, ROUTED, block_indices=torch.zeros(3, 2, 3, 2, dtype=torch.long))


def test_compile_bad_backend_and_tiling():
    with pytest.raises(ValueError, match=r"backend: unknown backend 'cuda' \(valid: 'auto', 'reference', 'triton'\)"):
        pg.compile(SPEC, backend="cuda")
    with pytest.raises(TypeError, match="tiling: expected a patterngen Tiling or None, got tuple"):
        pg.compile(SPEC, tiling=(16, 16))
    with pytest.raises(ValueError, match="q_tile must be >= 1"):
        pg.compile(SPEC, tiling=pg.Tiling(0, 16))
    grid = pg.Spec(pg.Routed(4, 1), (4, 4), head_dim=8)
    with pytest.raises(ValueError, match="tiling: Routed.* needs flat"):  # checked at compile time
        pg.compile(grid, tiling=pg.Tiling((2, 2), (2, 2)))


def test_plan_mismatch():
    q, k, v = qkv()
    other = pg.build_plan(pg.Spec(pg.Causal(), 12, num_heads=4, num_kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="plan: built for Spec"):
        reference_attention(q, k, v, SPEC, plan=other)
    with pytest.raises(TypeError, match="plan: expected a patterngen Plan"):
        reference_attention(q, k, v, SPEC, plan="plan")
    with pytest.raises(ValueError, match="tiling: give either a plan or a tiling"):
        reference_attention(q, k, v, SPEC, plan=pg.build_plan(SPEC), tiling=pg.Tiling(8, 8))


def test_routed_plan_batch_mismatch():
    q, k, v = qkv(ROUTED)
    idx = torch.zeros(2, 2, 3, 2, dtype=torch.long)
    plan = pg.build_plan(ROUTED, block_indices=idx[0])  # one index set, not one per batch
    with pytest.raises(ValueError, match="plan: built for block indices with batch size 1, but block_indices"):
        reference_attention(q, k, v, ROUTED, plan=plan, block_indices=idx)
