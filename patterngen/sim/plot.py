"""Pictures of a simulation: the tile map of one head, and the bound against the tile shapes tried.

matplotlib is optional (`pip install patterngen[plot]`) and imported only when drawing.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .report import SimReport, format_speedup
from .search import Candidate
from .tile_shapes import format_tile


def tile_map(report: SimReport, head: int = 0, max_side: int = 512) -> torch.Tensor:
    """Status image [rows, cols] of one head's tile pairs: 0 empty, 1 full, 2 partial;
    down-sampled (a pixel shows the worst status under it: partial > full > empty) when
    there are more than `max_side` tiles on a side."""
    tp = report.plan.head_plan(head)
    qt, kt, full = tp.pairs()
    Tq, Tk = report.plan.q_grid.count, report.plan.kv_grid.count
    R, C = min(Tq, max_side), min(Tk, max_side)
    img = torch.zeros(R * C, dtype=torch.long)
    val = torch.where(full, 1, 2)
    img.scatter_reduce_(0, (qt * R // Tq) * C + kt * C // Tk, val, reduce="amax")
    return img.view(R, C)


def plot(rows: Sequence[tuple[str, SimReport]], out: str) -> None:
    """Tile map (empty / full / partial) of the first head and the tile bound (and the
    predicted speedup) against the candidate tile shapes, one row of panels per spec."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    rows = list(rows)[:6]
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 4.2 * len(rows)), squeeze=False)
    cmap = ListedColormap(["#f4f4f4", "#2b8a3e", "#e8590c"])
    for (name, r), (ax_map, ax_bar) in zip(rows, axes):
        img = tile_map(r)
        ax_map.imshow(img.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        ax_map.set_title(f"{name}: tiles {format_tile(r.q_tile)} / {format_tile(r.kv_tile)} "
                         f"(green full, orange partial)", fontsize=9)
        ax_map.set_xlabel("kv tile")
        ax_map.set_ylabel("q tile")
        cands = [c for c in r.candidates if c.tile_speedup is not None][:24] or \
            [Candidate(r.q_tile, r.kv_tile, "exact", r.tile_pairs, r.visited, r.full)]
        labels = [c.label for c in cands]
        x = range(len(cands))
        ax_bar.bar(x, [c.tile_speedup for c in cands],
                   color=["#2b8a3e" if c.fully_block_sparse else "#e8590c" for c in cands])
        ax_bar.axhline(r.flop_speedup, color="k", ls="--", lw=1, label=f"FLOP bound {format_speedup(r.flop_speedup)}")
        if r.device is not None and any(c.predicted_time_s for c in cands):
            dense = r.dense_time_s
            ax_bar.plot(list(x), [dense / c.predicted_time_s if c.predicted_time_s else float("nan") for c in cands],
                        "o", color="#1c7ed6", label=f"predicted speedup ({r.device.name})")
        ax_bar.set_xticks(list(x))
        ax_bar.set_xticklabels(labels, rotation=70, fontsize=7)
        ax_bar.set_ylabel("tile bound (x over dense)")
        ax_bar.set_title("bound against tile shapes (green: fully block-sparse)", fontsize=9)
        ax_bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)



__all__ = ["tile_map", "plot"]
