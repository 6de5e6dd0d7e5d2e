"""patterngen inside a Hugging Face model: a tiny randomly initialised Llama (no
download) with patterngen attention gives the logits of the same model's eager
attention fed the pattern's dense mask as a 4-D additive mask."""
from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import scaled

transformers = pytest.importorskip("transformers")
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, StaticCache)

from patterngen.integrations.transformers import (PATTERN_ATTR, SPEC_ATTR, PatternCache, register,  # noqa: E402
                                                  spec_for)

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


@settings(max_examples=scaled(8))
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


def test_one_length_free_spec_serves_every_length():
    class Cfg:
        patterngen_pattern = streaming()
        patterngen_spec = None

    a = spec_for(Cfg, 0, 16, 16, HEADS, KV_HEADS, HEAD_DIM)
    assert a.length_free and a is spec_for(Cfg, 1, 1, 17, HEADS, KV_HEADS, HEAD_DIM)

    class Grid:  # a Window needs its extent: one Spec per length
        patterngen_pattern = pg.Window(3)
        patterngen_spec = None
    b = spec_for(Grid, 0, 17, 17, HEADS, KV_HEADS, HEAD_DIM)
    assert (b.nq, b.nkv) == (17, 17) and b is spec_for(Grid, 0, 17, 17, HEADS, KV_HEADS, HEAD_DIM)


def test_refuses_what_it_would_ignore(model):
    ids = ids_for(2, 12)
    padded = torch.ones(2, 12, dtype=torch.long)
    run(model, ids, NAME, streaming(), mask=padded)  # all ones: fine
    padded[0, 3:5] = 0  # a hole: neither left padding nor none
    with pytest.raises(ValueError, match="left padding only"):
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


# -- masks the pattern would drop: packed documents, overlays ---------------------------------------
def packed_position_ids(batch, lengths=(10, 14)):
    """Several documents in each row: positions restart at 0 at each document."""
    return torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1)


