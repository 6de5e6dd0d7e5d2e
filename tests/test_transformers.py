"""patterngen inside a Hugging Face model: a tiny randomly initialised Llama (no
download) with patterngen attention gives the logits of the same model's eager
attention fed the pattern's dense mask as a 4-D additive mask."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from patterngen.integrations.transformers import register, spec_for  # noqa: E402

HEADS, KV_HEADS, HIDDEN, VOCAB = 4, 2, 64, 100
HEAD_DIM = HIDDEN // HEADS
NAME = register()
TOL = 1e-4


def streaming(sinks: int = 4, window: int = 8) -> pg.Pattern:
    """StreamingLLM: `sinks` first tokens plus the last `window` tokens (the query included)."""
    return (pg.Sink(sinks) | pg.Band(window - 1)) & pg.Causal()


DUO = pg.Heads({0: pg.Causal(), 1: streaming(), 2: streaming(), 3: pg.Causal()})  # each kv group mixes both


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def run(model, ids, impl, pattern=None, mask=None, **config):
    """Logits of `model` with attention `impl`; the patterngen settings live on the config."""
    model.set_attn_implementation(impl)
    model.config.patterngen_pattern = pattern
    model.config.patterngen_spec = None
    for k, v in config.items():
        setattr(model.config, k, v)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def additive_mask(pattern, n, batch):
    """The oracle's dense mask as the 4-D additive mask eager attention adds to its scores."""
    dense = pg.dense_mask(pg.Spec(pattern, n, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM))
    add = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    return add[None].expand(batch, -1, -1, -1)


def ids_for(batch, n, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", [streaming(), DUO], ids=["streaming_llm", "duo_attention"])
def test_logits_equal_eager_with_dense_mask(model, pattern):
    ids = ids_for(2, 40)
    ours = run(model, ids, NAME, pattern)
    eager = run(model, ids, "eager", mask=additive_mask(pattern, 40, 2))
    assert (ours - eager).abs().max() < TOL
    causal = run(model, ids, "eager")
    assert (ours - causal).abs().max() > 1e-2  # the pattern really changes the model


@settings(max_examples=8)
@given(sinks=st.integers(1, 6), window=st.integers(1, 20), n=st.integers(6, 48), duo=st.booleans())
def test_streaming_any_size(model, sinks, window, n, duo):
    pattern = streaming(sinks, window)
    if duo:
        pattern = pg.Heads([pg.Causal(), pattern, pattern, pg.Causal()])
    ids = ids_for(1, n, seed=n)
    ours = run(model, ids, NAME, pattern)
    eager = run(model, ids, "eager", mask=additive_mask(pattern, n, 1))
    assert (ours - eager).abs().max() < TOL


def test_gradients_equal_eager(model):
    ids = ids_for(2, 24)
    grads = []
    for impl, mask in ((NAME, None), ("eager", additive_mask(DUO, 24, 2))):
        model.set_attn_implementation(impl)
        model.config.patterngen_pattern, model.config.patterngen_spec = DUO, None
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max() < TOL, n


def test_decoding_with_cache_equals_full_forward(model):
    """Prefill then one token at a time: q_len 1 against a growing cache (Causal and Band
    align bottom-right) reproduces the full-sequence logits."""
    ids = ids_for(2, 30)
    full = run(model, ids, NAME, DUO)
    with torch.no_grad():
        out = model(ids[:, :20], past_key_values=DynamicCache(config=model.config), use_cache=True)
        steps = [out.logits]
        for t in range(20, 30):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() < TOL


def test_per_layer_patterns_and_spec_factory(model):
    ids = ids_for(1, 32)
    per_layer = [streaming(), DUO]
    listed = run(model, ids, NAME, per_layer)
    called = run(model, ids, NAME, lambda i: per_layer[i])
    factory = run(model, ids, NAME, None, patterngen_spec=lambda i, nq, nkv: pg.Spec(
        per_layer[i], nq, kv_shape=nkv, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM))
    assert torch.equal(listed, called) and torch.equal(listed, factory)
    # layer 0 streams everywhere, layer 1 only on some heads: differs from either alone
    assert (listed - run(model, ids, NAME, streaming())).abs().max() > 1e-3
    assert (listed - run(model, ids, NAME, DUO)).abs().max() > 1e-3


def test_spec_is_cached_per_length():
    class Cfg:
        patterngen_pattern = streaming()
        patterngen_spec = None

    a = spec_for(Cfg, 0, 16, 16, HEADS, KV_HEADS, HEAD_DIM)
    assert a is spec_for(Cfg, 1, 16, 16, HEADS, KV_HEADS, HEAD_DIM)
    b = spec_for(Cfg, 0, 1, 17, HEADS, KV_HEADS, HEAD_DIM)
    assert (b.nq, b.nkv) == (1, 17) and b is not a


def test_refuses_what_it_would_ignore(model):
    ids = ids_for(2, 12)
    padded = torch.ones(2, 12, dtype=torch.long)
    run(model, ids, NAME, streaming(), mask=padded)  # all ones: fine
    padded[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        run(model, ids, NAME, streaming(), mask=padded)
    with pytest.raises(ValueError, match="custom 4-D"):
        run(model, ids, NAME, streaming(), mask=additive_mask(streaming(), 12, 2))
    with pytest.raises(ValueError, match="exactly one"):
        run(model, ids, NAME, None)
    with pytest.raises(TypeError, match="patterngen_pattern"):
        run(model, ids, NAME, "causal")
    with pytest.raises(ValueError, match="head_dim 32"):
        run(model, ids, NAME, None, patterngen_spec=lambda i, nq, nkv: pg.Spec(
            pg.Causal(), nq, kv_shape=nkv, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=32))
    with pytest.raises(ValueError, match="no entry"):
        run(model, ids, NAME, [pg.Causal()])
    with pytest.raises(ValueError, match="name"):
        register("eager")
