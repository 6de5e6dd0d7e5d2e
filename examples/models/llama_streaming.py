"""StreamingLLM and DuoAttention patterns inside a Hugging Face Llama model.

A tiny randomly initialised Llama-architecture model (built from a config, no
weights downloaded) runs with patterngen registered as a `transformers`
attention implementation, once with StreamingLLM's attention sinks plus a
sliding window (Xiao et al., arXiv:2309.17453) and once with DuoAttention's
per-head split into full-attention retrieval heads and streaming heads (Xiao et
al., arXiv:2410.10819). Each run is compared with the same model's eager
attention given the pattern's dense mask; the script prints the largest logit
difference. Then it decodes greedily with a dynamic and a static KV cache (the
static one preallocates its slots; only the filled ones are attended, so both
give the same tokens), and saves the model with `save_pretrained`: config.json
holds the pattern's JSON form, and `from_pretrained` runs the same pattern.
Needs `transformers` (see the Makefile's install target).

    python examples/models/llama_streaming.py
"""
import json
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import patterngen as pg
from patterngen.integrations.transformers import register

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
SEQ, BATCH = 64, 2

streaming = (pg.Sink(4) | pg.Band(15)) & pg.Causal()           # 4 sinks + the last 16 tokens
duo = pg.Heads({0: pg.Causal(), 1: streaming, 2: streaming, 3: pg.Causal()})  # retrieval + streaming heads


def dense_additive_mask(pattern: pg.Pattern) -> torch.Tensor:
    """The pattern as the 4-D additive mask [B, H, N, N] that eager attention adds to its scores."""
    spec = pg.Spec(pattern, SEQ, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS)
    dense = pg.dense_mask(spec)
    return torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)[None].expand(BATCH, -1, -1, -1)


def main() -> None:
    name = register()  # "patterngen"
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    for label, pattern in (("StreamingLLM", streaming), ("DuoAttention", duo)):
        model.config.patterngen_pattern = pattern
        model.set_attn_implementation(name)
        with torch.no_grad():
            ours = model(ids).logits
        model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = model(ids, attention_mask=dense_additive_mask(pattern)).logits
            causal = model(ids).logits
        print(f"{label:13s} max |logits - eager with dense mask| = {(ours - eager).abs().max().item():.2e}"
              f"   (vs plain causal: {(ours - causal).abs().max().item():.2e})")

    # greedy decoding: a static cache (preallocated slots) gives the dynamic cache's tokens
    model.config.patterngen_pattern = duo
    model.set_attn_implementation(name)
    prompt = ids[:, :12] % (config.vocab_size - 1) + 1  # no pad token (0) in the prompt
    tokens = {}
    for cache in ("dynamic", "static"):
        kwargs = {} if cache == "dynamic" else {"cache_implementation": "static"}
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, **kwargs)
        tokens[cache] = out[:, prompt.shape[1]:]
        print(f"{cache:7s} cache: {tokens[cache][0].tolist()}")
    print(f"static == dynamic: {torch.equal(tokens['static'], tokens['dynamic'])}")

    # save_pretrained writes the pattern's JSON form; from_pretrained runs the same pattern
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        with open(os.path.join(directory, "config.json")) as f:
            stored = json.load(f)["patterngen_pattern"]
        loaded = LlamaForCausalLM.from_pretrained(directory, attn_implementation=name).eval()
        print(f"config.json: patterngen_pattern = {json.dumps(stored)[:80]}...")
        print(f"restored: {pg.from_json(stored)!r}")
        with torch.no_grad():
            same = torch.equal(model(ids).logits, loaded(ids).logits)
        print(f"from_pretrained logits identical: {same}")


if __name__ == "__main__":
    main()