def test_packed_documents_are_refused(model):
    """position_ids restarting within a row, no mask, no cache: transformers asks for a mask
    that keeps the documents apart (eager then equals each document run alone). patterngen
    replaces the mask, so it would attend across documents: refused (before: silently
    different logits from eager's)."""
    ids, pos = ids_for(2, 24), packed_position_ids(2)
    model.config.patterngen_pattern, model.config.patterngen_spec = pg.Causal(), None
    model.set_attn_implementation("eager")
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(ids[:, :10], use_cache=False).logits, model(ids[:, 10:], use_cache=False).logits], 1)
    assert (packed - alone).abs().max() < TOL
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        with pytest.raises(ValueError, match="packed in one row.*one document per row.*cu_seqlens"):
            model(ids, position_ids=pos, use_cache=False)
        with pytest.raises(ValueError, match="packed in one row"):  # one row of positions for the batch
            model(ids, position_ids=packed_position_ids(1, (5, 9, 10)), use_cache=False)
        # flash-attention packing kwargs reach the attention itself: refused there
        cu = torch.tensor([0, 10, 24], dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seq_lens_q: the batch holds packed documents"):
            model(ids[:1], position_ids=pos[:1], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14,
                  max_length_k=14)
        # with a cache (use_cache defaults to True) transformers does not look for packing and asks
        # for the plain causal mask: eager crosses the documents too, and patterngen matches it
        ours = model(ids, position_ids=pos).logits
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert (model(ids, position_ids=pos).logits - ours).abs().max() < TOL


def test_compiled_model_has_one_graph_and_refuses_packing_at_run_time(model):
    """torch.compile(fullgraph=True) over the whole model (specs built inside the graph): the
    logits of eager; packed positions, which Dynamo cannot tell apart while tracing, trip a
    run-time assertion in the graph instead of being silently attended across documents."""
    ids = ids_for(2, 24)
    want = run(model, ids, NAME, streaming())
    compiled = torch.compile(lambda x, p: model(x, position_ids=p, use_cache=False).logits, fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        assert (compiled(ids, torch.arange(24)[None]) - want).abs().max() < TOL
        with pytest.raises(RuntimeError, match="packed documents"):
            compiled(ids, packed_position_ids(2))


def test_explicit_position_ids_of_one_document_run(model):
    ids = ids_for(2, 24)
    plain = run(model, ids, NAME, streaming())
    with torch.no_grad():
        for pos in (torch.arange(24)[None], torch.arange(24)[None].expand(2, -1)):
            assert torch.equal(model(ids, position_ids=pos, use_cache=False).logits, plain)


def test_mask_builder_takes_only_base_masks():
    """Straight through transformers' mask creation: the base masks the pattern replaces
    (causal, bidirectional, sliding-window, chunked) build no mask; an or/and mask
    function, a blockwise overlay or packing is refused, naming what was found."""
    from transformers import masking_utils as mu
    config = LlamaConfig(num_hidden_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=VOCAB, sliding_window=4, attention_chunk_size=4)
    config._attn_implementation = NAME
    embeds = torch.zeros(2, 6, HIDDEN)
    causal_kinds = (mu.create_causal_mask, mu.create_sliding_window_causal_mask, mu.create_chunked_causal_mask)
    for create in causal_kinds + (mu.create_bidirectional_mask, mu.create_bidirectional_sliding_window_mask):
        assert create(config, embeds, None, None) is None

    def image_tokens(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx >= 0

    refused = [({"or_mask_function": image_tokens}, "mask functions of the model .*image_tokens"),
               ({"and_mask_function": functools.partial(image_tokens)}, "mask functions of the model .*partial"),
               ({"block_sequence_ids": torch.tensor([[-1, 0, 0, -1, -1, -1]] * 2)}, "blockwise overlay"),
               ({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}, "packed in one row")]
    for kwargs, what in refused:
        for create in causal_kinds:
            with pytest.raises(ValueError, match=f"mask_function|position_ids: .*{what}"):
                create(config, embeds, None, None, **kwargs)
    for kwargs, what in refused[:2]:
        with pytest.raises(ValueError, match=what):
            mu.create_bidirectional_mask(config, embeds, None, **kwargs)


# -- KV caches: static and sliding-window ----------------------------------------------------------
PROMPT, NEW = 12, 20


def generate(model, ids, pattern, cache=None):
    """Greedy tokens after the prompt, patterngen attention, with a dynamic (None) or static cache."""
    model.set_attn_implementation(NAME)
    model.config.patterngen_pattern, model.config.patterngen_spec = pattern, None
    kw = {} if cache is None else {"cache_implementation": cache}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


def generate_eager(model, ids, pattern):
    """The same greedy decoding by eager attention fed the pattern's dense mask, no cache."""
    model.set_attn_implementation("eager")
    seq = ids
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(seq, attention_mask=additive_mask(pattern, seq.shape[1], seq.shape[0])).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("pattern", [streaming(), DUO], ids=["streaming_llm", "duo_attention"])
def test_static_cache_generates_the_dynamic_caches_tokens(model, pattern):
    """A static cache hands the attention all its preallocated slots; only the filled ones
    count, so static (and the deprecated "sliding_window", a static cache too), dynamic and
    eager with the dense mask generate the same tokens."""
    ids = ids_for(2, PROMPT, seed=3) % (VOCAB - 1) + 1  # no pad token (0): generate would see padding
    dynamic = generate(model, ids, pattern)
    assert generate(model, ids, pattern, "static") == dynamic
    assert generate_eager(model, ids, pattern) == dynamic
    if pattern is DUO:
        return
    assert generate(model, ids, pattern, "sliding_window") == dynamic
    # and with the 2-D attention mask a tokenizer passes
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, cache_implementation="static")
    assert out[:, PROMPT:].tolist() == dynamic


def test_static_cache_never_reads_unfilled_slots(model):
    """Prefill and decode by hand on a StaticCache whose empty slots hold NaN: the logits are
    finite and equal the full forward's."""
    ids = ids_for(2, 30)
    full = run(model, ids, NAME, DUO)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        out = model(ids[:, :20], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys[:, :, 20:] = float("nan")
            layer.values[:, :, 20:] = float("nan")
        steps = [out.logits]
        for t in range(20, 30):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < TOL


def test_sliding_window_cache_is_refused_once_it_drops_keys():
    """A model whose config sets sliding_window gets sliding-window cache layers, which drop
    keys the pattern still addresses: exact until the window fills, then refused."""
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, vocab_size=VOCAB, sliding_window=16)
    mistral = MistralForCausalLM(config).eval()
    mistral.config.patterngen_pattern = streaming(4, 6)
    mistral.set_attn_implementation(NAME)
    ids = ids_for(1, 8)
    for cache in (None, "static"):
        kw = {} if cache is None else {"cache_implementation": cache}
        with torch.no_grad():
            fits = mistral.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
            with pytest.raises(ValueError, match="sliding-window cache layer.*sliding_window is set"):
                mistral.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
        mistral.config.sliding_window = None  # a cache that keeps every key
        with torch.no_grad():
            longer = mistral.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
        mistral.config.sliding_window = 16
        assert longer[:, :14].tolist() == fits.tolist()


# -- saving: the pattern in config.json --------------------------------------------------------------
def test_save_pretrained_round_trip(model, tmp_path):
    """The config stores each pattern's JSON form; from_pretrained runs the same patterns."""
    ids = ids_for(2, 30)
    for pattern in (DUO, (streaming(), DUO), [streaming().to_dict(), DUO]):
        before = run(model, ids, NAME, pattern)
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())[PATTERN_ATTR]
        assert pg.from_json(saved if isinstance(saved, dict) else saved[1]) == DUO
        loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME).eval()
        with torch.no_grad():
            after = loaded(ids).logits
        assert torch.equal(before, after)
        assert repr(loaded.config)  # prints as JSON


