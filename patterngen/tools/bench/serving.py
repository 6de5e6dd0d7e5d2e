"""`patterngen bench --serving`: packed documents and bounded KV caches (issue 14's figures).

1. Packed training: `docs` documents of random lengths summing to `tokens`, causal, forward and
   backward, packed (`cu_seqlens_q/k`: work per document) against the same documents padded to
   the longest (a [docs, H, longest, D] batch, causal, the padded rows computed and thrown
   away) through patterngen, and through dense causal SDPA on the padded batch, in one process.
2. Decoding with a DuoAttention spec (per kv head: sinks + window, or causal): a small random
   Llama with the patterngen attention prefills `context` tokens, then greedily decodes `steps`
   tokens with the unbounded `DynamicCache` and with the bounded `PatternCache`: tokens/s of
   the decode steps, the KV bytes each cache holds after the prompt, and whether the tokens
   agree.

3. On a GPU only, the decode kernels: one query per entry of a ragged batch (cache lengths
   `kv_lens` between half and all of the cache), GQA, a causal and a sinks + window spec,
   patterngen (one VARLEN launch, split-KV when SMs idle, plus the merge) against compiled
   FlexAttention with a per-entry block mask (built once, not timed) and SDPA with a boolean
   mask of the same pairs; CUDA-event medians.

On the CPU patterngen runs its exact reference backend and SDPA its CPU kernel: wall-clock
figures of those, not of GPU kernels.
"""
from __future__ import annotations

import time

import torch

from ...sim.report import align_columns
from .report import environment, write_json_and_markdown

