"""The three implementations the benchmark times on the same inputs: patterngen's Triton
forward, FlexAttention with the equivalent block mask, and dense SDPA.

Each runner returns its timing as a dict (what the report and the JSON record hold) and its
output, so that the outputs can be compared; a runner that cannot run a case raises, and
the caller records why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...analysis.tiling import default_tiling
from ...backends.inputs import head_selection
from ...integrations.flex import block_mask_for
from ...ir import Spec
from ...routing.blocks import block_masks, normalize_block_indices
from ...core.semantics import visible
from ...core.tiles import Tiling
from ...sim.tile_shapes import format_tile
from .suite import Case
from .timing import sync

FLEX_BLOCK_SIZES = (128, 64)


@dataclass
class Options:
    """How a run measures: device, dtype, timer, and which variants it tries."""

    device: torch.device
    dtype: torch.dtype
    timer: Callable
    flex_compiled: bool = True
    flex_block_sizes: tuple[int, ...] = FLEX_BLOCK_SIZES
    sweep_configs: bool = True
    tiles: str = "sim"  # sim | default | autotune (head-routed kernels: as sim)
    sdpa_mask: str = "auto"  # auto | always | never
    seed: int = 0
    verbose: bool = False


# -- small helpers shared with the report ---------------------------------------------------
def tile_json(t):
    """A tile as JSON holds it: an int, or a list for a box."""
    return list(t) if isinstance(t, tuple) else t


def short_error(e: BaseException) -> str:
    """The exception's type and the first line of its message, at most 200 characters."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


# -- patterngen -----------------------------------------------------------------------------
def tilings_to_try(spec: Spec, opts: Options, ranked: Sequence[Tiling]) -> list[Tiling]:
    """The tiling policy's choices, best first: the simulator's kernel-runnable ranking
    (`SimReport.kernel_tilings`; not with `--tiles default`), then the policy's default
    (`analysis.tiling.default_tiling`)."""
    return list(dict.fromkeys((list(ranked) if opts.tiles != "default" else []) + [default_tiling(spec)]))


def launch_configs(opts: Options) -> list:
    """Launch configurations to try on a tiling: the backend's default (None), then, when
    sweeping, every (warps, stages) of the sweep (one equal to the default is skipped)."""
    from ...backends.triton import KernelConfig
    if not opts.sweep_configs:
        return [None]
    return [None] + [KernelConfig(w, s) for w in (4, 8) for s in (2, 3)]


def _label(tiling: Tiling, config=None) -> str:
    tiles = f"{format_tile(tiling.q_tile)}/{format_tile(tiling.kv_tile)}"
    return tiles if config is None else f"{tiles} {config}"


