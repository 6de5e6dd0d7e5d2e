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


def default_config(arch: int | None, block_m: int, block_n: int, block_d: int, elem_bytes: int = 2) -> KernelConfig:
    """The forward's launch on sm_<arch> (None: no GPU, as under the interpreter), chosen from what
    the audit shows spill-free: 8 warps once 4 would hold more than 64 accumulator registers a
    thread, and 3 stages where the Q tile and three K/V buffers fit the arch's shared memory
    (sass.SHARED_LIMIT), else 2."""
    from .autotune import shared_bytes
    from .sass import SHARED_LIMIT
    warps = 8 if forward_accumulators(block_m, block_n, block_d) > 4 * 32 * 64 else 4  # 4 warps x 32 threads x 64
    fits3 = arch is not None and shared_bytes(block_m, block_n, block_d, 3, elem_bytes) <= SHARED_LIMIT.get(
        arch, SHARED_LIMIT[80])
    return KernelConfig(num_warps=warps, num_stages=3 if fits3 else 2)


def backward_config(block_d: int) -> KernelConfig:
    """The backward kernels' launch: 8 warps from head dim 128 on (two [BLOCK_N, BLOCK_D]
    accumulators in dK/dV), which keeps them spill-free on sm_80/sm_90."""
    return KernelConfig(num_warps=8 if block_d >= 128 else 4, num_stages=2)


def backward_tiling(tiling: Tiling, head_dim: int, spec: Spec | None = None) -> Tiling:
    """The dK/dV kernel holds two accumulators per kv tile; for head dims >= 128 it walks q
    tiles of at most 32 tokens (halving the forward's) to stay within registers: no spills
    on sm_80/sm_90. A Routed `spec` keeps its tiles (they are the routing blocks; its
    kernel walks each block in row halves instead)."""
    if spec is not None and spec.routed is not None:
        return tiling
    q = tiling.q_tile
    while head_dim >= 128 and volume(q) > 32:
        if isinstance(q, int):
            q //= 2
        else:
            k = next(i for i, t in enumerate(q) if t > 1)
            q = q[:k] + (q[k] // 2,) + q[k + 1:]
    return Tiling(q, tiling.kv_tile)


# rowsum(dO * O) before the backward: a trivial kernel with nothing to tune
PREPROCESS_BLOCK_M = 64
PREPROCESS_CONFIG = KernelConfig(num_warps=4, num_stages=2)

# the routed walks compare a run-time block with a q tile's static kv tiles this many at a
# time (a length-independent constant, so that no launch constant depends on the lengths)
STATIC_CHUNK = 16