def test_dict_form_on_the_config_runs(model):
    ids = ids_for(1, 24)
    assert torch.equal(run(model, ids, NAME, DUO.to_dict()), run(model, ids, NAME, DUO))
    with pytest.raises(ValueError, match="patterngen_pattern: not a valid patterngen pattern.*unknown type"):
        run(model, ids, NAME, {"patterngen": 1, "type": "Banana"})
    with pytest.raises(ValueError, match=r"patterngen_pattern\[1\]: holds the JSON form of a Spec"):
        run(model, ids, NAME, [streaming(), pg.Spec(DUO, 24, num_heads=HEADS).to_dict()])


@pytest.mark.parametrize("setting", [
    {PATTERN_ATTR: lambda i: streaming()},
    {PATTERN_ATTR: [streaming(), lambda i: DUO]},
    {PATTERN_ATTR: None, SPEC_ATTR: lambda i, nq, nkv: pg.Spec(pg.Causal(), nq, kv_shape=nkv)},
], ids=["callable", "callable_in_list", "spec_factory"])
def test_save_refuses_what_json_cannot_hold(model, tmp_path, setting):
    """Refused with a ValueError before config.json is opened: an earlier checkpoint stays whole."""
    run(model, ids_for(1, 8), NAME, streaming())
    model.save_pretrained(tmp_path)
    good = (tmp_path / "config.json").read_text()
    for k, v in setting.items():
        setattr(model.config, k, v)
    with pytest.raises(ValueError, match="has no JSON form"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no JSON form"):
        model.save_pretrained(tmp_path / "fresh")
    assert (tmp_path / "config.json").read_text() == good
    assert not os.path.exists(tmp_path / "fresh" / "config.json")
    model.config.patterngen_pattern, model.config.patterngen_spec = streaming(), None


# -- Gemma 2 (softcap, alternating sliding and full layers) and gpt-oss (learned sinks) -------------
def _tiny(name: str):
    """A tiny random Gemma 2 or gpt-oss: sliding-window layer (window 8) then a full one, with the
    model's own score modification (Gemma 2's logit softcap 5, gpt-oss's sink logits)."""
    torch.manual_seed(0)
    shape = dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                 head_dim=HEAD_DIM, vocab_size=VOCAB, sliding_window=8, max_position_embeddings=256)
    if name == "gemma2":
        config = transformers.Gemma2Config(intermediate_size=128, attn_logit_softcapping=5.0,
                                           query_pre_attn_scalar=HEAD_DIM, **shape)
        return transformers.Gemma2ForCausalLM(config).eval()
    config = transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **shape)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # zero at init: make them matter
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_gemma2_and_gpt_oss_equal_eager(name):
    """Logits (batch 2) and greedy generation equal the model's eager attention, which applies
    the sliding window, the softcap and the sinks itself. Generation keeps every key
    (`DynamicCache()` without a config has no sliding layers, which patterngen refuses)."""
    if not hasattr(transformers, "Gemma2Config" if name == "gemma2" else "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    model = _tiny(name)
    pattern = [pg.Band(7) & pg.Causal(), pg.Causal()]  # layer_types: sliding_attention, full_attention
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids = ids_for(2, 30)
    want = run(model, ids, "eager")
    got = run(model, ids, NAME, pattern)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=DynamicCache())
        model.set_attn_implementation(NAME)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=DynamicCache())
        bounded = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=PatternCache(model.config))
    assert torch.equal(got, want) and torch.equal(bounded, want)


