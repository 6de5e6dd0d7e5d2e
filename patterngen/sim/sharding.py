"""Predicting a sequence-sharded run: `simulate(spec, world_size=N, link=...)` (issue 15).

For each layout the shapes allow (`analysis.shards`: contiguous, zig-zag), per rank:

* compute: the time model (`time_model.predict_time`) on the rank's CTAs (batch, head, q tile of
  its shard) with their visited kv tiles, as two launches: the tiles of keys it holds (while
  the keys arrive) and those of received keys (after);
* bytes: the keys and values it receives (plan tokens x 2 x kv heads x head dim x element size
  x batch);
* transfers: per round of the plan (no rank sends or receives twice), the larger of what it
  sends and receives, over a link model: latency + bytes / (bandwidth x efficiency);
* time: max(own-key compute, transfers) + received-key compute.

The run takes as long as its slowest rank; the layout with the shortest run is chosen. Link
models are data, one JSON file per link in `links/` beside this module (datasheet rates
cited in `source`, the rest priors), as device models are. Dense ring attention is given for
comparison: every rank receives the other (world_size - 1) shards, one per step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..analysis.shards import LAYOUTS, DistributedPlan, plan, ring_tokens
from ..core.tiles import Tiling
from ..ir import Spec
from .device import BYTES_PER_ELEMENT, DeviceModel, load_device, load_model, shipped
from .time_model import Workload, predict_time

LINK_DIR = Path(__file__).with_name("links")
LINK_KEYS = ("name", "bandwidth_gbs", "latency_us", "efficiency")


@dataclass(frozen=True)
class LinkModel:
    """A link between two GPUs: `bandwidth_gbs` each way, `latency_us` per message, and the
    fraction of the bandwidth large messages achieve (`efficiency`)."""

    name: str
    display_name: str
    bandwidth_gbs: float
    latency_us: float
    efficiency: float
    source: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "LinkModel":
        missing = [k for k in LINK_KEYS if k not in data]
        if missing:
            raise ValueError(f"link: {origin} lacks {missing}; a link model needs {list(LINK_KEYS)}")
        for k in LINK_KEYS[1:]:
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k != "latency_us" and v == 0):
                raise ValueError(f"link: {origin}: '{k}' must be a positive number, got {v!r}")
        if data["efficiency"] > 1:
            raise ValueError(f"link: {origin}: 'efficiency' is a fraction in (0, 1], got {data['efficiency']!r}")
        return cls(str(data["name"]), str(data.get("display_name", data["name"])), float(data["bandwidth_gbs"]),
                   float(data["latency_us"]), float(data["efficiency"]), dict(data.get("source", {})))

    def seconds(self, nbytes: float) -> float:
        """Seconds to move one message of `nbytes` (0 for none)."""
        if nbytes <= 0:
            return 0.0
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbs * 1e9 * self.efficiency)


def available_links() -> list[str]:
    """Names of the link models shipped with patterngen."""
    return shipped(LINK_DIR)


def load_link(link: "str | os.PathLike | LinkModel | Mapping") -> LinkModel:
    """A link model from a shipped name (`available_links()`), a JSON file's path, a dict or a
    LinkModel."""
    return load_model(link, LinkModel, "link", LINK_DIR)


@dataclass(frozen=True)
class RankFigures:
    """One rank's predicted share of a sharded run (seconds, bytes)."""

    rank: int
    visited: int  # kv tiles its CTAs visit, all heads and batch entries
    own_s: float  # compute on the keys it holds
    received_s: float  # compute on the keys it receives
    received_tokens: int
    received_bytes: int
    transfer_s: float
    time_s: float


@dataclass(frozen=True)
class ShardingReport:
    """What `simulate(spec, world_size=N, link=...)` predicts for the chosen layout; `candidates`
    holds the predicted run time of every layout tried."""

    spec: Spec
    world_size: int
    layout: str
    tiling: Tiling
    device: DeviceModel
    link: LinkModel
    batch: int
    ranks: tuple[RankFigures, ...]
    rounds: int
    one_gpu_s: float
    ring_bytes: int
    ring_transfer_s: float
    candidates: Mapping[str, float]
    plan: DistributedPlan = field(repr=False, compare=False)

    @property
    def time_s(self) -> float:
        """The run's predicted time: its slowest rank's."""
        return max(r.time_s for r in self.ranks)

    @property
    def speedup(self) -> float:
        """One GPU's predicted time over the sharded run's."""
        return self.one_gpu_s / self.time_s if self.time_s > 0 else float("inf")

    def summary(self) -> str:
        worst = max(self.ranks, key=lambda r: r.time_s)
        got = max(r.received_bytes for r in self.ranks)
        others = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.candidates.items() if k != self.layout)
        return (f"{self.world_size} ranks, {self.layout} layout, tiles {self.tiling}, {self.device.name} over "
                f"{self.link.name}: {self.time_s * 1e3:.3g} ms (rank {worst.rank} slowest; one GPU "
                f"{self.one_gpu_s * 1e3:.3g} ms, {self.speedup:.2f}x); at most {got / 1e6:.3g} MB received per rank "
                f"in {self.rounds} round(s), dense ring attention {self.ring_bytes / 1e6:.3g} MB"
                + (f"; other layouts: {others}" if others else ""))

    def table(self) -> str:
        from .report import align_columns
        rows = [["rank", "kv tiles", "own ms", "received ms", "received MB", "transfers ms", "time ms"]]
        rows += [[str(r.rank), str(r.visited), f"{r.own_s * 1e3:.3g}", f"{r.received_s * 1e3:.3g}",
                  f"{r.received_bytes / 1e6:.3g}", f"{r.transfer_s * 1e3:.3g}", f"{r.time_s * 1e3:.3g}"]
                 for r in self.ranks]
        return align_columns(rows)


