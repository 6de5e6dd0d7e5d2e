"""`patterngen bench --lengths`: what a length-free spec costs when the lengths keep changing.

A length-free spec (no q_shape) is meant to run two generated kernels, decode and prefill,
whatever the lengths, so a new length should cost no new kernel source and no compilation.
This benchmark measures that where it matters, in one process:

1. Hugging Face greedy decode: a small random Llama with the patterngen attention (sinks +
   window, causal) against "sdpa" (plain causal: a different mask, so only times are
   compared), ms per token as the median over the decode steps of a run after a short
   warm-up run; also a repeat over the same lengths, the kernel sources generated and the
   entries of the package's bounded caches against their sizes.
2. New lengths: `pg.attention` on lengths no earlier call used (prefill, a chunk of
   prefill after a cache, decode): the first call, the steady state, the sources generated.
3. The same lengths with FlexAttention (compiled once with dynamic=True, a block mask built
   per length from the same pattern) and SDPA (causal, and the exact dense mask) for reference.

Sources are counted in a private, initially empty kernel cache (PATTERNGEN_CACHE for the
run), so the counts are what this run generated whatever earlier runs left on disk. On the
CPU the op runs the exact reference backend and FlexAttention runs eagerly: those numbers
are for the reference path, not kernel figures. Failures are recorded per section and per
length, never raised, so one failure leaves the rest of a GPU run intact.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...sim.report import align_columns
from .report import environment, write_json_and_markdown
from .runners import raise_recompile_limits, short_error
from .timing import CpuTimer, CudaTimer, sync

SINKS = 4
TITLE = "patterngen bench --lengths"
CPU_NOTE = "CPU: patterngen runs its exact reference backend, FlexAttention runs eagerly; not kernel figures"


@dataclass
class Setup:
    """Sizes of one run; `setup_for` picks them per device."""

    device: torch.device
    dtype: torch.dtype
    tokens: int
    prompt: int
    window: int
    model: dict
    lengths: list[tuple[int, int]]
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    warmup_tokens: int = 8
    flex: bool = True
    flex_compiled: bool = True
    flex_block: int = 128
    timer: Callable | None = field(default=None, repr=False)
    budget_s: float | None = None
    seed: int = 0
    verbose: bool = False

    def describe(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("timer", "verbose")}
        d.update(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                 lengths=[list(x) for x in self.lengths], torch_threads=torch.get_num_threads())
        return d


def setup_for(device: torch.device, tokens: int, quick: bool = False) -> Setup:
    """CPU: the test-sized Llama, window 64 (16 quick), lengths in the hundreds, fp32. CUDA: a
    4-layer, hidden-1024 Llama in bf16, window 1024, lengths 1000-4000, head dim 128, and a
    time budget past which FlexAttention and SDPA are skipped (each new shape may recompile
    FlexAttention, tens of seconds) so that the run ends within `make gpu-check`'s limit."""
    if device.type == "cuda":
        model = dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                     num_key_value_heads=4, head_dim=64, vocab_size=8192, max_position_embeddings=8192)
        lengths = [(1000, 1000), (1537, 1537), (2048, 2048), (3001, 3001), (640, 2600), (1, 1234), (1, 2222),
                   (1, 4000)]
        if quick:
            lengths = [(1000, 1000), (3001, 3001), (1, 1234), (1, 4000)]
        return Setup(device, torch.bfloat16, tokens, prompt=256 if quick else 1000, window=1024, model=model,
                     lengths=lengths, head_dim=128, timer=CudaTimer(device, warmup_ms=10.0, rep_ms=40.0),
                     budget_s=120.0)
    model = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=max(1024, 64 + tokens + 64))
    if quick:
        return Setup(device, torch.float32, tokens, prompt=16, window=16, model=model, warmup_tokens=2,
                     lengths=[(40, 40), (77, 77), (9, 70), (1, 50)], flex_compiled=False, timer=CpuTimer(2))
    lengths = [(100, 100), (153, 153), (204, 204), (301, 301), (50, 260), (1, 123), (1, 222), (1, 400)]
    return Setup(device, torch.float32, tokens, prompt=16, window=64, model=model, lengths=lengths,
                 flex_compiled=False, timer=CpuTimer(5))


