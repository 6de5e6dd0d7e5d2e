"""Tile-pair statuses and the range expansion every tile classifier shares."""
from __future__ import annotations

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


def status_of(any_: torch.Tensor, all_: torch.Tensor) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL (int8) from "some pair is visible" and "every pair is"."""
    return torch.where(all_ & any_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def expand_ranges(first: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None = None):
    """All (row, col) with first[i] <= col <= last[i], in row-major order."""
    cnt = (last - first + 1).clamp_min(0)
    rep = torch.repeat_interleave(torch.arange(len(cnt)), cnt)
    starts = torch.cumsum(cnt, 0) - cnt
    cols = first[rep] + torch.arange(len(rep)) - starts[rep]
    return (rep if rows is None else rows[rep]), cols
