"""`Blocks` along one dimension, on intervals of coordinates.

The block of coordinate x is floor((x - shift) / size): runs of `size` coordinates, the
first and the last cut by the grid's edges. A query interval and a key interval share a
block somewhere iff their block ranges meet, and every pair shares one iff all four ends lie
in one block, so both questions are exact from the interval ends alone.
"""
from __future__ import annotations

import torch

from ..core.semantics import block_index as block_of
from ..core.statuses import expand_ranges


class BlocksDim:
    """Blocks along one dimension: query coordinates [0, nq), shifted by `off` onto the keys'
    (bottom-right alignment of a 1-D spec; 0 on grids), against key coordinates [0, nkv)."""

    def __init__(self, nq: int, nkv: int, size: int, shift: int, off: int = 0):
        self.nq, self.nkv, self.size, self.shift, self.off = nq, nkv, size, shift, off

    def hull(self, qa: torch.Tensor, qb: torch.Tensor):
        """Smallest and largest key coordinate visible from any query in [qa, qb]."""
        lo = block_of(qa + self.off, self.size, self.shift) * self.size + self.shift
        hi = (block_of(qb + self.off, self.size, self.shift) + 1) * self.size + self.shift - 1
        return lo.clamp_min(0), hi.clamp(max=self.nkv - 1)

    def status(self, qa, qb, ka, kb) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (any, all) visibility of keys [ka, kb] from queries [qa, qb]."""
        bqa, bqb = (block_of(x + self.off, self.size, self.shift) for x in (qa, qb))
        bka, bkb = (block_of(x, self.size, self.shift) for x in (ka, kb))
        return (bqa <= bkb) & (bka <= bqb), (bqa == bqb) & (bka == bkb) & (bqa == bka)

    def pairs(self, tq: int, tk: int):
        """(rows, kt, any_, all_) over the kv tiles of each q tile's hull (q tiles of `tq`, kv
        tiles of `tk` consecutive coordinates), with their exact visibility."""
        qa = torch.arange(-(-self.nq // tq)) * tq
        qb = (qa + tq - 1).clamp(max=self.nq - 1)
        lo, hi = self.hull(qa, qb)
        rows, kt = expand_ranges(lo // tk, torch.where(hi >= lo, hi // tk, lo // tk - 1))
        ka = kt * tk
        kb = (ka + tk - 1).clamp(max=self.nkv - 1)
        any_, all_ = self.status(qa[rows], qb[rows], ka, kb)
        return rows, kt, any_, all_
