"""Launch parameters of the generated kernels: warps, stages, the head-dim block, and the
backward's tiles. The tiles themselves come from the tiling policy (patterngen.analysis.tiling)."""
from __future__ import annotations

from dataclasses import dataclass

from ...analysis.tiling import pow2_ceil, volume  # pow2_ceil: re-exported for the launchers
from ...core.tiles import Tiling
from ...ir import Spec


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters besides the tiles (which the plan fixes)."""

    num_warps: int = 4
    num_stages: int = 2


def tiling_json(tiling: Tiling) -> dict:
    """{"q_tile", "kv_tile"} as JSON values (a box tile as a list): the tuning cache's and the
    build manifest's form."""
    return {name: list(t) if isinstance(t, tuple) else t
            for name, t in (("q_tile", tiling.q_tile), ("kv_tile", tiling.kv_tile))}


def tiling_from_json(data: dict) -> Tiling:
    """The Tiling of `tiling_json`'s form (lists back to box tuples)."""
    return Tiling(*(tuple(data[n]) if isinstance(data[n], list) else data[n] for n in ("q_tile", "kv_tile")))


def head_block(head_dim: int) -> int:
    """BLOCK_D: the head dimension padded to a power of two of at least 16, as tl.dot needs."""
    return max(16, pow2_ceil(head_dim))


def default_config(block_m: int, block_d: int) -> KernelConfig:
    """Deterministic choice used without a GPU to tune on: more warps for bigger accumulators."""
    return KernelConfig(num_warps=8 if block_m * block_d >= 64 * 128 else 4, num_stages=2)


def backward_config(block_d: int) -> KernelConfig:
    """The backward kernels' launch: 8 warps from head dim 128 on (two [128, BLOCK_D] float32
    accumulators in dK/dV), which with `backward_tiling`'s tiles keeps both kernels free of
    spills on sm_80 and sm_90."""
    return KernelConfig(num_warps=8 if block_d >= 128 else 4, num_stages=2)


BACKWARD_WIDE = 128
"""Tokens of the backward's wide tiles (dK/dV's kv tiles, dQ's q tiles): the M of every matmul
of the step, at least 64 for warpgroup MMA on sm_90; halved above head dim 128."""
BACKWARD_NARROW = 32
"""Tokens of the tiles a backward kernel walks (dK/dV's q tiles, dQ's kv tiles): 32 keeps the
step's [128, 32] probabilities beside the accumulators in registers (as the Triton tutorial's
backward does)."""
BACKWARD_NARROW_BOX = 16
"""The same for box tiles, whose masks (per-dimension coordinates and window bounds) take
registers of their own: at 32 the n-D window dK/dV kernels spilled (3-28 instructions on
sm_80 and sm_90), at 16 none does, in fewer loop instructions per query token."""


def _halve_to(tile, tokens: int):
    """`tile` halved until it holds at most `tokens` (a box along its first dimension longer than 1)."""
    while volume(tile) > tokens:
        if isinstance(tile, int):
            tile //= 2
        else:
            k = next(i for i, t in enumerate(tile) if t > 1)
            tile = tile[:k] + (tile[k] // 2,) + tile[k + 1:]
    return tile


def transposable_tiling(tiling: Tiling, spec: Spec) -> Tiling:
    """`tiling` where its tiles may trade places between the q and kv grids (flat tiles, or boxes
    on grids of one shape), else flat tiles of its sizes: the dQ kernel runs the transpose of
    the dK/dV kernel's tiling and addresses its tiles with the other's token functions."""
    flat = isinstance(tiling.q_tile, int) and isinstance(tiling.kv_tile, int)
    return tiling if flat or spec.q_shape == spec.kv_shape else Tiling(volume(tiling.q_tile), volume(tiling.kv_tile))


def backward_tiling(tiling: Tiling, head_dim: int, spec: Spec | None = None) -> Tiling:
    """The dK/dV kernel's tiling for a forward `tiling` (the dQ kernel runs its transpose,
    `dq_tiling`): the forward's kv tiles, at most BACKWARD_WIDE tokens, are the M of every
    dK/dV matmul, and its q tiles are narrowed to BACKWARD_NARROW tokens (BACKWARD_NARROW_BOX
    for boxes), so that dQ walks narrow kv tiles with wide q tiles. Boxes are halved along a
    dimension; boxes that could not trade places (`transposable_tiling`, needs `spec`) become flat.
    A Routed spec's flat tiles stay divisors of its block (powers of two, halved)."""
    if spec is not None:
        tiling = transposable_tiling(tiling, spec)
    wide = BACKWARD_WIDE if head_dim <= 128 else BACKWARD_WIDE // 2
    narrow = BACKWARD_NARROW if isinstance(tiling.q_tile, int) else BACKWARD_NARROW_BOX
    return Tiling(_halve_to(tiling.q_tile, narrow), _halve_to(tiling.kv_tile, wide))


def dq_tiling(tiling: Tiling) -> Tiling:
    """The dQ kernel's tiling for the dK/dV kernel's: its transpose (wide q tiles, narrow kv tiles)."""
    return Tiling(tiling.kv_tile, tiling.q_tile)


# rowsum(dO * O) before the backward: a trivial kernel with nothing to tune
PREPROCESS_BLOCK_M = 64
PREPROCESS_CONFIG = KernelConfig(num_warps=4, num_stages=2)

# the routed walks compare a run-time block with a q tile's static kv tiles this many at a
# time (a length-independent constant, so that no launch constant depends on the lengths)
STATIC_CHUNK = 16