def pattern(window: int):
    """StreamingLLM: the first SINKS tokens and the last `window` (the query's own included), causal."""
    import patterngen as pg
    return (pg.Sink(SINKS) | pg.Band(window - 1)) & pg.Causal()


class FlexMask:
    """The same pattern as a FlexAttention mask_mod, written by hand as a user would: queries
    aligned bottom-right to the keys (query i is at position i + Nkv - Nq). One function for
    every length, the offset a captured 0-d tensor set per length: a new closure per length
    would fail compiled FlexAttention's guards and recompile it at every length."""

    def __init__(self, window: int, device: torch.device):
        self.window = window
        self.offset = torch.zeros((), dtype=torch.int64, device=device)
        offset = self.offset

        def mask_mod(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            return (kv_idx <= pos) & ((kv_idx < SINKS) | (pos - kv_idx < window))

        self.mask_mod = mask_mod

    def at(self, nq: int, nkv: int):
        """The mask_mod, now for Nq queries and Nkv keys."""
        self.offset.fill_(nkv - nq)
        return self.mask_mod

    def dense(self, nq: int, nkv: int) -> torch.Tensor:
        """bool [Nq, Nkv]: the mask SDPA takes."""
        dev = self.offset.device
        return self.at(nq, nkv)(None, None, torch.arange(nq, device=dev)[:, None], torch.arange(nkv, device=dev))


# -- counting what a run generates and keeps ---------------------------------------------------
@contextmanager
def private_kernel_cache():
    """PATTERNGEN_CACHE set to a new empty directory for the duration (restored after), so
    that counting its files counts the sources this run generated."""
    from ...backends.triton import cache
    old = os.environ.get(cache.ENV)
    with tempfile.TemporaryDirectory(prefix="patterngen-bench-lengths-") as tmp:
        os.environ[cache.ENV] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop(cache.ENV, None)
            else:
                os.environ[cache.ENV] = old


def kernel_sources() -> int:
    """Generated kernel sources in the kernel cache now (`cache.write_source` names them)."""
    from ...backends.triton import cache
    directory = cache.cache_dir() / "kernels"
    return len(list(directory.glob("patterngen_kernel_*.py"))) if directory.is_dir() else 0


def cache_limits() -> dict[str, int]:
    """The documented size of each cache `op.cache_entries` reports."""
    from ... import dispatch, op, registry
    from ...ir.spec import _bound
    return {"kernels": dispatch.MAX_KERNELS, "spec_texts": registry.MAX_SPECS, "specs": registry.MAX_SPECS,
            "bound_specs": _bound.cache_info().maxsize, "plans": op.MAX_PLANS,
            "tilings": dispatch.policy_tiling.cache_info().maxsize}


def cache_report() -> dict[str, dict]:
    """{cache: {"entries": n, "limit": size}} from `op.cache_entries()`."""
    from ... import op
    limits = cache_limits()
    return {name: {"entries": n, "limit": limits[name]} for name, n in op.cache_entries().items()}


def format_caches(caches: dict[str, dict]) -> str:
    return ", ".join(f"{k} {v['entries']}/{v['limit']}" for k, v in caches.items())


def _wall_ms(fn: Callable, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _error(e: BaseException, verbose: bool) -> str:
    if verbose:
        traceback.print_exc()
    return short_error(e)


# -- 1. Hugging Face greedy decode -------------------------------------------------------------
def build_model(s: Setup):
    """A random Llama (seeded, no download) on the setup's device and dtype, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(s.seed)
    config = LlamaConfig(**s.model, attention_dropout=0.0)
    with torch.device(s.device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=s.dtype).eval()
    model.config.patterngen_pattern = pattern(s.window)
    return model


def decode_steps(model, prompt: torch.Tensor, steps: int) -> tuple[float, list[float], list[int]]:
    """Greedy decoding by hand (what `generate(do_sample=False)` does, without its per-step
    extras, so that each step can be timed): (prefill ms, ms of each decode step, tokens)."""
    from transformers import DynamicCache
    device = prompt.device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill_ms, out = _wall_ms(lambda: model(input_ids=prompt, past_key_values=cache, use_cache=True), device)
        token = out.logits[:, -1:].argmax(-1)
        tokens, times = [int(token)], []
        for _ in range(steps):
            ms, out = _wall_ms(lambda: model(input_ids=token, past_key_values=cache, use_cache=True), device)
            token = out.logits[:, -1:].argmax(-1)
            times.append(ms)
            tokens.append(int(token))
    return prefill_ms, times, tokens


def bench_decode(s: Setup, log=print) -> dict:
    """Section 1: ms/token of patterngen and SDPA in the same model, sources and caches."""
    from ...integrations.transformers import register
    name = register()
    model = build_model(s)
    gen = torch.Generator().manual_seed(s.seed)
    prompt = torch.randint(0, s.model["vocab_size"], (1, s.prompt), generator=gen).to(s.device)
    before = kernel_sources()
    out: dict[str, Any] = {"model": dict(s.model), "prompt": s.prompt, "tokens": s.tokens,
                           "pattern": repr(pattern(s.window)), "impl": {}}
    for impl, label in ((name, "patterngen"), ("sdpa", "sdpa")):
        model.set_attn_implementation(impl)
        try:
            t0 = time.perf_counter()
            decode_steps(model, prompt, s.warmup_tokens)  # first calls: kernels, compilation
            warm_s = time.perf_counter() - t0
            prefill_ms, times, tokens = decode_steps(model, prompt, s.tokens)
            _, repeat, _ = decode_steps(model, prompt, s.tokens)  # the same lengths again: every cache warm
            out["impl"][label] = {"ms_per_token": statistics.median(times), "min_ms": min(times),
                                  "max_ms": max(times), "repeat_ms_per_token": statistics.median(repeat),
                                  "prefill_ms": prefill_ms, "warmup_s": warm_s, "steps": len(times),
                                  "tokens_head": tokens[:16]}
        except Exception as e:  # noqa: BLE001 - the other implementation still runs
            out["impl"][label] = {"error": _error(e, s.verbose)}
        log(f"[lengths] decode {label}: " + (f"{out['impl'][label]['ms_per_token']:.3f} ms/token"
                                              if "error" not in out["impl"][label] else out["impl"][label]["error"]),
            flush=True)
    pg_, sd = out["impl"].get("patterngen", {}), out["impl"].get("sdpa", {})
    if "ms_per_token" in pg_ and "ms_per_token" in sd:
        out["ratio"] = pg_["ms_per_token"] / sd["ms_per_token"]
        out["repeat_ratio"] = pg_["repeat_ms_per_token"] / sd["repeat_ms_per_token"]
    out["sources_generated"] = kernel_sources() - before
    out["caches"] = cache_report()
    return out


# -- 2 and 3. new lengths ----------------------------------------------------------------------
_FLEX = {}


def flex_fn(compiled: bool):
    """flex_attention, compiled once with dynamic=True (one graph for every length) or eager."""
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    if "compiled" not in _FLEX:
        raise_recompile_limits()
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["compiled"]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def length_spec(s: Setup):
    import patterngen as pg
    return pg.Spec(pattern(s.window), num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim)


def bench_one_length(s: Setup, spec, nq: int, nkv: int, gen: torch.Generator, others: bool = True,
                     flex_mask: FlexMask | None = None) -> dict:
    """patterngen (first call, steady state, sources), then (if `others`) FlexAttention and SDPA
    on the same inputs."""
    import torch.nn.functional as F

    import patterngen as pg
    from ... import dispatch
    from ...registry import spec_key
    row: dict[str, Any] = {"nq": nq, "nkv": nkv, "variant": "decode" if nq <= dispatch.DECODE_ROWS else "prefill"}
    shape = dict(device=s.device, dtype=s.dtype, generator=gen)
    q = torch.randn(1, s.heads, nq, s.head_dim, **shape)
    k = torch.randn(1, s.kv_heads, nkv, s.head_dim, **shape)
    v = torch.randn(1, s.kv_heads, nkv, s.head_dim, **shape)
    out = None
    try:
        before = kernel_sources()
        row["pg_first_ms"], out = _wall_ms(lambda: pg.attention(q, k, v, spec), s.device)
        row["sources_generated"] = kernel_sources() - before
        row["pg_ms"] = s.timer(lambda: pg.attention(q, k, v, spec))["ms"]
        # what ran, forward only (pg.explain would also build the backward kernels, more sources)
        row["ran"] = str(dispatch.choose(spec_key(spec), q, k))
    except Exception as e:  # noqa: BLE001
        row["pg_error"] = _error(e, s.verbose)
    flex_mask = flex_mask or FlexMask(s.window, s.device)
    gqa = {"enable_gqa": True} if s.kv_heads != s.heads else {}
    if not others:
        row["skipped"] = "FlexAttention and SDPA: past the run's time budget"
        return row
    if s.flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask
            fn = flex_fn(s.flex_compiled)
            row["flex_mask_ms"], bm = _wall_ms(
                lambda: create_block_mask(flex_mask.at(nq, nkv), None, None, nq, nkv, device=s.device,
                                          BLOCK_SIZE=s.flex_block),
                s.device)
            row["flex_first_ms"], fout = _wall_ms(lambda: fn(q, k, v, block_mask=bm, **gqa), s.device)
            row["flex_ms"] = s.timer(lambda: fn(q, k, v, block_mask=bm, **gqa))["ms"]
            if out is not None:
                row["err_vs_flex"] = _max_err(out, fout)
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = _error(e, s.verbose)
    try:
        if nq == nkv:
            causal = s.timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa))
            row["sdpa_causal_ms"] = causal["ms"]
        dense = flex_mask.dense(nq, nkv)
        row["sdpa_mask_ms"] = s.timer(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, **gqa))["ms"]
        if out is not None:
            row["err_vs_sdpa_mask"] = _max_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense, **gqa))
    except Exception as e:  # noqa: BLE001
        row["sdpa_error"] = _error(e, s.verbose)
    if row.get("pg_ms"):
        if row.get("flex_ms"):
            row["x_flex"] = row["flex_ms"] / row["pg_ms"]
            row["x_flex_with_mask"] = (row["flex_ms"] + row["flex_mask_ms"]) / row["pg_ms"]
        sdpa = row.get("sdpa_causal_ms") or row.get("sdpa_mask_ms")
        if sdpa:
            row["x_sdpa"] = sdpa / row["pg_ms"]
    return row


def bench_lengths(s: Setup, log=print, started: float | None = None, on_row=None) -> dict:
    """Sections 2 and 3: every length of the setup, in order, none of them seen before. Past
    `s.budget_s` seconds from `started`, only patterngen is measured; `on_row(out)` is called
    after every length (to rewrite the output files)."""
    spec = length_spec(s)
    gen = torch.Generator(s.device).manual_seed(s.seed)
    out: dict[str, Any] = {"spec": repr(spec), "flex": {"enabled": s.flex, "compiled": s.flex_compiled,
                                                        "dynamic": s.flex_compiled, "block_size": s.flex_block},
                           "rows": []}
    before = kernel_sources()
    started = time.perf_counter() if started is None else started
    flex_mask = FlexMask(s.window, s.device)
    for nq, nkv in s.lengths:
        others = s.budget_s is None or time.perf_counter() - started < s.budget_s
        row = bench_one_length(s, spec, nq, nkv, gen, others, flex_mask)
        out["rows"].append(row)
        if on_row is not None:
            on_row(out)
        errors = [f"{k}: {v}" for k, v in row.items() if k.endswith("_error")]
        log(f"[lengths] Nq={nq} Nkv={nkv}: patterngen first {_f(row.get('pg_first_ms'))} ms, "
            f"steady {_f(row.get('pg_ms'))} ms, {row.get('sources_generated', '?')} new sources"
            + "".join(f"; {e}" for e in errors), flush=True)
    rows = out["rows"]
    out["sources_generated"] = kernel_sources() - before
    seen: set[str] = set()
    later = []  # rows after the first of their kernel variant: each should generate nothing
    for r in rows:
        if r["variant"] in seen:
            later.append(r)
        seen.add(r["variant"])
    out["sources_at_later_lengths"] = sum(r.get("sources_generated", 0) for r in later)
    firsts = [r for r in rows if "pg_first_ms" in r]
    out["first_call_ms"] = {v: [r["pg_first_ms"] for r in firsts if r["variant"] == v] for v in ("prefill", "decode")}
    x = [r["x_flex"] for r in rows if r.get("x_flex")]
    if x:
        out["geomean_x_flex"] = math.exp(sum(map(math.log, x)) / len(x))
    out["caches"] = cache_report()
    return out


# -- the report --------------------------------------------------------------------------------
def _f(x, fmt="{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return fmt.format(x)


DECODE_COLUMNS = ("impl", "ms/token", "repeat ms/token", "prefill ms", "warm-up s", "steps")
LENGTH_COLUMNS = ("Nq", "Nkv", "variant", "pg 1st ms", "pg ms", "new src", "mask ms", "flex 1st ms", "flex ms",
                  "x flex", "x flex+mask", "sdpa ms", "x sdpa", "err")


def decode_rows(dec: dict) -> list[list[str]]:
    rows = []
    for label, r in dec.get("impl", {}).items():
        if "error" in r:
            rows.append([label, r["error"]] + [""] * (len(DECODE_COLUMNS) - 2))
        else:
            rows.append([label, _f(r["ms_per_token"]), _f(r["repeat_ms_per_token"]), _f(r["prefill_ms"]),
                         _f(r["warmup_s"]), str(r["steps"])])
    return rows


def length_rows(lens: dict) -> list[list[str]]:
    rows = []
    for r in lens.get("rows", []):
        err = [r.get("err_vs_flex"), r.get("err_vs_sdpa_mask")]
        err = max((e for e in err if e is not None), default=None)
        sdpa = r.get("sdpa_causal_ms") or r.get("sdpa_mask_ms")
        rows.append([str(r["nq"]), str(r["nkv"]), r["variant"], _f(r.get("pg_first_ms")), _f(r.get("pg_ms")),
                     str(r.get("sources_generated", "-")), _f(r.get("flex_mask_ms")), _f(r.get("flex_first_ms")),
                     _f(r.get("flex_ms")), _f(r.get("x_flex"), "{:.2f}x"), _f(r.get("x_flex_with_mask"), "{:.2f}x"),
                     _f(sdpa), _f(r.get("x_sdpa"), "{:.2f}x"), _f(err, "{:.1e}")])
    return rows


def summary_lines(doc: dict) -> list[str]:
    """The figures a reader wants first, one line each; a section cut short shows what it has."""
    lines = []
    dec, lens = doc.get("decode", {}), doc.get("lengths", {})
    if "error" in dec:
        lines.append(f"decode: FAILED: {dec['error']}")
    if "ratio" in dec:
        pg_, sd = dec["impl"]["patterngen"], dec["impl"]["sdpa"]
        lines.append(f"decode: patterngen {pg_['ms_per_token']:.3f} ms/token, sdpa {sd['ms_per_token']:.3f} "
                     f"ms/token: ratio {dec['ratio']:.2f}x (same lengths again: {dec['repeat_ratio']:.2f}x)")
    if "caches" in dec:
        lines.append(f"decode: {dec['sources_generated']} kernel sources generated; caches: "
                     f"{format_caches(dec['caches'])}")
    if "error" in lens:
        lines.append(f"lengths: FAILED: {lens['error']}")
    rows = lens.get("rows", [])
    if "sources_generated" in lens:
        lines.append(f"lengths: {lens['sources_generated']} kernel sources generated over {len(rows)} new "
                     f"lengths, {lens['sources_at_later_lengths']} of them after the first length of each variant "
                     f"(prefill, decode)")
    skipped = sum("skipped" in r for r in rows)
    if skipped:
        lines.append(f"lengths: FlexAttention and SDPA skipped at {skipped} lengths (time budget)")
    if "geomean_x_flex" in lens:
        lines.append(f"lengths: geometric mean speedup over FlexAttention {lens['geomean_x_flex']:.2f}x")
    if "caches" in lens:
        lines.append(f"lengths: caches: {format_caches(lens['caches'])}")
    return lines


def to_markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# {TITLE}", ""]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [f"- device: {env.get('device')}", f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
              f"- date: {env['date']}", f"- setup: {json.dumps(doc['setup'])}", f"- timing: {doc['timing']}", ""]

    def table(columns, rows):
        return (["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(columns) - 1)) + " |"]
                + ["| " + " | ".join(r) + " |" for r in rows] + [""])

    if doc.get("decode", {}).get("impl"):
        lines += ["## Greedy decode (Hugging Face Llama)", ""] + table(DECODE_COLUMNS, decode_rows(doc["decode"]))
    if doc.get("lengths", {}).get("rows"):
        lines += ["## New lengths", ""] + table(LENGTH_COLUMNS, length_rows(doc["lengths"]))
        lines += ["Columns: `pg 1st ms` is the first call at a length never seen (wall clock, generation and "
                  "compilation included); `pg ms`, `flex ms`, `sdpa ms` are steady-state medians; `new src` is the "
                  "kernel sources that first call generated; `mask ms` is building FlexAttention's block mask for "
                  "the length; `sdpa ms` is causal SDPA when Nq = Nkv, else SDPA with the exact dense mask; `err` is "
                  "max |patterngen - flex or masked SDPA|.", ""]
    lines += [f"- {line}" for line in summary_lines(doc)]
    return "\n".join(lines) + "\n"


def write_outputs(path: str, doc: dict) -> list[Path]:
    """PATH.json and PATH.md (whatever suffix PATH has), each written atomically."""
    return write_json_and_markdown(path, doc, to_markdown(doc))


def print_tables(doc: dict) -> None:
    env = doc["environment"]
    print()
    print(f"{TITLE} on {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}; "
          f"{doc['setup']['dtype']}" + (f" -- {doc['note']}" if doc.get("note") else ""))
    if doc.get("decode", {}).get("impl"):
        print(align_columns([list(DECODE_COLUMNS)] + decode_rows(doc["decode"])))
    if doc.get("lengths", {}).get("rows"):
        print(align_columns([list(LENGTH_COLUMNS)] + length_rows(doc["lengths"])))
    for line in summary_lines(doc):
        print(line)


def run_all(s: Setup, out: str | None = None, log=print) -> dict:
    """Both sections in a private kernel cache; the files are rewritten after each section."""
    doc: dict[str, Any] = {"title": TITLE, "note": CPU_NOTE if s.device.type != "cuda" else None,
                           "environment": environment(s.device), "setup": s.describe(),
                           "timing": s.timer.describe() + "; first calls and decode steps: wall clock"}
    started = time.perf_counter()

    def partial(section: dict) -> None:
        doc["lengths"] = section
        if out:
            write_outputs(out, doc)

    sections = (("decode", lambda: bench_decode(s, log)),
                ("lengths", lambda: bench_lengths(s, log, started, partial)))
    with private_kernel_cache():
        for name, section in sections:
            t0 = time.perf_counter()
            try:
                doc[name] = section()
            except Exception as e:  # noqa: BLE001 - the other section still runs (rows measured are kept)
                doc[name] = {**doc.get(name, {}), "error": _error(e, s.verbose)}
            doc[name]["seconds"] = time.perf_counter() - t0
            log(f"[lengths] {name}: {doc[name]['seconds']:.1f} s", flush=True)
            if out:
                write_outputs(out, doc)
    return doc


def run(args) -> int:
    """`patterngen bench --lengths` with parsed arguments; 1 if a section or a length failed."""
    if args.tokens < 1:
        print("patterngen bench --lengths: --tokens must be at least 1")
        return 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    s = setup_for(device, args.tokens, args.quick)
    s.seed, s.verbose = args.seed, args.verbose
    if not cuda:
        import warnings
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        print(f"{TITLE}: {CPU_NOTE}", flush=True)
    doc = run_all(s, args.out)
    print_tables(doc)
    if args.out:
        print("wrote " + ", ".join(str(p) for p in write_outputs(args.out, doc)))
    failed = ("error" in doc["decode"] or "error" in doc["lengths"]
              or any("error" in r for r in doc["decode"].get("impl", {}).values())
              or any(k.endswith("_error") for r in doc["lengths"].get("rows", []) for k in r))
    return 1 if failed else 0
