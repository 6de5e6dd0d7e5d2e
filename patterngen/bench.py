"""`patterngen bench`: patterngen's forward kernel against FlexAttention and dense SDPA.

The suite is the one of issue 3 (bf16, head dim 128, batch 1). For every case,
in one process on the current GPU, it times

* patterngen: the generated Triton forward (`TritonForward`) with the tiling the
  simulator picks (a default when the simulator is missing or its pick does not
  run), the best of a few warp/stage configurations;
* FlexAttention: `torch.compile(flex_attention)` with the block mask of the
  equivalent mask_mod (`patterngen.flex`), block sizes 128 and 64, the faster
  kept; building the block mask is timed separately;
* SDPA: dense attention without a mask (the baseline of the simulator's bound),
  with `is_causal=True` for causal cases (the FlashAttention/cuDNN floor), and
  with the dense boolean mask when it fits in memory;

checks patterngen's output against FlexAttention's, and reports speedups, the
simulator's bound and how much of it is realised. Kernel times are medians of
CUDA-event timings after warm-up, with the L2 cache flushed before each repeat.

Without a GPU nothing is timed; `--cpu-smoke` runs tiny versions of the cases
on the CPU (the Triton interpreter, eager FlexAttention) to exercise the code.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .backends.inputs import head_selection
from .ir import Band, Causal, Heads, Routed, Sink, Spec, Strided, Window
from .semantics import visible
from .tiles import Tiling

SMOKE_NOTE = "CPU smoke test, not a performance figure"
SCALES = ("full", "quick", "smoke")
FLEX_BLOCK_SIZES = (128, 64)
L2_FLUSH_BYTES = 256 * 1024 * 1024


# == the suite =============================================================================
@dataclass(frozen=True)
class Case:
    """One benchmark case: a spec at one scale and what to compare it with."""

    name: str
    title: str
    spec: Spec
    causal: bool  # every visible pair has kv <= q: SDPA is_causal=True is a fair floor
    block_sparse_target: bool = False  # the issue's >= 85%-of-bound target applies
    active_heads: float | None = None  # Mixture-of-Head routing: the fraction of heads each token uses


def moh_routing(spec: Spec, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Head indices [1, Nq, k] of a MoH router with random scores: H/8 shared heads (at least
    one) plus the top routed heads, `fraction` of the heads per token in all."""
    from .head_routing import route_heads
    H = spec.num_heads
    shared = max(1, H // 8)
    scores = torch.randn(1, spec.nq, H, generator=generator)
    return route_heads(scores, max(0, round(fraction * H) - shared), shared=shared)[0]


def _s2(heads: int, band: int, stride: int):
    return Heads([(Band(band - 1) | Strided(stride, offset=h % stride)) & Causal() for h in range(heads)])


def suite(scale: str = "full") -> list[Case]:
    """The cases of issue 3 item 8 at `scale`: "full" (the issue's sizes), "quick" (about
    a quarter of the tokens per dimension, for a run of seconds on a GPU) or "smoke" (tiny,
    fp32-sized for the CPU interpreter, 2-4 heads of dim 32)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "full":
        hd, h32, h24 = 128, 32, 24
        n32k, win, sink_win, n8k = 32768, 4096, 1024, 8192
        grid2, win2 = (128, 128), (31, 31)
        grid3, win3, stride3 = (30, 48, 80), (18, 24, 24), (16, 8, 8)
        s2_band, s2_stride, route = 1024, 8, (128, 16)
    elif scale == "quick":
        hd, h32, h24 = 128, 32, 24
        n32k, win, sink_win, n8k = 8192, 1024, 256, 2048
        grid2, win2 = (64, 64), (15, 15)
        grid3, win3, stride3 = (16, 24, 40), (9, 12, 12), (8, 4, 4)
        s2_band, s2_stride, route = 256, 8, (128, 4)
    else:
        hd, h32, h24 = 32, 2, 2
        n32k, win, sink_win, n8k = 256, 64, 32, 128
        grid2, win2 = (16, 16), (5, 5)
        grid3, win3, stride3 = (4, 8, 8), (3, 4, 4), (2, 2, 2)
        s2_band, s2_stride, route = 32, 4, (32, 2)
    s2_heads = h32 if scale != "smoke" else 4
    moh_heads = h32 if scale != "smoke" else 4

    def spec(pattern, shape, heads):
        return Spec(pattern, shape, num_heads=heads, head_dim=hd)

    return [
        Case("causal-sliding-window", f"causal sliding window, {n32k} tokens, window {win}",
             spec(Band(win - 1), n32k, h32), causal=True),
        Case("sinks-window", f"4 sinks + window {sink_win}, {n32k} tokens",
             spec((Sink(4) | Band(sink_win - 1)) & Causal(), n32k, h32), causal=True),
        Case("neighborhood-2d", f"2-D neighborhood {grid2[0]}x{grid2[1]}, window {win2[0]}x{win2[1]}",
             spec(Window(win2), grid2, h24), causal=False),
        Case("gna-3d", f"3-D GNA {'x'.join(map(str, grid3))}, window {'x'.join(map(str, win3))}, stride 1",
             spec(Window(win3), grid3, h24), causal=False),
        Case("gna-3d-strided", f"3-D GNA {'x'.join(map(str, grid3))}, window {'x'.join(map(str, win3))}, "
             f"stride {'x'.join(map(str, stride3))}",
             spec(Window(win3, stride=stride3), grid3, h24), causal=False, block_sparse_target=True),
        Case("s2-shards", f"S2-style per-head shards, {n32k} tokens: band {s2_band} + stride {s2_stride}, "
             f"offset per head", spec(_s2(s2_heads, s2_band, s2_stride), n32k, s2_heads), causal=True),
        Case("routed-topk", f"routed top-k, {n32k} tokens, block {route[0]}, top-k {route[1]}",
             spec(Routed(route[0], route[1], causal=True), n32k, h32), causal=True),
        Case("dense-causal", f"dense causal, {n8k} tokens", spec(Causal(), n8k, h32), causal=True),
    ] + [
        Case(f"moh-{name}-{round(100 * f)}", f"MoH {title}, {round(100 * f)}% of {moh_heads} heads per token",
             spec(pattern, shape, moh_heads), causal=causal, active_heads=f)
        for name, title, pattern, shape, causal in (
            ("causal", f"causal, {n32k} tokens", Causal(), n32k, True),
            ("neighborhood-2d", f"2-D neighborhood {grid2[0]}x{grid2[1]}, window {win2[0]}x{win2[1]}",
             Window(win2), grid2, False))
        for f in (0.5, 0.75)]


# == timing ================================================================================
class CudaTimer:
    """Median of CUDA-event timings: warm-up first, the L2 cache flushed before every repeat."""

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                 min_reps: int = 5, max_reps: int = 200):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def describe(self) -> str:
        return (f"median of CUDA-event timings, >= {self.min_reps} repeats over ~{self.rep_ms:g} ms after "
                f"~{self.warmup_ms:g} ms of warm-up, {L2_FLUSH_BYTES >> 20} MiB L2 flush before each repeat")

    def __call__(self, fn: Callable[[], Any]) -> dict:
        fn()  # compile / autotune / first-use costs stay out of the numbers
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            self._flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate))):
            fn()
        reps = min(self.max_reps, max(self.min_reps, int(self.rep_ms / estimate)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        times = sorted(s.elapsed_time(e) for s, e in events)
        return {"ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "reps": reps}


class CpuTimer:
    """Wall-clock median on the CPU (smoke tests only: these are not performance figures)."""

    def __init__(self, reps: int = 1):
        self.reps = reps

    def describe(self) -> str:
        return f"wall clock on the CPU, median of {self.reps} after one warm-up call ({SMOKE_NOTE})"

    def __call__(self, fn: Callable[[], Any]) -> dict:
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "reps": self.reps}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# == the pieces of one case ===================================================================
def device_model_name(device_name: str) -> str | None:
    """The shipped simulator model for a GPU name ('NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    low = device_name.lower()
    for key in ("h200", "h100", "b200", "a100"):
        if key in low:
            return key
    return None


def _simulator():
    """patterngen.simulate as a module, or None while it does not exist."""
    try:
        return importlib.import_module("patterngen.simulate")
    except ImportError:
        return None


def simulate_case(spec: Spec, q_tile=None, kv_tile=None, device_model: str | None = None,
                  block_indices: torch.Tensor | None = None, head_indices: torch.Tensor | None = None):
    """The simulator's report (None when the simulator is unavailable or fails; the reason is returned)."""
    sim = _simulator()
    if sim is None or not hasattr(sim, "simulate"):
        return None, "simulator not available"
    kwargs = {}
    if block_indices is not None:
        kwargs["block_indices"] = block_indices.cpu()
    if head_indices is not None:
        kwargs["active_heads"] = head_indices.cpu()
    try:
        return sim.simulate(spec, q_tile, kv_tile, device=device_model, **kwargs), None
    except TypeError:
        if not kwargs:
            raise
        return sim.simulate(spec, q_tile, kv_tile, device=device_model), None  # an older signature
    except (ValueError, NotImplementedError) as e:
        return None, f"simulator: {e}"


def default_tiling(spec: Spec) -> Tiling:
    """Used when the simulator gives nothing runnable: the routing block for Routed specs,
    flat 128/64 on 1-D sequences, 128-token boxes of near-equal sides on n-D grids."""
    if spec.routed is not None:
        return Tiling(spec.routed.block, spec.routed.block)
    if spec.ndim == 1:
        return Tiling(128, 64)
    box = [1] * spec.ndim
    while math.prod(box) < 128:  # double the dimension with most room left, innermost first on ties
        k = max(reversed(range(spec.ndim)), key=lambda i: spec.q_shape[i] / box[i])
        box[k] *= 2
    return Tiling(tuple(box), tuple(box))


def _to_tile(t):
    return list(t) if isinstance(t, tuple) else t


def _fmt_tile(t) -> str:
    return "x".join(map(str, t)) if isinstance(t, (tuple, list)) else str(t)


def dense_mask_on(spec: Spec, device: torch.device, block_indices: torch.Tensor | None = None,
                  max_chunk: int = 1 << 26) -> torch.Tensor:
    """bool [1 or H, Nq, Nkv] built on `device` in row chunks (the oracle builds on the
    CPU in one piece, which is too big for the suite's sizes); one slice when all heads
    share a pattern."""
    from .routing import block_masks, normalize_block_indices

    table = None
    if spec.routed is not None:
        table = block_masks(spec, normalize_block_indices(spec, block_indices).to(device))[0]
        patterns = list(spec.head_patterns)
    else:
        patterns = list(spec.head_patterns.unique)
    out = torch.empty(len(patterns), spec.nq, spec.nkv, dtype=torch.bool, device=device)
    kv = torch.arange(spec.nkv, device=device)[None, :]
    rows = max(1, max_chunk // spec.nkv)
    for i, p in enumerate(patterns):
        bm = None if table is None else table[i]
        for r0 in range(0, spec.nq, rows):
            q = torch.arange(r0, min(spec.nq, r0 + rows), device=device)[:, None]
            out[i, r0:r0 + rows] = visible(p, q, kv, spec, bm)
    if len(patterns) > 1 and spec.routed is None:
        index = torch.tensor([patterns.index(p) for p in spec.head_patterns], device=device)
        out = out[index]
    return out


def _mask_bytes(spec: Spec) -> int:
    """Memory of the dense-mask SDPA run: the bool mask plus the additive mask SDPA makes of it."""
    heads = 1 if (spec.routed is None and len(spec.head_patterns.unique) == 1) else spec.num_heads
    return heads * spec.nq * spec.nkv * (1 + 2 + 2)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 8 << 30  # smoke sizes are tiny; no need to ask the OS


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs().max()
    return float(d) if torch.isfinite(d) else math.inf


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


_COMPILED_FLEX = None


def raise_recompile_limits(limit: int = 256) -> None:
    """Every case and block size compiles flex_attention and create_block_mask anew; past
    dynamo's default limit (8) it would silently run them eagerly, materialising the
    whole score matrix (out of memory at the suite's sizes)."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def _flex_fn(compiled: bool):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        raise_recompile_limits()
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    timer: Callable
    flex_compiled: bool = True
    flex_block_sizes: tuple[int, ...] = FLEX_BLOCK_SIZES
    sweep_configs: bool = True
    tiles: str = "sim"  # sim | default | autotune
    sdpa_mask: str = "auto"  # auto | always | never
    seed: int = 0
    verbose: bool = False


@dataclass
class CaseResult:
    case: Case
    status: str = "ok"
    pg: dict | None = None
    flex: dict | None = None
    sdpa: dict = field(default_factory=dict)
    sim: dict | None = None
    err_vs_flex: float | None = None
    err_vs_sdpa_mask: float | None = None
    notes: list[str] = field(default_factory=list)

    # derived figures -----------------------------------------------------------------
    @property
    def pg_ms(self):
        return self.pg["ms"] if self.pg else None

    @property
    def flex_ms(self):
        return self.flex["ms"] if self.flex else None

    @property
    def sdpa_ms(self):
        return self.sdpa.get("dense", {}).get("ms")

    @property
    def speedup_vs_flex(self):
        return self.flex_ms / self.pg_ms if self.pg_ms and self.flex_ms else None

    @property
    def speedup_vs_sdpa(self):
        return self.sdpa_ms / self.pg_ms if self.pg_ms and self.sdpa_ms else None

    @property
    def speedup_vs_sdpa_causal(self):
        c = self.sdpa.get("causal", {}).get("ms")
        return c / self.pg_ms if self.pg_ms and c else None

    @property
    def bound(self):
        return self.sim["tile_speedup"] if self.sim else None

    @property
    def bound_realised(self):
        s, b = self.speedup_vs_sdpa, self.bound
        return s / b if s and b and math.isfinite(b) else None

    def to_dict(self) -> dict:
        c = self.case
        return {"case": c.name, "title": c.title, "spec": repr(c.spec), "causal": c.causal, "status": self.status,
                "patterngen": self.pg, "flex": self.flex, "sdpa": self.sdpa, "simulator": self.sim,
                "patterngen_ms": self.pg_ms, "flex_ms": self.flex_ms, "sdpa_ms": self.sdpa_ms,
                "speedup_vs_flex": self.speedup_vs_flex, "speedup_vs_sdpa": self.speedup_vs_sdpa,
                "speedup_vs_sdpa_causal": self.speedup_vs_sdpa_causal, "bound": self.bound,
                "bound_realised": self.bound_realised, "err_vs_flex": self.err_vs_flex,
                "err_vs_sdpa_mask": self.err_vs_sdpa_mask, "notes": self.notes}


def _sim_summary(report) -> dict:
    out = {"q_tile": _to_tile(report.q_tile), "kv_tile": _to_tile(report.kv_tile),
           "tile_speedup": float(report.tile_speedup), "flop_speedup": float(report.flop_speedup)}
    for name in ("fully_block_sparse", "predicted_speedup", "predicted_time_s", "dense_time_s", "active_fraction",
                 "all_heads_time_s", "routing_speedup"):
        v = getattr(report, name, None)
        if v is not None:
            out[name] = v if isinstance(v, bool) else float(v)
    return out


def _kernel_candidates(spec: Spec, opts: Options, sim_tiling: Tiling | None):
    """(tiling, configs) to try, best guess first."""
    from .backends.triton.runtime import KernelConfig, default_config

    tilings = []
    if opts.tiles == "sim" and sim_tiling is not None:
        tilings.append(sim_tiling)
    tilings.append(default_tiling(spec))

    def configs(t: Tiling):
        vol = math.prod(t.q_tile) if isinstance(t.q_tile, tuple) else t.q_tile
        block_d = max(16, 1 << (spec.head_dim - 1).bit_length())
        first = default_config(vol, block_d)
        if not opts.sweep_configs:
            return [first]
        rest = [KernelConfig(w, s) for w in (4, 8) for s in (2, 3)]
        return [first] + [c for c in rest if c != first]

    return [(t, configs(t)) for t in dict.fromkeys(tilings)]


def run_patterngen(spec: Spec, q, k, v, opts: Options, sim_tiling: Tiling | None, block_indices=None,
                   head_indices=None):
    """(timing dict, output) of the fastest kernel that builds and runs; raises
    NotImplementedError when the backend does not support the spec. With `head_indices`
    the head-routed kernels run, and the plain kernel of the same tiles and launch
    configuration is timed too (`all_heads_ms`: computing every head)."""
    from .backends.triton import TritonForward

    call_kwargs = {} if block_indices is None else {"block_indices": block_indices}
    if head_indices is not None:
        return _run_heads(spec, q, k, v, opts, sim_tiling, head_indices)
    if opts.tiles == "autotune":
        from .backends.triton import tuned_kernel
        t0 = time.perf_counter()
        kern = tuned_kernel(spec, q, k, v, **call_kwargs)
        build_s = time.perf_counter() - t0
        timing = opts.timer(lambda: kern(q, k, v, **call_kwargs))
        out = kern(q, k, v, **call_kwargs)[0]
        return {**timing, "q_tile": _to_tile(kern.q_grid.tile), "kv_tile": _to_tile(kern.kv_grid.tile),
                "num_warps": kern.config.num_warps, "num_stages": kern.config.num_stages, "build_s": build_s,
                "tiling_from": "autotune"}, out
    best, best_out, failures = None, None, []
    for tiling, configs in _kernel_candidates(spec, opts, sim_tiling):
        for config in configs:
            try:
                t0 = time.perf_counter()
                kern = TritonForward(spec, tiling, config)
                build_s = time.perf_counter() - t0
                timing = opts.timer(lambda: kern(q, k, v, **call_kwargs))
            except NotImplementedError:
                raise
            except ValueError as e:  # this tiling is not one the backend runs: try the next
                failures.append(f"{_fmt_tile(tiling.q_tile)}/{_fmt_tile(tiling.kv_tile)}: {_short(e)}")
                break
            except Exception as e:  # noqa: BLE001 - e.g. out of resources for one config
                failures.append(f"{_fmt_tile(tiling.q_tile)}/{_fmt_tile(tiling.kv_tile)} {config}: {_short(e)}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if best is None or timing["ms"] < best["ms"]:
                best = {**timing, "q_tile": _to_tile(tiling.q_tile), "kv_tile": _to_tile(tiling.kv_tile),
                        "num_warps": config.num_warps, "num_stages": config.num_stages, "build_s": build_s,
                        "tiling_from": "simulator" if tiling == sim_tiling else "default"}
                best_out = kern(q, k, v, **call_kwargs)[0]
        if best is not None:
            break  # the first tiling that runs is the one measured (the simulator's when it runs)
    if best is None:
        raise RuntimeError("no patterngen kernel ran: " + "; ".join(failures))
    if failures:
        best["failures"] = failures
    return best, best_out


def _run_heads(spec: Spec, q, k, v, opts: Options, sim_tiling: Tiling | None, head_indices):
    from .backends.triton import TritonForward, TritonHeads
    from .backends.triton.runtime import default_kernel_tiling

    tilings = list(dict.fromkeys(t for t in (sim_tiling, default_kernel_tiling(spec)) if t is not None))
    best, best_out, failures = None, None, []
    for tiling in tilings:
        for config in dict(_kernel_candidates(spec, opts, tiling)).get(tiling, [None]):
            try:
                t0 = time.perf_counter()
                kern = TritonHeads(spec, tiling, config)
                build_s = time.perf_counter() - t0
                timing = opts.timer(lambda: kern.forward(q, k, v, head_indices))
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 - a tiling or configuration that does not run here
                failures.append(f"{_fmt_tile(tiling.q_tile)}/{_fmt_tile(tiling.kv_tile)} {config}: {_short(e)}")
                continue
            if best is None or timing["ms"] < best["ms"]:
                best = {**timing, "q_tile": _to_tile(tiling.q_tile), "kv_tile": _to_tile(tiling.kv_tile),
                        "num_warps": kern.config.num_warps, "num_stages": kern.config.num_stages,
                        "build_s": build_s, "tiling_from": "simulator" if tiling == sim_tiling else "default",
                        "_kernel": kern}
        if best is not None:
            break
    if best is None:
        raise RuntimeError("no patterngen kernel ran: " + "; ".join(failures))
    kern = best.pop("_kernel")
    best_out = kern.forward(q, k, v, head_indices)[0]
    plain = TritonForward(spec, Tiling(kern.fwd.q_grid.tile, kern.fwd.kv_grid.tile), kern.config)
    best["all_heads_ms"] = opts.timer(lambda: plain(q, k, v))["ms"]
    best["vs_all_heads"] = best["all_heads_ms"] / best["ms"] if best["ms"] else None
    best["active_fraction"] = float(head_selection(head_indices, spec.num_heads).float().mean())
    if failures:
        best["failures"] = failures
    return best, best_out


def run_flex(spec: Spec, q, k, v, opts: Options, block_indices=None, head_chosen=None):
    """(timing dict of the fastest block size, its output)."""
    from .flex import block_mask_for

    fn = _flex_fn(opts.flex_compiled)
    gqa = {"enable_gqa": True} if spec.num_kv_heads != spec.num_heads else {}
    best, best_out, per_block = None, None, {}
    for bs in opts.flex_block_sizes:
        try:
            _sync(opts.device)
            t0 = time.perf_counter()
            bm = block_mask_for(spec, bs, opts.device, compile=opts.device.type == "cuda",
                                block_indices=block_indices, head_chosen=head_chosen)
            _sync(opts.device)
            mask_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn(q, k, v, block_mask=bm, **gqa)  # first call: compilation, kept out of the timing
            _sync(opts.device)
            compile_s = time.perf_counter() - t0
            timing = opts.timer(lambda: fn(q, k, v, block_mask=bm, **gqa))
        except Exception as e:  # noqa: BLE001 - one block size failing must not hide the other
            per_block[bs] = {"error": _short(e)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        per_block[bs] = {"ms": timing["ms"], "block_mask_s": mask_s, "first_call_s": compile_s}
        if best is None or timing["ms"] < best["ms"]:
            best = {**timing, "block_size": bs, "block_mask_s": mask_s, "first_call_s": compile_s,
                    "compiled": opts.flex_compiled}
            best_out = fn(q, k, v, block_mask=bm, **gqa)
        del bm
    if best is None:
        raise RuntimeError("FlexAttention failed for every block size: " +
                           "; ".join(f"{b}: {r['error']}" for b, r in per_block.items()))
    best["per_block_size"] = {str(b): r for b, r in per_block.items()}
    return best, best_out


def run_sdpa(case: Case, q, k, v, opts: Options, block_indices=None, result: CaseResult | None = None,
             head_chosen=None):
    """Dense SDPA timings: without a mask, causal, and with the dense mask when it fits
    (and'ed with `head_chosen` [B, H, Nq] under head routing). Returns the masked output (or None)."""
    import torch.nn.functional as F

    spec = case.spec
    gqa = {"enable_gqa": True} if spec.num_kv_heads != spec.num_heads else {}
    out = {}
    variants = [("dense", {})]
    if case.causal:
        variants.append(("causal", {"is_causal": True}))
    for name, kw in variants:
        try:
            out[name] = opts.timer(lambda: F.scaled_dot_product_attention(q, k, v, **kw, **gqa))
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": _short(e)}
    masked_out = None
    need, free = _mask_bytes(spec), _free_bytes(opts.device)
    if opts.sdpa_mask == "never" or (opts.sdpa_mask == "auto" and need > 0.45 * free):
        out["mask"] = {"skipped": f"dense mask needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                       if opts.sdpa_mask == "auto" else "disabled (--sdpa-mask never)"}
    else:
        try:
            mask = dense_mask_on(spec, opts.device, block_indices)[None]
            if head_chosen is not None:
                mask = mask & head_chosen.to(opts.device)[..., None]
            out["mask"] = opts.timer(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa))
            masked_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
            del mask
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            out["mask"] = {"error": _short(e)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if result is not None:
        result.sdpa = out
    return out, masked_out


def run_case(case: Case, opts: Options, device_model: str | None = None) -> CaseResult:
    """Everything measured for one case (failures are recorded, not raised)."""
    res = CaseResult(case)
    spec = case.spec
    g = torch.Generator(device="cpu").manual_seed(opts.seed)
    B, D = 1, spec.head_dim

    def rand(h, n):
        return torch.randn(B, h, n, D, generator=g).to(device=opts.device, dtype=opts.dtype)

    q, k, v = rand(spec.num_heads, spec.nq), rand(spec.num_kv_heads, spec.nkv), rand(spec.num_kv_heads, spec.nkv)
    block_indices = head_indices = head_chosen = None
    if spec.routed is not None:
        from .routing import route
        r = spec.routed
        block_indices = route(q, k, r.block, r.topk, causal=r.causal)
    if case.active_heads is not None:
        head_indices = moh_routing(spec, case.active_heads, g).to(opts.device)
        head_chosen = head_selection(head_indices, spec.num_heads)

    # the simulator: its tiling and its bound
    t0 = time.perf_counter()
    fixed = (spec.routed.block,) * 2 if spec.routed is not None else (None, None)  # routed: tiles = blocks
    report, why = simulate_case(spec, *fixed, device_model=device_model, block_indices=block_indices,
                                head_indices=head_indices)
    sim_s = time.perf_counter() - t0
    sim_tiling = None
    if report is not None:
        sim_tiling = Tiling(report.q_tile, report.kv_tile)
        res.sim = {**_sim_summary(report), "device_model": device_model, "elapsed_s": sim_s}
    else:
        res.notes.append(why)

    # patterngen
    pg_out = None
    try:
        res.pg, pg_out = run_patterngen(spec, q, k, v, opts, sim_tiling, block_indices, head_indices)
    except NotImplementedError as e:
        res.status = ("skipped: Routed not in the Triton backend yet" if spec.routed is not None
                      else f"skipped: {_short(e)}")
    except Exception as e:  # noqa: BLE001
        res.status = f"patterngen failed: {_short(e)}"
        if opts.verbose:
            traceback.print_exc()
    if res.pg is not None and report is not None:
        ran = (res.pg["q_tile"], res.pg["kv_tile"])
        if ran != (_to_tile(report.q_tile), _to_tile(report.kv_tile)):  # bound at the tiles that ran
            other, why = simulate_case(spec, _tile_arg(ran[0]), _tile_arg(ran[1]), device_model, block_indices,
                                       head_indices)
            if other is not None:
                res.sim = {**_sim_summary(other), "device_model": device_model,
                           "simulator_pick": [_to_tile(report.q_tile), _to_tile(report.kv_tile)]}
                res.notes.append("the simulator's tiling did not run; bound given at the tiling that ran")

    if not res.status.startswith("skipped"):
        # FlexAttention
        flex_out = None
        try:
            res.flex, flex_out = run_flex(spec, q, k, v, opts, block_indices, head_chosen)
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"flex failed: {_short(e)}")
            if opts.verbose:
                traceback.print_exc()
        if pg_out is not None and flex_out is not None:
            res.err_vs_flex = _max_err(pg_out, flex_out)
        del flex_out
        # SDPA
        _, masked = run_sdpa(case, q, k, v, opts, block_indices, res, head_chosen)
        if pg_out is not None and masked is not None:
            res.err_vs_sdpa_mask = _max_err(pg_out, masked)
    del q, k, v, pg_out
    if opts.device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _tile_arg(t):
    return tuple(t) if isinstance(t, list) else t


# == reporting ==============================================================================
COLUMNS = ("case", "patterngen ms", "tiles", "flex ms", "flex blk", "mask s", "sdpa ms", "causal ms",
           "sdpa+mask ms", "x flex", "x sdpa", "bound", "% bound", "x all heads", "err")


def _f(x, fmt="{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "nan"
    return fmt.format(x)


def table_rows(results: list[CaseResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.pg is None:
            rows.append([r.case.name, r.status] + [""] * (len(COLUMNS) - 2))
            continue
        masked = r.sdpa.get("mask", {})
        rows.append([
            r.case.name, _f(r.pg_ms), f"{_fmt_tile(r.pg['q_tile'])}/{_fmt_tile(r.pg['kv_tile'])}",
            _f(r.flex_ms), _f(r.flex and r.flex.get("block_size"), "{}"), _f(r.flex and r.flex.get("block_mask_s")),
            _f(r.sdpa_ms), _f(r.sdpa.get("causal", {}).get("ms")),
            _f(masked.get("ms")) if "ms" in masked else ("n/a" if "skipped" in masked else "-"),
            _f(r.speedup_vs_flex, "{:.2f}x"), _f(r.speedup_vs_sdpa, "{:.2f}x"),
            _f(r.bound, "{:.2f}x") if r.sim else "n/a", _f(r.bound_realised and 100 * r.bound_realised, "{:.0f}%"),
            _f(r.pg.get("vs_all_heads"), "{:.2f}x"), _f(r.err_vs_flex, "{:.1e}")])
    return rows


def format_table(results: list[CaseResult]) -> str:
    rows = [list(COLUMNS)] + table_rows(results)
    spanning = [j > 0 and row[2] == "" for j, row in enumerate(rows)]  # skipped or failed: status spans
    widths = [max(len(row[i]) for row, span in zip(rows, spanning) if not span or i == 0)
              for i in range(len(COLUMNS))]
    out = []
    for j, row in enumerate(rows):
        if spanning[j]:
            out.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary(results: list[CaseResult], smoke: bool) -> dict:
    """Geometric mean against FlexAttention and the issue's targets (GPU runs only)."""
    vs_flex = [r.speedup_vs_flex for r in results if r.speedup_vs_flex]
    out: dict[str, Any] = {"cases": len(results), "measured": sum(r.pg is not None for r in results)}
    if vs_flex:
        out["geomean_vs_flex"] = math.exp(sum(math.log(x) for x in vs_flex) / len(vs_flex))
        out["min_vs_flex"] = min(vs_flex)
    errs = [r.err_vs_flex for r in results if r.err_vs_flex is not None]
    if errs:
        out["max_err_vs_flex"] = max(errs)
    if smoke:
        return out
    targets = {}
    if vs_flex:
        targets["never slower than FlexAttention"] = min(vs_flex) >= 1.0
        targets["geomean >= 1.3x FlexAttention"] = out["geomean_vs_flex"] >= 1.3
    for r in results:
        if r.case.block_sparse_target and r.bound_realised is not None:
            targets[f"{r.case.name}: >= 85% of the bound"] = r.bound_realised >= 0.85
        if r.case.name == "dense-causal" and r.speedup_vs_flex is not None:
            targets["dense causal >= 90% of FlexAttention"] = r.speedup_vs_flex >= 0.9
        if r.case.active_heads == 0.5 and r.pg and r.pg.get("vs_all_heads"):
            targets[f"{r.case.name}: >= 1.7x computing all heads"] = r.pg["vs_all_heads"] >= 1.7
    out["targets"] = targets
    return out


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        import platform
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def calibration_records(results: list[CaseResult]) -> list[dict]:
    """Measured kernel times in the format of examples/calibration/calibrate.py."""
    recs = []
    for r in results:
        if r.pg is not None:
            recs.append({"case": r.case.name, "spec": repr(r.case.spec), "q_tile": r.pg["q_tile"],
                         "kv_tile": r.pg["kv_tile"], "batch": 1, "time_ms": r.pg["ms"], "backend": "patterngen"})
        if r.sdpa_ms is not None:
            recs.append({"case": f"{r.case.name}/sdpa", "kind": "dense", "spec": repr(r.case.spec), "batch": 1,
                         "time_ms": r.sdpa_ms, "backend": "sdpa"})
    return recs


def to_markdown(doc: dict, results: list[CaseResult]) -> str:
    env = doc["environment"]
    lines = [f"# patterngen bench ({doc['scale']})", ""]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [f"- device: {env.get('device')}", f"- torch {env['torch']}, triton {env['triton']}, "
              f"CUDA {env['cuda']}", f"- date: {env['date']}", f"- dtype {doc['dtype']}, batch 1",
              f"- timing: {doc['timing']}", ""]
    rows = table_rows(results)
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + " |")
    for row in rows:
        if row[2] == "":
            row = [row[0], row[1]] + [""] * (len(COLUMNS) - 2)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Columns: times are medians in ms; `x flex` and `x sdpa` are patterngen's speedups over "
              "FlexAttention (best block size) and over dense SDPA without a mask; `bound` is the simulator's "
              "tile bound (all tile pairs / visited tile pairs) at the tiles patterngen ran; `% bound` is "
              "`x sdpa` over `bound`; `mask s` is FlexAttention's block-mask creation time (not in `flex ms`); "
              "`err` is max |patterngen - flex|.", ""]
    s = doc["summary"]
    if "geomean_vs_flex" in s:
        lines.append(f"Geometric mean speedup over FlexAttention: {s['geomean_vs_flex']:.2f}x "
                     f"(min {s['min_vs_flex']:.2f}x).")
    for name, ok in s.get("targets", {}).items():
        lines.append(f"- target {name}: {'met' if ok else 'NOT met'}")
    notes = [(r.case.name, n) for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes:"] + [f"- {c}: {n}" for c, n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(path: str, doc: dict, results: list[CaseResult]) -> list[Path]:
    """JSON and markdown side by side: PATH.json / PATH.md whichever suffix PATH has."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".json", ".md") else p
    written = []
    for suffix, text in ((".json", json.dumps(doc, indent=1, default=str)), (".md", to_markdown(doc, results))):
        target = base.with_name(base.name + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return written


# == entry points ============================================================================
def run_suite(cases: list[Case], opts: Options, scale: str, smoke: bool, out: str | None = None,
              log=print) -> tuple[dict, list[CaseResult]]:
    """Measure `cases` one after another; the outputs are rewritten after every case so that
    an interrupted run keeps what it measured."""
    env = environment(opts.device)
    device_model = None if smoke else device_model_name(env["device"])
    doc: dict[str, Any] = {"title": "patterngen bench", "scale": scale, "note": SMOKE_NOTE if smoke else None,
                           "environment": env, "dtype": str(opts.dtype).replace("torch.", ""),
                           "timing": opts.timer.describe(), "simulator_device_model": device_model,
                           "flex": {"compiled": opts.flex_compiled, "block_sizes": list(opts.flex_block_sizes)}}
    results: list[CaseResult] = []
    raise_recompile_limits()
    for case in cases:
        log(f"[bench] {case.name}: {case.title} ...", flush=True)
        t0 = time.perf_counter()
        res = run_case(case, opts, device_model)
        results.append(res)
        log(f"[bench] {case.name}: {res.status}, {time.perf_counter() - t0:.1f} s"
            + "".join(f"; {n}" for n in res.notes), flush=True)
        doc["cases"] = [r.to_dict() for r in results]
        doc["results"] = calibration_records(results)
        doc["summary"] = summary(results, smoke)
        if out:
            write_outputs(out, doc, results)
    doc.setdefault("cases", [])
    doc.setdefault("results", [])
    doc.setdefault("summary", summary(results, smoke))
    return doc, results


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `patterngen bench`."""
    parser.add_argument("--case", action="append", default=None, metavar="NAME",
                        help="only cases whose name contains NAME (repeatable); cases: "
                             + ", ".join(c.name for c in suite("smoke")))
    parser.add_argument("--quick", action="store_true", help="shrunken cases that run in seconds")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help=f"tiny cases on the CPU (Triton interpreter, eager FlexAttention): {SMOKE_NOTE}")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the results as PATH.json and PATH.md (also calibration records)")
    parser.add_argument("--tiles", choices=("sim", "default", "autotune"), default="sim",
                        help="patterngen's tiling: the simulator's pick (default), a fixed default, or the autotuner")
    parser.add_argument("--no-sweep", action="store_true", help="only the default warps/stages configuration")
    parser.add_argument("--flex-eager", action="store_true", help="FlexAttention without torch.compile")
    parser.add_argument("--flex-compile", action="store_true",
                        help="with --cpu-smoke: compile FlexAttention on the CPU too (slow)")
    parser.add_argument("--sdpa-mask", choices=("auto", "always", "never"), default="auto",
                        help="dense-mask SDPA: when it fits in memory (auto), always, or never")
    parser.add_argument("--reps", type=int, default=None, help="with --cpu-smoke: timed repeats (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")


def select(cases: list[Case], names: list[str] | None) -> list[Case]:
    if not names:
        return cases
    chosen = [c for c in cases if any(n in c.name for n in names)]
    if not chosen:
        raise ValueError(f"--case: no case matches {names!r}; cases: {', '.join(c.name for c in cases)}")
    return chosen


def cli_main(args) -> int:
    """Run `patterngen bench` with parsed arguments; returns the exit status."""
    smoke = bool(args.cpu_smoke)
    if not smoke and not torch.cuda.is_available():
        print("patterngen bench: no CUDA device is present, so no timing is produced.\n"
              "  `patterngen bench --quick --cpu-smoke` runs tiny cases on the CPU to exercise the code path "
              f"({SMOKE_NOTE}).")
        return 1
    scale = "smoke" if smoke else ("quick" if args.quick else "full")
    cases = select(suite(scale), args.case)
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the generated kernels are loaded
        device, dtype = torch.device("cpu"), torch.float32
        timer = CpuTimer(max(1, args.reps or 1))
        flex_compiled = bool(args.flex_compile)
        if not flex_compiled:  # eager FlexAttention is the point here, its advice to compile is noise
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        print(f"patterngen bench: {SMOKE_NOTE} (fp32, Triton interpreter, "
              f"{'compiled' if flex_compiled else 'eager'} FlexAttention)", flush=True)
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        timer = CudaTimer(device)
        flex_compiled = not args.flex_eager
    opts = Options(device=device, dtype=dtype, timer=timer, flex_compiled=flex_compiled,
                   sweep_configs=not (smoke or args.no_sweep), tiles=args.tiles, sdpa_mask=args.sdpa_mask,
                   seed=args.seed, verbose=args.verbose)
    doc, results = run_suite(cases, opts, scale, smoke, args.out)
    env = doc["environment"]
    print()
    print(f"patterngen bench ({scale}) on {env['device']}; torch {env['torch']}, triton {env['triton']}; "
          f"{env['date']}; {doc['dtype']}, batch 1" + (f" -- {SMOKE_NOTE}" if smoke else ""))
    print(f"timing: {doc['timing']}")
    print(format_table(results))
    s = doc["summary"]
    if "geomean_vs_flex" in s:
        print(f"geometric mean speedup over FlexAttention: {s['geomean_vs_flex']:.2f}x (min {s['min_vs_flex']:.2f}x)")
    for name, ok in s.get("targets", {}).items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if args.out:
        print("wrote " + ", ".join(str(p) for p in write_outputs(args.out, doc, results)))
    failed = [r for r in results if r.pg is None and not r.status.startswith("skipped")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m patterngen.bench` until the `bench` subcommand is registered in the CLI."""
    parser = argparse.ArgumentParser(prog="patterngen bench", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    try:
        return cli_main(parser.parse_args(argv))
    except (ValueError, TypeError) as e:
        print(f"patterngen bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
