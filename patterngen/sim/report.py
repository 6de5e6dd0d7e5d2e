"""What `simulate` answers: the report, per-head figures, and the table `patterngen simulate` prints.

The figures are DESIGN.md's: `flop_speedup` = dense pairs / visible pairs, `tile_speedup`
= tile pairs / visited tile pairs, `fully_block_sparse` = no visited pair is partial. A
report also keeps the candidates the search ranked, so that `explain()` can say why this
tiling and not another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..ir import Pattern, Spec
from ..analysis.plan import Plan, build_plan
from ..analysis.tiling import kernel_tilings
from ..core.tiles import Tiling
from .device import DeviceModel
from .search import DEFAULT_TILE_VOLUMES, Candidate
from .tile_shapes import format_tile


class _Bounds:
    """The DESIGN.md figures, from the counts a report or a head group carries."""

    dense_pairs: int
    visible_pairs: int
    tile_pairs: int
    visited: int
    full: int

    @property
    def partial(self) -> int:
        return self.visited - self.full

    @property
    def empty(self) -> int:
        return self.tile_pairs - self.visited

    @property
    def flop_speedup(self) -> float:
        """Nq * Nkv / visible (q, kv) pairs (over all heads of a report)."""
        return self.dense_pairs / self.visible_pairs if self.visible_pairs else math.inf

    @property
    def tile_speedup(self) -> float:
        """All tile pairs / non-empty tile pairs (over all heads of a report)."""
        return self.tile_pairs / self.visited if self.visited else math.inf

    @property
    def fully_block_sparse(self) -> bool:
        """No visited tile pair is partial."""
        return self.partial == 0


@dataclass(frozen=True)
class HeadFigures(_Bounds):
    """Counts of one head (or one group of heads with the same pattern), summed over batches when routed."""

    heads: tuple[int, ...]
    pattern: Pattern
    dense_pairs: int
    visible_pairs: int
    tile_pairs: int
    visited: int
    full: int


def head_groups(spec: Spec, heads: Sequence[HeadFigures]) -> list[HeadFigures]:
    """Per-head figures summed over the heads that share a pattern, in order of first appearance."""
    groups = []
    for p in spec.head_patterns.unique:
        members = [hf for hf in heads if hf.pattern == p]
        groups.append(HeadFigures(tuple(h for hf in members for h in hf.heads), p,
                                  sum(hf.dense_pairs for hf in members), sum(hf.visible_pairs for hf in members),
                                  sum(hf.tile_pairs for hf in members), sum(hf.visited for hf in members),
                                  sum(hf.full for hf in members)))
    return groups


@dataclass(frozen=True, eq=False)
class SimReport(_Bounds):
    """What `simulate` found for one spec. Speedups are over all heads (sums over heads);
    tile counts are those of `build_plan(spec, Tiling(q_tile, kv_tile))`."""

    spec: Spec
    q_tile: int | tuple[int, ...]
    kv_tile: int | tuple[int, ...]
    batch: int
    dense_pairs: int
    visible_pairs: int
    tile_pairs: int
    visited: int
    full: int
    heads: tuple[HeadFigures, ...]
    groups: tuple[HeadFigures, ...]
    device: DeviceModel | None = None
    predicted_time_s: float | None = None
    dense_time_s: float | None = None
    candidates: tuple[Candidate, ...] = ()
    searched: bool = False
    routing: str | None = None
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    block_indices: torch.Tensor | None = field(default=None, repr=False)
    _plan: Any = field(default=None, repr=False, compare=False)
    active_fraction: float | None = None
    head_routing: str | None = None
    all_heads_time_s: float | None = None
    ctas: int | None = None

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.q_tile, self.kv_tile)

    def kernel_tilings(self, limit: int = 4) -> list[Tiling]:
        """The tiling policy (`analysis.tiling.kernel_tilings`) on this report's ranking: the
        kernel-runnable tilings to try, best first."""
        return kernel_tilings(self.spec, [Tiling(c.q_tile, c.kv_tile) for c in self.candidates], limit)

    @property
    def predicted_speedup(self) -> float | None:
        if self.predicted_time_s is None or self.dense_time_s is None:
            return None
        return self.dense_time_s / self.predicted_time_s

    @property
    def routing_speedup(self) -> float | None:
        """Predicted time computing every head / with head routing (same kernels and tiles)."""
        if self.predicted_time_s is None or self.all_heads_time_s is None:
            return None
        return self.all_heads_time_s / self.predicted_time_s

    @property
    def plan(self) -> Plan:
        """The plan of the chosen tiling (built on first use when the counts came in closed form)."""
        if self._plan is None:
            object.__setattr__(self, "_plan", build_plan(self.spec, self.tiling, self.block_indices))
        return self._plan

    def counts(self) -> dict[str, int]:
        return {"tile_pairs": self.tile_pairs, "visited": self.visited, "full": self.full,
                "partial": self.partial, "empty": self.empty, "visible_pairs": self.visible_pairs,
                "dense_pairs": self.dense_pairs}

    def summary(self) -> str:
        s = (f"q_tile {format_tile(self.q_tile)}, kv_tile {format_tile(self.kv_tile)}: FLOP bound "
             f"{format_speedup(self.flop_speedup)}, tile bound {format_speedup(self.tile_speedup)}, "
             f"{'fully block-sparse' if self.fully_block_sparse else f'{self.partial} partial tile pairs'}")
        if self.predicted_time_s is not None:
            s += (f"; predicted {format_time(self.predicted_time_s)} vs dense {format_time(self.dense_time_s)} "
                  f"({format_speedup(self.predicted_speedup)}) on {self.device.display_name}")
        if self.active_fraction is not None:
            s += f"; heads active {self.active_fraction:.1%} ({self.head_routing})"
            if self.all_heads_time_s is not None:
                s += (f", all heads {format_time(self.all_heads_time_s)} "
                      f"({format_speedup(self.routing_speedup)} from head routing)")
        return s

    def explain(self, top: int = 12) -> str:
        """Why this tiling: the ranking of the candidates the optimizer considered."""
        lines = [f"spec: {self.spec!r}", f"batch {self.batch}"]
        if self.device is not None:
            lines.append(f"device: {self.device.display_name} ({self.device.origin}; "
                         f"{'calibrated' if self.device.calibrated else 'uncalibrated priors'})")
        else:
            lines.append("device: none (ranked by tile bound at tile volumes "
                         f"{', '.join(f'{a}/{b}' for a, b in DEFAULT_TILE_VOLUMES)})")
        lines.append("chosen: " + self.summary())
        if self.routing == "synthetic":
            lines.append("routing: no block indices given; a representative random selection (own block + "
                         "topk-1 others, seeded) stands in for run-time routing")
        if self.searched:
            st = {}
            for c in self.candidates:
                st[c.status] = st.get(c.status, 0) + 1
            how = "lowest predicted time" if self.device is not None else \
                "highest tile bound, then fewest partial tile pairs"
            lines.append(f"why: {how} among {len(self.candidates)} candidate tilings ("
                         + ", ".join(f"{n} {k}" for k, n in sorted(st.items())) + ")")
            hdr = f"{'rank':>4}  {'q / kv tile':<22} {'tile bound':>10} {'partial':>9} {'predicted':>11}  status"
            lines.append(hdr)
            for i, c in enumerate(self.candidates[:top]):
                tb = format_speedup(c.tile_speedup) if c.tile_speedup is not None else "-"
                part = f"{c.partial / c.visited:.0%}" if c.visited else ("0%" if c.visited == 0 else "-")
                if c.predicted_time_s is not None:
                    pt = format_time(c.predicted_time_s)
                elif c.lower_bound_s is not None:
                    pt = ">=" + format_time(c.lower_bound_s)
                else:
                    pt = "-"
                lines.append(f"{i + 1:>4}  {c.label:<22} {tb:>10} {part:>9} {pt:>11}  {c.status}"
                             + (f" ({c.note})" if c.note else ""))
            if len(self.candidates) > top:
                lines.append(f"      ... {len(self.candidates) - top} more")
            if "pruned" in st:
                lines.append("pruned: an exact lower bound of its time (all work spread over the SMs, or its "
                             "longest CTA) already exceeds the best predicted time")
            if "estimated" in st:
                lines.append("estimated: a composition ranked by an estimate of its visited tile pairs and not "
                             "planned (simulate(..., max_plans=N) plans more)")
        for n in self.notes:
            lines.append("note: " + n)
        if self.active_fraction is not None:
            lines.append(f"head routing: {self.active_fraction:.1%} of (token, head) pairs active "
                         f"({'expected fraction' if self.head_routing == 'fraction' else 'measured routing'}); "
                         f"figures count only selected (token, head) pairs, {self.ctas} CTAs (batch, head, "
                         f"compacted tile); candidates were ranked computing all heads")
        if len(self.groups) > 1:
            lines.append("head groups:")
            for g in self.groups:
                lines.append(f"  heads {format_heads(g.heads)}: {g.pattern!r}: "
                             f"FLOP bound {format_speedup(g.flop_speedup)}, "
                             f"tile bound {format_speedup(g.tile_speedup)}, partial {g.partial}")
        lines.append(f"simulated in {self.elapsed_s:.3f} s")
        return "\n".join(lines)


def format_speedup(x: float | None) -> str:
    """'8.53x', 'inf', or '-' when unknown."""
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}x"


def format_time(t: float | None) -> str:
    """Seconds in s, ms or us to three digits, or '-' when unknown."""
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def format_heads(heads: Sequence[int]) -> str:
    """'0-7' for a run of heads, else '0,2,5'."""
    heads = list(heads)
    if len(heads) > 1 and heads == list(range(heads[0], heads[-1] + 1)):
        return f"{heads[0]}-{heads[-1]}"
    return ",".join(map(str, heads))


def format_table(rows: Sequence[tuple[str, SimReport]]) -> str:
    """One row per spec, and one per head group for specs whose heads differ."""
    head = ["spec", "heads", "q tile", "kv tile", "FLOP bound", "tile bound", "block-sparse", "visited",
            "partial", "predicted", "speedup"]
    routed_heads = any(r.active_fraction is not None for _, r in rows)
    if routed_heads:  # head routing: the fraction of (token, head) pairs computed, and the gain over all heads
        head += ["heads on", "vs all heads"]
    table = [head]
    for name, r in rows:
        table.append([name, str(r.spec.num_heads), format_tile(r.q_tile), format_tile(r.kv_tile),
                      format_speedup(r.flop_speedup), format_speedup(r.tile_speedup),
                      "yes" if r.fully_block_sparse else "no", str(r.visited), str(r.partial),
                      format_time(r.predicted_time_s), format_speedup(r.predicted_speedup)]
                     + ([f"{r.active_fraction:.0%}" if r.active_fraction is not None else "all",
                         format_speedup(r.routing_speedup)] if routed_heads else []))
        if len(r.groups) > 1:
            for g in r.groups:
                table.append([f"  heads {format_heads(g.heads)}", str(len(g.heads)), "", "",
                              format_speedup(g.flop_speedup), format_speedup(g.tile_speedup),
                              "yes" if g.fully_block_sparse else "no", str(g.visited), str(g.partial), "", ""]
                             + (["", ""] if routed_heads else []))
    return align_columns(table, left=2)


def align_columns(rows: Sequence[Sequence[str]], left: int = 1, spanning: Sequence[bool] = ()) -> str:
    """Rows of cells, the first a header, as aligned columns with a rule under the header: the
    first `left` columns left-aligned, the others right-aligned. A row marked in `spanning`
    prints its first two cells only, and no column widens for its second."""
    span = list(spanning) + [False] * (len(rows) - len(spanning))
    widths = [max(len(row[i]) for row, sp in zip(rows, span) if not sp or i == 0) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        if span[j]:
            out.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            out.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                       .rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


__all__ = ["SimReport", "HeadFigures", "head_groups", "format_table", "align_columns", "format_speedup",
           "format_time", "format_heads"]
