"""The benchmark cases: the patterns of real models that patterngen is meant to beat
FlexAttention on, at three scales (the real sizes, a quick GPU run, a CPU smoke test)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...routing.heads import route_heads
from ...ir import Band, Blocks, Causal, Heads, Routed, Sink, Spec, Strided, Window

SCALES = ("full", "quick", "smoke")


@dataclass(frozen=True)
class Case:
    """One benchmark case: a spec at one scale and what to compare it with."""

    name: str
    title: str
    spec: Spec
    causal: bool  # every visible pair has kv <= q: SDPA is_causal=True is a fair floor
    block_sparse_target: bool = False  # held to >= 85% of the simulator's bound
    active_heads: float | None = None  # Mixture-of-Head routing: the fraction of heads each token uses


def moh_routing(spec: Spec, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Head indices [1, Nq, k] of a MoH router with random scores: H/8 shared heads (at least
    one) plus the top routed heads, `fraction` of the heads per token in all."""
    H = spec.num_heads
    shared = max(1, H // 8)
    scores = torch.randn(1, spec.nq, H, generator=generator)
    return route_heads(scores, max(0, round(fraction * H) - shared), shared=shared)[0]


def _s2(heads: int, band: int, stride: int, block: int):
    """S2-Attention's heads as its kernel library DKernel lays them out: a band plus every
    `stride`-th block of `block` keys, the blocks shifted by one per head."""
    return Heads([(Band(band - 1) | Strided(stride, (stride - 1 - h) % stride, block=block)) & Causal()
                  for h in range(heads)])


def suite(scale: str = "full") -> list[Case]:
    """The cases at `scale`: "full" (bf16, head dim 128, batch 1, the models' sizes), "quick"
    (about a quarter of the tokens per dimension, for a run of seconds on a GPU) or "smoke"
    (tiny, fp32-sized for the CPU interpreter, 2-4 heads of dim 32)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "full":
        hd, h32, h24 = 128, 32, 24
        n32k, win, sink_win, n8k = 32768, 4096, 1024, 8192
        grid2, win2, swin = (128, 128), (31, 31), 8
        grid3, win3, stride3 = (30, 48, 80), (18, 24, 24), (16, 8, 8)
        s2_band, s2_stride, s2_block, route = 1024, 8, 64, (128, 16)
    elif scale == "quick":
        hd, h32, h24 = 128, 32, 24
        n32k, win, sink_win, n8k = 8192, 1024, 256, 2048
        grid2, win2, swin = (64, 64), (15, 15), 8
        grid3, win3, stride3 = (16, 24, 40), (9, 12, 12), (8, 4, 4)
        s2_band, s2_stride, s2_block, route = 256, 8, 64, (128, 4)
    else:
        hd, h32, h24 = 32, 2, 2
        n32k, win, sink_win, n8k = 256, 64, 32, 128
        grid2, win2, swin = (16, 16), (5, 5), 4
        grid3, win3, stride3 = (4, 8, 8), (3, 4, 4), (2, 2, 2)
        s2_band, s2_stride, s2_block, route = 32, 4, 16, (32, 2)
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
        Case("swin-shifted", f"Swin shifted windows {grid2[0]}x{grid2[1]}, window {swin} shifted by {swin // 2}",
             spec(Blocks(swin, shift=swin // 2), grid2, h24), causal=False),
        Case("gna-3d", f"3-D GNA {'x'.join(map(str, grid3))}, window {'x'.join(map(str, win3))}, stride 1",
             spec(Window(win3), grid3, h24), causal=False),
        Case("gna-3d-strided", f"3-D GNA {'x'.join(map(str, grid3))}, window {'x'.join(map(str, win3))}, "
             f"stride {'x'.join(map(str, stride3))}",
             spec(Window(win3, stride=stride3), grid3, h24), causal=False, block_sparse_target=True),
        Case("s2-shards", f"S2 per-head shards (DKernel), {n32k} tokens: band {s2_band} + every {s2_stride}th "
             f"block of {s2_block} keys, offset per head", spec(_s2(s2_heads, s2_band, s2_stride, s2_block), n32k,
                                                                s2_heads), causal=True),
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


def select(cases: list[Case], names: list[str] | None) -> list[Case]:
    """The cases whose name contains one of `names` (all of them when `names` is empty)."""
    if not names:
        return cases
    chosen = [c for c in cases if any(n in c.name for n in names)]
    if not chosen:
        raise ValueError(f"--case: no case matches {names!r}; cases: {', '.join(c.name for c in cases)}")
    return chosen
