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


# fp32 score (S) and output (O) accumulator elements a forward program holds without spilling
# on sm_80/sm_90: 96 registers a thread at 8 warps (128 x 64 tiles at head dim 128, 128 x 128 at
# 64; 128 x 128 at head dim 128 spills on both, whatever the warps and stages)
FORWARD_ACCUMULATORS = 24_576


def forward_accumulators(block_m: int, block_n: int, block_d: int) -> int:
    """fp32 elements of a forward program's S [block_m, block_n] and O [block_m, block_d] tiles."""
    return block_m * (block_n + block_d)


def fits_forward(tiling: Tiling, head_dim: int) -> bool:
    """Whether the forward holds this tiling's accumulators in registers (FORWARD_ACCUMULATORS)."""
    return forward_accumulators(volume(tiling.q_tile), volume(tiling.kv_tile),
                                head_block(head_dim)) <= FORWARD_ACCUMULATORS


SHARED_LIMIT = {80: 167_936, 90: 232_448}
"""Most shared memory one block may take (bytes, opt-in): A100 164 KB, H100/H200 227 KB."""


def shared_bytes(block_m: int, block_n: int, block_d: int, stages: int, elem: int = 2) -> int:
    """Shared memory of the forward's pipelined K/V tiles plus the Q tile."""
    return (block_m * block_d + 2 * stages * block_n * block_d) * elem


def default_config(arch: int | None, block_m: int, block_n: int, block_d: int, elem_bytes: int = 2,
                   box: bool = False) -> KernelConfig:
    """The forward's launch on sm_<arch> (None: no GPU, as under the interpreter), chosen from what
    the audit shows spill-free: 8 warps once 4 would hold more than 64 accumulator registers a
    thread (from 64 on for `box` tiles, whose per-dimension coordinates and window bounds take
    registers of their own: a 3-D window at 64 x 64, head dim 64, spilled on sm_80 at 4 warps),
    and 3 stages where the Q tile and three K/V buffers fit the arch's shared memory, else 2."""
    per_thread = forward_accumulators(block_m, block_n, block_d) / (4 * 32)
    warps = 8 if per_thread > 64 or (box and per_thread >= 64) else 4
    fits3 = arch is not None and shared_bytes(block_m, block_n, block_d, 3, elem_bytes) <= SHARED_LIMIT.get(
        arch, SHARED_LIMIT[80])
    return KernelConfig(num_warps=warps, num_stages=3 if fits3 else 2)


def backward_config(block_d: int, block_n: int = 128) -> KernelConfig:
    """The backward kernels' launch: dK/dV holds two [block_n, BLOCK_D] float32 accumulators, 8
    warps once 4 would give them more than 96 registers a thread (from 128 x 64 on: the S2
    shards' dK/dV spilled 22 instructions on sm_90 at 4 warps, none at 8); with
    `backward_tiling`'s tiles both kernels are spill-free on sm_80 and sm_90."""
    return KernelConfig(num_warps=8 if 2 * block_n * block_d > 4 * 32 * 96 else 4, num_stages=2)


BACKWARD_WIDE = 128
"""Tokens of the backward's wide tiles (dK/dV's kv tiles, dQ's q tiles): the M of every matmul
of the step, at least 64 for warpgroup MMA on sm_90; halved from head dim 128 on."""
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
    `dq_tiling`): the forward's kv tiles, at most BACKWARD_WIDE tokens (half from head dim 128
    on: on sm_80 K and V stay in registers beside the dK and dV accumulators, and 128 x 128
    tiles spilled), are the M of every dK/dV matmul, and its q tiles are narrowed to
    BACKWARD_NARROW tokens (BACKWARD_NARROW_BOX for boxes), so that dQ walks narrow kv tiles
    with wide q tiles. Boxes are halved along a
    dimension; boxes that could not trade places (`transposable_tiling`, needs `spec`) become flat.
    A Routed spec's flat tiles stay divisors of its block (powers of two, halved); from head
    dim 128 on its q tiles are narrowed as boxes' are, the routing state taking registers of its
    own (`Routed(64, 8, causal=True) | band` spilled 6 instructions on sm_90 at 32, none at 16)."""
    if spec is not None:
        tiling = transposable_tiling(tiling, spec)
    wide = BACKWARD_WIDE if head_dim < 128 else BACKWARD_WIDE // 2
    routed_wide = spec is not None and spec.routed is not None and head_dim >= 128
    narrow = BACKWARD_NARROW if isinstance(tiling.q_tile, int) and not routed_wide else BACKWARD_NARROW_BOX
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
