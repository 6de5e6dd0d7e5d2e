"""What the generated kernels accept, refused up front with errors that name the argument and
what is valid: tilings and routed blocks (the policy of patterngen.analysis.tiling) and dtypes
(the interpreter's rule lives in backends/inputs.py, where the op's dispatch reads it too)."""
from __future__ import annotations

import torch

from ...analysis.tiling import kernel_tile_ok, volume
from ...core.tiles import Tiling
from ...ir import Spec
from ..inputs import interpreter_dtype_problem


def check_tiling(spec: Spec, tiling: Tiling) -> None:
    """Tiles the kernels can run; a Routed spec's tiles are flat and divide its routing block
    (a selected block is walked as its kv tiles, a q tile takes its q block's routing)."""
    for name, tile in (("q_tile", tiling.q_tile), ("kv_tile", tiling.kv_tile)):
        if not kernel_tile_ok(tile):
            raise ValueError(f"tiling: {name}={tile!r} has {volume(tile)} tokens; the Triton backend needs a "
                             f"power of two >= 16 (tl.dot and tl.arange), e.g. 64, 128 or boxes such as (16, 8)")
    if spec.length_free and not (isinstance(tiling.q_tile, int) and isinstance(tiling.kv_tile, int)):
        raise ValueError(f"tiling: {spec!r} is length-free (a sequence of any length), so its tiles are flat "
                         f"token counts such as Tiling(64, 64); got {tiling!r}")
    if spec.routed is not None:
        for name, tile in (("q_tile", tiling.q_tile), ("kv_tile", tiling.kv_tile)):
            if not isinstance(tile, int) or spec.routed.block % tile:
                raise ValueError(f"tiling: {spec.routed!r} needs flat tiles that divide its block "
                                 f"({spec.routed.block} tokens), got {name}={tile!r}")


def check_routed_block(spec: Spec) -> None:
    """A routed block is walked as whole kernel tiles (powers of two >= 16 that divide it)."""
    if spec.routed is not None and not kernel_tile_ok(spec.routed.block):
        raise ValueError(f"{spec.routed!r}: the Triton backend needs the routed block to be a power of two "
                         f">= 16 (it is walked as kernel tiles that divide it), got block={spec.routed.block}; use "
                         f"block 64, 128 or 512, or the reference backend (pg.compile(spec, backend='reference'))")


def check_launch_dtype(q: torch.Tensor) -> None:
    problem = interpreter_dtype_problem(q)
    if problem is not None:
        raise TypeError(f"q: {problem}")


def check_lengths(spec: Spec, nq: int, nkv: int) -> None:
    """A fixed-length spec's kernels run its own lengths only (a length-free spec any)."""
    if not spec.length_free and (nq, nkv) != (spec.nq, spec.nkv):
        raise ValueError(f"q, k: {nq} queries and {nkv} keys, but {spec!r} has nq={spec.nq}, nkv={spec.nkv}; "
                         f"give the tensors of its shapes, or use a length-free spec (no q_shape) for any length")