def fastest_kernel(spec: Spec, opts: Options, ranked: Sequence[Tiling], build: Callable, run: Callable):
    """(timing dict, kernel) of the fastest launch configuration on the first of `tilings_to_try`
    that runs (failures on the way listed under "failures"). `build(tiling, config)` makes a
    kernel, `run(kernel)` calls it."""
    failures = []
    for tiling in tilings_to_try(spec, opts, ranked):
        best, tried = None, set()
        for config in launch_configs(opts):
            if config in tried:
                continue
            try:
                t0 = time.perf_counter()
                kern = build(tiling, config)
                build_s = time.perf_counter() - t0
                tried.add(kern.config)
                timing = opts.timer(lambda: run(kern))
            except NotImplementedError:
                raise
            except ValueError as e:  # this tiling is not one the backend runs: try the next
                failures.append(f"{_label(tiling)}: {short_error(e)}")
                break
            except Exception as e:  # noqa: BLE001 - e.g. out of resources for one config
                failures.append(f"{_label(tiling, config)}: {short_error(e)}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if best is None or timing["ms"] < best[0]["ms"]:
                best = ({**timing, "q_tile": tile_json(tiling.q_tile), "kv_tile": tile_json(tiling.kv_tile),
                         "num_warps": kern.config.num_warps, "num_stages": kern.config.num_stages,
                         "build_s": build_s, "tiling_from": "simulator" if tiling in ranked else "default"}, kern)
        if best is not None:  # the first tiling that runs is the one measured
            if failures:
                best[0]["failures"] = failures
            return best
    raise RuntimeError("no patterngen kernel ran: " + "; ".join(failures))


def run_patterngen(spec: Spec, q, k, v, opts: Options, ranked: Sequence[Tiling] = (), block_indices=None,
                   head_indices=None):
    """(timing dict, output) of the fastest kernel that builds and runs, on the tilings of
    `tilings_to_try` (`ranked`: the simulator's kernel-runnable ranking); raises
    NotImplementedError when the backend does not support the spec. With `head_indices` the
    head-routed kernels run, and the plain kernel of the same tiles and launch configuration is
    timed too (`all_heads_ms`: computing every head)."""
    from ...backends.triton import TritonForward

    call_kwargs = {} if block_indices is None else {"block_indices": block_indices}
    if head_indices is not None:
        return _run_heads(spec, q, k, v, opts, ranked, head_indices)
    if opts.tiles == "autotune":
        from ...backends.triton import tuned_kernel
        t0 = time.perf_counter()
        kern = tuned_kernel(spec, q, k, v, tilings=list(ranked) or None, **call_kwargs)
        build_s = time.perf_counter() - t0
        timing = opts.timer(lambda: kern(q, k, v, **call_kwargs))
        out = kern(q, k, v, **call_kwargs)[0]
        return {**timing, "q_tile": tile_json(kern.q_grid.tile), "kv_tile": tile_json(kern.kv_grid.tile),
                "num_warps": kern.config.num_warps, "num_stages": kern.config.num_stages, "build_s": build_s,
                "tiling_from": "autotune"}, out
    best, kern = fastest_kernel(spec, opts, ranked, lambda t, c: TritonForward(spec, t, c),
                                lambda kern: kern(q, k, v, **call_kwargs))
    return best, kern(q, k, v, **call_kwargs)[0]


def _run_heads(spec: Spec, q, k, v, opts: Options, ranked: Sequence[Tiling], head_indices):
    from ...backends.triton import TritonForward, TritonHeads

    best, kern = fastest_kernel(spec, opts, ranked, lambda t, c: TritonHeads(spec, t, c),
                                lambda kern: kern.forward(q, k, v, head_indices))
    best_out = kern.forward(q, k, v, head_indices)[0]
    plain = TritonForward(spec, Tiling(kern.fwd.q_grid.tile, kern.fwd.kv_grid.tile), kern.config)
    best["all_heads_ms"] = opts.timer(lambda: plain(q, k, v))["ms"]
    best["vs_all_heads"] = best["all_heads_ms"] / best["ms"] if best["ms"] else None
    best["active_fraction"] = float(head_selection(head_indices, spec.num_heads).float().mean())
    return best, best_out


# -- FlexAttention --------------------------------------------------------------------------
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


def run_flex(spec: Spec, q, k, v, opts: Options, block_indices=None, head_chosen=None):
    """(timing dict of the fastest block size, its output)."""
    fn = _flex_fn(opts.flex_compiled)
    gqa = {"enable_gqa": True} if spec.num_kv_heads != spec.num_heads else {}
    best, best_out, per_block = None, None, {}
    for bs in opts.flex_block_sizes:
        try:
            sync(opts.device)
            t0 = time.perf_counter()
            bm = block_mask_for(spec, bs, opts.device, compile=opts.device.type == "cuda",
                                block_indices=block_indices, head_chosen=head_chosen)
            sync(opts.device)
            mask_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn(q, k, v, block_mask=bm, **gqa)  # first call: compilation, kept out of the timing
            sync(opts.device)
            compile_s = time.perf_counter() - t0
            timing = opts.timer(lambda: fn(q, k, v, block_mask=bm, **gqa))
        except Exception as e:  # noqa: BLE001 - one block size failing must not hide the other
            per_block[bs] = {"error": short_error(e)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        per_block[bs] = {"ms": timing["ms"], "block_mask_s": mask_s, "first_call_s": compile_s}
        if best is None or timing["ms"] < best["ms"]:
            best = {**timing, "block_size": bs, "block_mask_s": mask_s, "first_call_s": compile_s,
                    "compiled": opts.flex_compiled}
            best_out = fn(q, k, v, block_mask=bm, **gqa)
        bm = None  # free this block mask before building the next
    if best is None:
        raise RuntimeError("FlexAttention failed for every block size: " +
                           "; ".join(f"{b}: {r['error']}" for b, r in per_block.items()))
    best["per_block_size"] = {str(b): r for b, r in per_block.items()}
    return best, best_out


# -- SDPA -----------------------------------------------------------------------------------
def dense_mask_on(spec: Spec, device: torch.device, block_indices: torch.Tensor | None = None,
                  max_chunk: int = 1 << 26) -> torch.Tensor:
    """bool [1 or H, Nq, Nkv] built on `device` in row chunks (the oracle builds on the
    CPU in one piece, which is too big for the suite's sizes); one slice when all heads
    share a pattern."""
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


def run_sdpa(case: Case, q, k, v, opts: Options, block_indices=None, head_chosen=None):
    """Dense SDPA timings: without a mask, causal, and with the dense mask when it fits
    (and'ed with `head_chosen` [B, H, Nq] under head routing). Returns (timings by variant,
    the masked output or None)."""
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
            out[name] = {"error": short_error(e)}
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
            out["mask"] = {"error": short_error(e)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out, masked_out