TITLE = "patterngen bench --serving"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _doc_lengths(docs: int, tokens: int, seed: int) -> list[int]:
    """`docs` random positive lengths summing to `tokens` (uniform cut points)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(tokens - 1, generator=g)[:docs - 1].add(1).tolist())
    bounds = [0] + cuts + [tokens]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _fwd_bwd(fn, leaves, device, repeats: int) -> float:
    """Median seconds of forward + backward of sum(fn(*leaves)), after one warm-up."""
    times = []
    for i in range(repeats + 1):
        for t in leaves:
            t.grad = None
        t0 = _now(device)
        fn(*leaves).float().sum().backward()
        if i:
            times.append(_now(device) - t0)
    return sorted(times)[len(times) // 2]


def bench_packed(device, dtype, tokens: int, docs: int, heads: int, head_dim: int, repeats: int, seed: int) -> dict:
    import patterngen as pg
    lengths = _doc_lengths(docs, tokens, seed)
    longest = max(lengths)
    spec = pg.Spec(pg.Causal(), num_heads=heads, head_dim=head_dim)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def leaves(b, n):
        return [torch.randn(b, heads, n, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    rows = {}
    packed = leaves(1, tokens)
    rows["patterngen packed (cu_seqlens)"] = _fwd_bwd(
        lambda q, k, v: pg.attention(q, k, v, spec, cu_seqlens_q=cu, cu_seqlens_k=cu), packed, device, repeats)
    padded = leaves(docs, longest)
    rows["patterngen padded to the longest"] = _fwd_bwd(lambda q, k, v: pg.attention(q, k, v, spec), padded, device,
                                                        repeats)
    rows["SDPA causal, padded"] = _fwd_bwd(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), padded, device,
        repeats)
    base = rows["patterngen packed (cu_seqlens)"]
    return {"tokens": tokens, "docs": docs, "lengths": lengths, "longest": longest, "padded_tokens": docs * longest,
            "pairs_packed": sum(n * (n + 1) // 2 for n in lengths), "pairs_padded": docs * longest * (longest + 1) // 2,
            "rows": [{"impl": k, "seconds": s, "tokens_per_s": tokens / s, "vs_packed": s / base}
                     for k, s in rows.items()]}


def bench_decode(device, dtype, context: int, steps: int, window: int, seed: int) -> dict:
    import patterngen as pg
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    from ...integrations.transformers import PatternCache, register
    name = register()
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=context + steps + 8)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    model.set_attn_implementation(name)
    stream = (pg.Sink(4) | pg.Band(window - 1)) & pg.Causal()
    # DuoAttention: kv heads 0, 1 stream (their q heads 0-3), 2, 3 retrieve
    model.config.patterngen_pattern = pg.Heads({range(0, 4): stream, range(4, 8): pg.Causal()})
    model.config.patterngen_spec = None
    ids = torch.randint(1, 1000, (1, context), generator=torch.Generator().manual_seed(seed)).to(device)
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * head_dim * torch.tensor([], dtype=dtype).element_size()  # K and V of one head
    out = {"context": context, "steps": steps, "window": window, "layers": config.num_hidden_layers,
           "kv_heads": config.num_key_value_heads, "head_dim": head_dim, "caches": {}}
    tokens = {}
    for label, make in (("DynamicCache (unbounded)", DynamicCache), ("PatternCache (bounded)",
                                                                     lambda: PatternCache(model.config))):
        cache = make()
        with torch.no_grad():
            t0 = _now(device)
            logits = model(ids, past_key_values=cache, use_cache=True).logits
            prefill = _now(device) - t0
            if isinstance(cache, DynamicCache):
                held = [[layer.keys.shape[2]] * layer.keys.shape[1] for layer in cache.layers]
            else:
                held = cache.kept()
            nxt = logits[:, -1:].argmax(-1)
            seq = [int(nxt)]
            t0 = _now(device)
            for _ in range(steps):
                logits = model(nxt, past_key_values=cache, use_cache=True).logits
                nxt = logits[:, -1:].argmax(-1)
                seq.append(int(nxt))
            decode = _now(device) - t0
        tokens[label] = seq
        out["caches"][label] = {"prefill_s": prefill, "decode_tokens_per_s": steps / decode,
                                "kv_tokens_per_layer_head": held,
                                "kv_bytes": sum(n for layer in held for n in layer) * per_token}
    first, second = tokens.values()
    out["same_tokens"] = first == second
    return out


def bench_decode_kernels(device, dtype, context: int, batch: int, window: int, seed: int, timer=None,
                         compiled: bool = True) -> dict:
    """Ragged one-query decode of `batch` entries (issue 14's split-KV): ms per call (CUDA events
    unless another `timer` is given)."""
    import patterngen as pg
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from .timing import CudaTimer
    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = torch.randint(context // 2, context + 1, (batch,), generator=g, dtype=torch.int32)
    q = torch.randn(batch, hq, 1, d, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, hkv, context, d, generator=g).to(device, dtype) for _ in range(2))
    lens_d = lens.to(device)
    timer = timer or CudaTimer(device)
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    rows = []
    for name, pattern in (("causal", pg.Causal()),
                          (f"sinks 4 + window {window}", (pg.Sink(4) | pg.Band(window - 1)) & pg.Causal())):
        spec = pg.Spec(pattern, num_heads=hq, num_kv_heads=hkv, head_dim=d)
        windowed = name != "causal"

        def mask_mod(b, h, q_idx, kv_idx):
            pos = lens_d[b] - 1 + q_idx  # the one query sits at its entry's last cached key
            seen = kv_idx <= pos
            return seen & ((kv_idx < 4) | (pos - kv_idx < window)) if windowed else seen

        block = create_block_mask(mask_mod, batch, None, 1, context, device=device)
        dense = mask_mod(torch.arange(batch, device=device)[:, None, None, None], None,
                         torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                         torch.arange(context, device=device)[None, None, None, :])
        impls = {"patterngen": lambda: pg.attention(q, k, v, spec, kv_lens=lens_d),
                 "flex": lambda: flex(q, k, v, block_mask=block, enable_gqa=True),
                 "sdpa (bool mask)": lambda: torch.nn.functional.scaled_dot_product_attention(
                     q, k, v, attn_mask=dense, enable_gqa=True)}
        outs = {n: f().float() for n, f in impls.items()}
        row = {"spec": name, "errors_vs_sdpa": {n: (o - outs["sdpa (bool mask)"]).abs().max().item()
                                                for n, o in outs.items()}}
        for n, f in impls.items():
            row[n + " ms"] = timer(f)["ms"]
        cached = int(sum(min(int(n), window + 4) if windowed else int(n) for n in lens))
        row["read GB/s patterngen"] = 2 * cached * hkv * d * q.element_size() / row["patterngen ms"] / 1e6
        rows.append(row)
    return {"batch": batch, "context": context, "heads": [hq, hkv], "head_dim": d, "kv_lens": lens.tolist(),
            "timing": timer.describe(), "rows": rows}


def markdown(doc: dict) -> str:
    lines = [f"# {TITLE}", "", ", ".join(f"{k} {v}" for k, v in doc["environment"].items()), ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    p = doc.get("packed")
    if p and "rows" in p:
        lines += [f"## Packed training: {p['docs']} documents, {p['tokens']} tokens (longest {p['longest']}; "
                  f"padded batch {p['padded_tokens']} tokens), causal, forward + backward", ""]
        table = [["impl", "seconds", "tokens/s", "x packed"]] + [
            [r["impl"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['vs_packed']:.2f}"] for r in p["rows"]]
        lines += [align_columns(table), ""]
    d = doc.get("decode")
    if d and "caches" in d:
        lines += [f"## Decoding after {d['context']} tokens: DuoAttention (2 of 4 kv heads stream: 4 sinks + "
                  f"window {d['window']}), {d['steps']} greedy steps; same tokens: {d['same_tokens']}", ""]
        table = [["cache", "prefill s", "decode tokens/s", "KV bytes"]] + [
            [k, f"{c['prefill_s']:.2f}", f"{c['decode_tokens_per_s']:.1f}", f"{c['kv_bytes']:,}"]
            for k, c in d["caches"].items()]
        lines += [align_columns(table), ""]
    kd = doc.get("decode_kernels")
    if kd and "rows" in kd:
        lines += [f"## Decode kernels: {kd['batch']} entries, one query each, cache lengths {min(kd['kv_lens'])}-"
                  f"{max(kd['kv_lens'])} of {kd['context']}, {kd['heads'][0]} q / {kd['heads'][1]} kv heads, head "
                  f"dim {kd['head_dim']} ({kd['timing']})", ""]
        table = [["spec", "patterngen ms", "flex ms", "sdpa (bool mask) ms", "x flex", "x sdpa", "pg GB/s",
                  "max err vs sdpa"]] + [
            [r["spec"], f"{r['patterngen ms']:.4f}", f"{r['flex ms']:.4f}", f"{r['sdpa (bool mask) ms']:.4f}",
             f"{r['flex ms'] / r['patterngen ms']:.2f}", f"{r['sdpa (bool mask) ms'] / r['patterngen ms']:.2f}",
             f"{r['read GB/s patterngen']:.0f}", f"{max(r['errors_vs_sdpa'].values()):.1e}"] for r in kd["rows"]]
        lines += [align_columns(table), ""]
    for key in ("packed", "decode", "decode_kernels"):
        if doc.get(key, {}).get("error"):
            lines += [f"{key}: error: {doc[key]['error']}"]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """`patterngen bench --serving`; 1 if a section failed."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    quick = args.quick
    tokens = 2048 if quick else 32768
    doc = {"title": TITLE, "environment": environment(device),
           "note": None if cuda else "CPU: patterngen runs its exact reference backend, SDPA its CPU kernel"}
    sections = (("packed", lambda: bench_packed(device, dtype, tokens, 16, 4, 64, 1 if quick else 3, args.seed)),
                ("decode", lambda: bench_decode(device, dtype, tokens, 8 if quick else 64, 64 if quick else 1024,
                                                args.seed)))
    if cuda:
        sections += (("decode_kernels", lambda: bench_decode_kernels(device, dtype, 8192 if quick else 32768, 8,
                                                                     4096, args.seed)),)
    for name, section in sections:
        t0 = time.perf_counter()
        try:
            doc[name] = section()
        except Exception as e:  # noqa: BLE001 - the other section still runs
            doc[name] = {"error": f"{type(e).__name__}: {e}"}
        doc[name]["seconds_total"] = time.perf_counter() - t0
        print(f"[serving] {name}: {doc[name]['seconds_total']:.1f} s", flush=True)
        if args.out:  # after every section: a run stopped by a time limit keeps what it measured
            written = write_json_and_markdown(args.out, doc, markdown(doc))
    print(markdown(doc))
    if args.out:
        print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any("error" in doc[n] for n, _ in sections) else 0