def _rank_workloads(dp: DistributedPlan, rank: int, batch: int) -> tuple[Workload, Workload, Workload]:
    """The rank's CTAs as workloads: with all their visited kv tiles, with those of the keys the
    rank holds, and (CTAs that have some) with those of received keys: the two passes of
    `distributed.attention`, the first while the keys arrive."""
    tp, spec = dp.tile_plan, dp.spec
    kg = tp.kv_grid
    first = kg.tokens(torch.arange(kg.count))
    first = first.masked_fill(first < 0, spec.nkv).min(1).values.clamp_max(spec.nkv - 1)
    holds = torch.zeros(spec.nkv, dtype=torch.bool)
    for a, b in dp.kv_shards[rank]:
        holds[a:b] = True
    own_tile = holds[first]
    tiles = dp.q_tiles(rank)

    def per_tile(g, flags: torch.Tensor) -> torch.Tensor:  # visited entries flagged, per q tile of the rank
        c = torch.cat([torch.zeros(1, dtype=torch.long), flags.long().cumsum(0)])
        return (c[g.q_ptr[1:]] - c[g.q_ptr[:-1]])[tiles]

    counts = {}
    for h in range(spec.num_heads):  # heads sharing a plan share their counts
        g = tp.head_plan(h)
        if id(g) not in counts:
            mine = own_tile[g.kv_tiles]
            counts[id(g)] = [per_tile(g, g.full), per_tile(g, ~g.full), per_tile(g, g.full & mine),
                             per_tile(g, ~g.full & mine)]
    full, part, own_full, own_part = (torch.cat([counts[id(tp.head_plan(h))][i] for h in range(spec.num_heads)])
                                      for i in range(4))
    box = not isinstance(dp.tiling.q_tile, int)

    def wl(f, p):  # CTAs heaviest first (the order the kernels launch their work items in), empty ones dropped
        order = torch.argsort(f + p, descending=True, stable=True)
        order = order[(f + p)[order] > 0]
        return Workload(tp.q_grid.volume, kg.volume, spec.head_dim, box, f[order].repeat(batch),
                        p[order].repeat(batch))

    return wl(full, part), wl(own_full, own_part), wl(full - own_full, part - own_part)


def _predict(dp: DistributedPlan, dev: DeviceModel, link: LinkModel, batch: int, one_gpu_s: float,
             ring_bytes: int) -> ShardingReport:
    """The report of one layout (its `candidates` filled in by `simulate_sharding`)."""
    spec = dp.spec
    per_token = 2 * spec.num_kv_heads * spec.head_dim * BYTES_PER_ELEMENT * batch
    ranks = []
    for r in range(dp.world_size):
        everything, own, received = _rank_workloads(dp, r, batch)
        own_s = float(predict_time(dev, own)) if own.units else 0.0
        received_s = float(predict_time(dev, received)) if received.units else 0.0
        transfer_s = sum(link.seconds(per_token * max([t.tokens for t in rnd if t.src == r or t.dst == r], default=0))
                         for rnd in dp.rounds)
        tokens = dp.received_tokens[r]
        ranks.append(RankFigures(r, int(everything.unit_full.sum() + everything.unit_partial.sum()), own_s, received_s,
                                 tokens, tokens * per_token, transfer_s, max(own_s, transfer_s) + received_s))
    shard_bytes = spec.nkv // dp.world_size * per_token
    return ShardingReport(spec, dp.world_size, dp.layout, dp.tiling, dev, link, batch, tuple(ranks), len(dp.rounds),
                          one_gpu_s, ring_bytes, (dp.world_size - 1) * link.seconds(shard_bytes), {}, dp)


def simulate_sharding(spec: Spec, world_size: int, link="nvlink-h100", device="h100", *, batch: int = 1,
                      layout: str | None = None, tiling: Tiling | None = None) -> ShardingReport:
    """Predict `spec` sequence-sharded over `world_size` GPUs of `device` joined by `link`, in
    `layout` (None: each layout the shapes allow, the fastest chosen), at `tiling` (default: the
    plan's)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    dev, lk = load_device(device), load_link(link)
    layouts = LAYOUTS if layout is None else (layout,)
    plans, errors = {}, []
    for name in layouts:
        try:
            plans[name] = plan(spec, world_size, tiling, name)
        except ValueError as e:
            if layout is not None:
                raise
            errors.append(str(e))
    if not plans:
        raise ValueError("; ".join(errors))
    any_plan = next(iter(plans.values()))
    full, _, _ = _rank_workloads(plan(spec, 1, any_plan.tiling), 0, batch)
    one_gpu_s = float(predict_time(dev, full))
    ring = ring_tokens(spec, world_size) * 2 * spec.num_kv_heads * spec.head_dim * BYTES_PER_ELEMENT * batch
    reports = {name: _predict(dp, dev, lk, batch, one_gpu_s, ring) for name, dp in plans.items()}
    times = {name: r.time_s for name, r in reports.items()}
    return replace(reports[min(times, key=times.get)], candidates=times)


__all__ = ["LinkModel", "RankFigures", "ShardingReport", "available_links", "load_link", "simulate_sharding",
           "LINK_DIR"]