# -- left padding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [streaming(sinks=2, window=5), DUO], ids=["streaming_llm", "duo_attention"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_left_padding_equals_each_sequence_alone(model, pattern, cache):
    """A left-padded batch (rows of 12, 7 and 3 tokens) gives each row's logits and greedy tokens
    of that row run alone, unpadded: padded keys are never attended and the pattern's
    positions (its sinks) count from each row's first real token; with a static cache too."""
    lengths = (PROMPT, 7, 3)
    ids = ids_for(len(lengths), PROMPT, seed=5) % (VOCAB - 1) + 1
    mask = torch.stack([torch.arange(PROMPT) >= PROMPT - n for n in lengths]).long()
    ids = ids * mask  # pad token 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    alone = [run(model, ids[b:b + 1, PROMPT - n:], NAME, pattern)[0] for b, n in enumerate(lengths)]
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, PROMPT - n:], alone[b], atol=TOL, rtol=TOL)
    kw = {} if cache is None else {"cache_implementation": cache}
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 **kw)[:, PROMPT:]
        for b, n in enumerate(lengths):
            one = model.generate(ids[b:b + 1, PROMPT - n:], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert batched[b].tolist() == one[0, n:].tolist(), (b, n)


def test_right_padding_is_refused(model):
    ids = ids_for(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        run(model, ids, NAME, streaming(), mask=mask)


def test_compiled_model_takes_left_padding(model):
    """torch.compile(fullgraph=True) of the model with a left-padding mask: the eager logits on
    every real token; a mask that is not left padding trips the graph's assertion."""
    lengths = (PROMPT, 7, 3)
    ids = ids_for(len(lengths), PROMPT, seed=7)
    mask = torch.stack([torch.arange(PROMPT) >= PROMPT - n for n in lengths]).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate makes them
    model.set_attn_implementation(NAME)
    model.config.patterngen_pattern, model.config.patterngen_spec = streaming(sinks=2, window=5), None
    compiled = torch.compile(lambda x, m, p: model(x, attention_mask=m, position_ids=p, use_cache=False).logits,
                             fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos).logits
        got = compiled(ids, mask, pos)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=TOL)
        holes = mask.clone()
        holes[1, -1] = 0
        with pytest.raises(RuntimeError, match="left padding only"):
            compiled(ids, holes, pos)


# -- bounded caches -------------------------------------------------------------------------------------
STREAM = (pg.Sink(4) | pg.Band(7)) & pg.Causal()
DUO_KV = pg.Heads({0: STREAM, 1: STREAM, 2: pg.Causal(), 3: pg.Causal()})  # kv head 0 streams, 1 retrieves


@pytest.mark.parametrize("pattern", [DUO_KV, DUO], ids=["duo_per_kv_head", "duo_mixed_groups"])
def test_pattern_cache_generates_the_unbounded_caches_tokens(model, pattern):
    """PatternCache keeps per kv head what a later query can see: the streaming kv head holds
    4 sinks + 7 window keys whatever the length, the retrieval head every key, and greedy
    generation (batch 2) equals the unbounded DynamicCache's token for token."""
    model.set_attn_implementation(NAME)
    model.config.patterngen_pattern, model.config.patterngen_spec = pattern, None
    ids = ids_for(2, PROMPT, seed=9) % (VOCAB - 1) + 1
    cache = PatternCache(model.config)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, past_key_values=DynamicCache())
        got = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert torch.equal(got, want)
    seen = PROMPT + 30 - 1  # the last generated token is never fed back
    expected = [11, seen] if pattern is DUO_KV else [seen, seen]  # a mixed group keeps what either head sees
    assert cache.kept() == [expected] * 2
    with torch.no_grad():  # beam search reorders and repeats the cache's batch
        beams = [model.generate(ids[:1], max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False,
                                pad_token_id=0, past_key_values=c) for c in (DynamicCache(), PatternCache(model.config))]
    assert torch.equal(*beams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pattern_cache_takes_chunks_after_pruning(model, dtype):
    """A chunk of several tokens appended to a bounded cache that has already dropped keys (a
    chunked prefill, speculative tokens) gives the unbounded cache's logits: the chunk's queries
    see at most what the cache kept (kv_keep is monotone in the query position); in float64 to
    1e-12, so the pruned heads accumulate in float64 as the reference does."""
    model = copy.deepcopy(model).to(dtype)
    tol = TOL if dtype == torch.float32 else 1e-12
    model.set_attn_implementation(NAME)
    model.config.patterngen_pattern, model.config.patterngen_spec = DUO_KV, None
    ids = ids_for(2, 40, seed=11)
    bounded, unbounded = PatternCache(model.config), DynamicCache()
    with torch.no_grad():
        for a, b in ((0, 16), (16, 17), (17, 18), (18, 29), (29, 40)):  # chunks after keys were dropped
            got = model(ids[:, a:b], past_key_values=bounded, use_cache=True).logits
            want = model(ids[:, a:b], past_key_values=unbounded, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert bounded.kept() == [[11, 40]] * 2
