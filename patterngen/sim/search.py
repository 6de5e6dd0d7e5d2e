"""The tiling search: which tile shapes to try, their exact counts and times, and a branch and bound.

Candidates are the tile shapes the device's kernels run: flat tiles and, for windows on
n-D grids, every box whose volume is a kernel tile volume. A `Window` on box tiles factors
per dimension, so the exact tile counts of every box shape come from a few 1-D analyses;
exact lower bounds of the predicted time (total work over the SMs, the longest CTA) let a
branch and bound evaluate only the shapes that can still win. Other patterns build plans
for a short list ranked by an estimate, since a plan per shape would cost more than the
answer is worth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir import Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Union, Window
from ..analysis.plan import build_plan
from ..analysis.tiling import volume
from ..core.tiles import TileGrid, Tiling
from .device import DeviceModel
from .profiles import closed_form_profile, has_closed_form, plan_profiles, window_dim_sums
from .tile_shapes import box_shapes, flat_as_box, format_tile, tile_dims
from .time_model import Workload, concurrent_ctas, kernel_params, predict_time, tile_times

# tile volumes searched without a device (a device model lists its own); kernel-runnable, like every
# device's (`analysis.tiling.kernel_tile_ok`), so the policy's `kernel_tilings` can take the best one
DEFAULT_TILE_VOLUMES = ((128, 128),)
FLAT_PLAN_LIMIT = 1 << 16  # above this many tokens, flat tiles that wrap rows of an n-D window are not planned


@dataclass
class Candidate:
    """One tiling the optimizer considered. `status`: 'exact' (counted and timed),
    'pruned' (its lower bound already exceeded the best time), 'estimated' (ranked by
    an estimate, no plan built) or 'skipped' (see note)."""

    q_tile: int | tuple[int, ...]
    kv_tile: int | tuple[int, ...]
    status: str = "pending"
    tile_pairs: int = 0
    visited: int | None = None
    full: int | None = None
    predicted_time_s: float | None = None
    lower_bound_s: float | None = None
    estimate: float | None = None
    note: str = ""
    profiles: Any = field(default=None, repr=False)  # (per-group profiles, head_group [B, H]) once evaluated
    plan: Any = field(default=None, repr=False)      # the Plan, when one was built
    totals: Any = field(default=None, repr=False)    # per-dimension window totals (visited, full, max)

    @property
    def partial(self) -> int | None:
        return None if self.visited is None else self.visited - self.full

    @property
    def tile_speedup(self) -> float | None:
        if self.visited is None:
            return None
        return self.tile_pairs / self.visited if self.visited else math.inf

    @property
    def fully_block_sparse(self) -> bool | None:
        return None if self.visited is None else self.partial == 0

    @property
    def label(self) -> str:
        return f"{format_tile(self.q_tile)} / {format_tile(self.kv_tile)}"


class Search:
    """Evaluates tilings of one spec on one device model (or none)."""

    def __init__(self, spec: Spec, dev: DeviceModel | None, batch: int, indices: torch.Tensor | None):
        self.spec, self.dev, self.batch, self.indices = spec, dev, batch, indices
        self.patterns = list(spec.head_patterns.unique)
        self.mult = {p: spec.head_patterns.count(p) for p in self.patterns}
        self.routed = spec.routed is not None
        self._times: dict = {}
        self._firsts: dict = {}

    # -- candidates --------------------------------------------------------------
    def candidates(self, q_fixed, kv_fixed) -> tuple[list[Candidate], list[str]]:
        spec, notes = self.spec, []
        vols = list(self.dev.tile_volumes) if self.dev is not None else list(DEFAULT_TILE_VOLUMES)
        if self.dev is not None:
            fit = [v for v in vols if self.dev.fits(v[0], v[1], spec.head_dim)]
            if len(fit) < len(vols):
                notes.append(f"tile volumes {[v for v in vols if v not in fit]} do not fit in shared memory at "
                             f"head_dim {spec.head_dim}")
            vols = fit or vols[-1:]
        has_window = any(isinstance(n, Window) for p in self.patterns for n in p.walk())
        boxes_ok = spec.ndim > 1 and has_window and not self.routed
        pairs: dict[tuple, None] = {}

        def shapes(vol, grid_shape, other):
            """Tile shapes of this volume; when the other side is fixed, of the same kind."""
            if spec.ndim == 1:
                return [vol]
            if isinstance(other, int):
                return [vol]
            out: list = box_shapes(vol, grid_shape) if boxes_ok or isinstance(other, tuple) else []
            if isinstance(other, tuple):
                return out
            eq = flat_as_box(vol, grid_shape)
            if eq is not None and boxes_ok:
                return out if eq in out else out + [eq]
            if not boxes_ok or spec.nq <= FLAT_PLAN_LIMIT:
                out.append(vol)
            return out

        skipped_flat = boxes_ok and spec.nq > FLAT_PLAN_LIMIT and q_fixed is None and kv_fixed is None and any(
            flat_as_box(v, spec.q_shape) is None or flat_as_box(k, spec.kv_shape) is None for v, k in vols)
        for matching in (True, False):  # tile volumes paired as the device lists them; else any
            for qv, kv in vols:
                if matching and ((q_fixed is not None and volume(q_fixed) != qv)
                                 or (kv_fixed is not None and volume(kv_fixed) != kv)):
                    continue
                qs = [q_fixed] if q_fixed is not None else shapes(qv, spec.q_shape, kv_fixed)
                ks = [kv_fixed] if kv_fixed is not None else shapes(kv, spec.kv_shape, q_fixed)
                for q in qs:
                    for k in ks:
                        if spec.ndim == 1 or isinstance(q, int) == isinstance(k, int):
                            pairs[(q, k)] = None
            if pairs:
                break
        if skipped_flat:
            notes.append(f"flat tiles that wrap rows of the {'x'.join(map(str, spec.q_shape))} grid were not "
                         f"planned (more than {FLAT_PLAN_LIMIT} tokens): a window meets fewer box tiles of the "
                         f"same volume")
        if not pairs:
            raise ValueError(f"no tiling to search for {spec!r} with q_tile={q_fixed!r}, kv_tile={kv_fixed!r}")
        return [Candidate(q, k) for q, k in pairs], notes

    # -- evaluation --------------------------------------------------------------
    def grids(self, c: Candidate) -> tuple[TileGrid, TileGrid]:
        return TileGrid(self.spec.q_shape, c.q_tile, "q_tile"), TileGrid(self.spec.kv_shape, c.kv_tile, "kv_tile")

    def totals(self, c: Candidate):
        """Exact (visited, full, max visited per q tile) summed over heads from per-dimension
        window counts, or None unless every head pattern is a Window on box tiles."""
        spec = self.spec
        if self.routed or not all(isinstance(p, Window) for p in self.patterns):
            return None
        qd, kd = tile_dims(c.q_tile, spec.q_shape), tile_dims(c.kv_tile, spec.kv_shape)
        if qd is None or kd is None:
            return None
        V = F = M = 0
        for p in self.patterns:
            v = f = m = 1
            for (w, st, d, cz), L, tq, tk in zip(p.dims(spec.ndim), spec.q_shape, qd, kd):
                a, b, mx = window_dim_sums(L, w, st, d, bool(cz), tq, tk)
                v, f, m = v * a, f * b, m * mx
            V += self.mult[p] * v
            F += self.mult[p] * f
            M = max(M, m)
        return V, F, M

    def needs_plan(self, c: Candidate) -> bool:
        if self.routed:
            return True
        qg, kg = self.grids(c)
        return any(has_closed_form(p, qg, kg) is False for p in self.patterns)

    def evaluate(self, c: Candidate) -> None:
        """Exact counts (and predicted time) of a candidate."""
        spec = self.spec
        qg, kg = self.grids(c)
        c.tile_pairs = qg.count * kg.count * spec.num_heads * (self.indices.shape[0] if self._batched else 1)
        if self.routed:
            plan = build_plan(spec, Tiling(c.q_tile, c.kv_tile), self.indices)
            profiles = plan_profiles(plan)
            head_group = plan.head_group
            c.plan = plan
        else:
            profiles, index = [], {}
            for p in self.patterns:
                prof = closed_form_profile(p, spec, qg, kg)
                if prof is None:
                    sub = build_plan(Spec(p, spec.q_shape, spec.kv_shape, head_dim=spec.head_dim),
                                     Tiling(c.q_tile, c.kv_tile))
                    prof = plan_profiles(sub)[0]
                index[p] = len(profiles)
                profiles.append(prof)
            head_group = torch.tensor([[index[p] for p in spec.head_patterns]])
        c.profiles = (profiles, head_group)
        counts = torch.tensor([[int(v.sum()), int(f.sum())] for v, f in profiles], dtype=torch.long)
        per_unit = counts[head_group.flatten()]
        c.visited, c.full = int(per_unit[:, 0].sum()), int(per_unit[:, 1].sum())
        if self.dev is not None:
            c.predicted_time_s = float(predict_time(self.dev, self.workload(c)))
        c.status = "exact"

    @property
    def _batched(self) -> bool:
        return self.indices is not None and self.indices.dim() == 4

    def workload(self, c: Candidate) -> Workload:
        profiles, head_group = c.profiles
        vis = torch.stack([v for v, _ in profiles])
        full = torch.stack([f for _, f in profiles])
        rows = head_group
        if rows.shape[0] == 1 and self.batch > 1:
            rows = rows.expand(self.batch, -1)
        g = rows.flatten()
        uf, uv = full[g].flatten(), vis[g].flatten()
        box = self.spec.ndim > 1 and not isinstance(c.q_tile, int)
        return Workload(volume(c.q_tile), volume(c.kv_tile), self.spec.head_dim, box, uf, uv - uf)

    def lower_bound(self, c: Candidate, totals) -> float:
        V, F, M = totals
        units = self.batch * self.spec.num_heads * self.grids(c)[0].count
        box = self.spec.ndim > 1 and not isinstance(c.q_tile, int)
        key = (volume(c.q_tile), volume(c.kv_tile), box)
        if key not in self._times:
            p = kernel_params(self.dev, *key[:2], self.spec.head_dim)
            t_full, t_part, fixed = tile_times(self.dev, p, *key[:2], self.spec.head_dim, box)
            self._times[key] = (float(t_full), float(t_part), float(fixed))
        t_full, t_part, fixed = self._times[key]
        p = self.dev.kernel
        total = units * fixed + self.batch * (F * t_full + (V - F) * t_part)
        longest = fixed + M * min(t_full, t_part)
        return p["launch_overhead_us"] * 1e-6 + max(total / concurrent_ctas(self.dev, p), longest)

    def estimate(self, c: Candidate) -> float:
        """Estimated visited tile pairs (for ordering the candidates that need plans), from
        per-dimension window totals and tile corners only, so thousands of box shapes cost little."""
        return sum(self.mult[p] * self._estimate(p, c) for p in self.patterns)

    def _first_tokens(self, side: str, tile) -> torch.Tensor:
        """Smallest flattened token of every tile (the tile's first corner), cached per tile shape."""
        key = (side, tile)
        if key not in self._firsts:
            shape = self.spec.q_shape if side == "q" else self.spec.kv_shape
            if isinstance(tile, int):
                first = torch.arange(-(-math.prod(shape) // tile)) * tile
            else:
                counts = [-(-n // t) for n, t in zip(shape, tile)]
                first = torch.zeros(1, dtype=torch.long)
                for n, t, m in zip(shape, tile, counts):
                    first = (first[:, None] * n + torch.arange(m) * t).flatten()
            self._firsts[key] = first
        return self._firsts[key]

    def _estimate(self, pattern: Pattern, c: Candidate) -> float:
        spec = self.spec
        Tq, Tk = (g.count for g in self.grids(c))
        if isinstance(pattern, Full):
            return float(Tq * Tk)
        if isinstance(pattern, Window):
            qd, kd = tile_dims(c.q_tile, spec.q_shape), tile_dims(c.kv_tile, spec.kv_shape)
            if qd is None or kd is None:
                return float(Tq * Tk)
            return float(math.prod(window_dim_sums(L, w, st, d, bool(cz), a, b)[0] for (w, st, d, cz), L, a, b
                                   in zip(pattern.dims(spec.ndim), spec.q_shape, qd, kd)))
        if isinstance(pattern, (Sink, Global)):
            n_k = int((self._first_tokens("kv", c.kv_tile) < pattern.n).sum())
            if isinstance(pattern, Sink):
                return float(Tq * n_k)
            n_q = int((self._first_tokens("q", c.q_tile) < pattern.n).sum())
            return float(n_q * Tk + (Tq - n_q) * n_k)
        if isinstance(pattern, (Causal, Band)) and isinstance(c.q_tile, int):
            prof = closed_form_profile(pattern, spec, *self.grids(c))
            if prof is not None:
                return float(prof[0].sum())
        if isinstance(pattern, Union):
            return min(float(Tq * Tk), sum(self._estimate(p, c) for p in pattern.parts))
        if isinstance(pattern, Intersection):
            return min(self._estimate(p, c) for p in pattern.parts)
        return float(Tq * Tk)  # no estimate (Strided, Routed, causal on boxes): an upper bound

    # -- search ------------------------------------------------------------------
    def run(self, cands: list[Candidate], max_plans: int) -> list[Candidate]:
        dev = self.dev
        fast, planned, other = [], [], []
        for c in cands:
            t = self.totals(c)
            if t is not None:
                V, F, _ = t
                Tq, Tk = (g.count for g in self.grids(c))
                c.tile_pairs, c.visited, c.full = Tq * Tk * self.spec.num_heads, V, F
                c.totals = t
                fast.append(c)
            elif self.needs_plan(c):
                planned.append(c)
            else:
                other.append(c)
        for c in other:
            self.evaluate(c)
        best = min((c.predicted_time_s for c in other), default=math.inf) if dev is not None else None
        if dev is not None:  # branch and bound over exact lower bounds
            for c in fast:
                c.lower_bound_s = self.lower_bound(c, c.totals)
            fast.sort(key=lambda c: c.lower_bound_s)
            for c in fast:
                if c.lower_bound_s >= best:
                    c.status = "pruned"
                    continue
                self.evaluate(c)
                best = min(best, c.predicted_time_s)
        else:  # without a device the totals are the answer
            for c in fast:
                c.status = "exact"
        if planned:
            for c in planned:
                c.estimate = self.estimate(c)
            planned.sort(key=lambda c: c.estimate)
            for i, c in enumerate(planned):
                if i < max_plans:
                    self.evaluate(c)
                else:
                    c.status = "estimated"
                    c.note = f"~{c.estimate:.0f} visited tile pairs, no plan built"
        return sorted(cands, key=self._rank_key)

    def _rank_key(self, c: Candidate):
        order = {"exact": 0, "pruned": 1, "estimated": 2, "skipped": 3}[c.status]
        if c.status == "exact":
            if self.dev is not None:
                return (0, c.predicted_time_s, c.partial, -c.tile_speedup)
            return (0, -c.tile_speedup, c.partial, 0)
        if c.status == "pruned":
            return (1, c.lower_bound_s, 0, 0)
        return (order, c.estimate if c.estimate is not None else math.inf, 0, 0)


__all__ = ["Candidate", "Search", "DEFAULT_TILE_VOLUMES", "FLAT_PLAN_LIMIT"]
