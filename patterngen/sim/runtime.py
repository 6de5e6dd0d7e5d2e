"""Simulating a spec with run-time nodes on given ids: `simulate(spec, clusters=(cq, ck))` for
`Clustered()`, `simulate(spec, block_indices=...)` for box-routed compositions.

The ids decide the work, so the simulator takes them, as `pg.attention` does, and counts what
each head class of `patterngen.runtime` runs, as one launch each:

* `static`: the tile plan of the static heads and of mixed heads' static parts;
* `packed`: heads exactly Clustered(), sorted into documents: per (batch, head, cluster) its q
  tiles each visit the kv tiles of the cluster's keys, the last one partial when the keys do
  not fill it;
* `routed`: heads exactly box-routed, planned as flat routing in block-major order;
* `gathered`: the rest of mixed heads, per group (a cluster, or a query box and its routed
  boxes) its q tiles over its keys' tiles, every one partial. These pairs run as torch ops,
  not a kernel: their predicted time is what a kernel on those tiles would take.

The report gives the exact visible pairs (the static part's closed-form count plus the
gathered remainder's), the visited tile pairs per launch, the tile bound (all tile pairs /
visited) and, with a device model, the predicted time against dense attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.plan import build_plan
from ..analysis.runtime import head_subset, remainder, runtime_groups, split_heads
from ..analysis.tiling import default_tiling, volume
from ..core.tiles import Tiling
from ..ir import Clustered, Routed, Spec
from ..routing.blocks import block_masks, flat_equivalent, normalize_block_indices
from ..routing.clusters import check_clusters, sorted_documents
from .counting import visible_pairs
from .device import DeviceModel, load_device
from .profiles import plan_profiles
from .time_model import Workload, dense_time, predict_time


LAUNCHES = {"static": "static part", "packed": "packed cluster documents", "routed": "routed boxes",
            "gathered": "gathered remainder (torch)"}
"""What each launch name of a RuntimeReport runs (see the module docstring)."""


@dataclass(frozen=True)
class Launch:
    """One launch of a run-time spec's call: its visited and full tile pairs, predicted time."""

    name: str
    visited: int
    full: int
    predicted_time_s: float | None


@dataclass(frozen=True)
class RuntimeReport:
    """What `simulate` finds for a spec with run-time nodes on given ids (sums over batch and
    heads); `tile_pairs` counts the dense tile pairs at `q_tile` x `kv_tile` tokens."""

    spec: Spec
    q_tile: int | tuple
    kv_tile: int | tuple
    batch: int
    launches: tuple[Launch, ...]
    dense_pairs: int
    visible_pairs: int
    tile_pairs: int
    device: DeviceModel | None = None
    dense_time_s: float | None = None

    @property
    def packed(self) -> bool:
        """Whether every head ran as packed cluster documents."""
        return [x.name for x in self.launches] == ["packed"]

    @property
    def visited(self) -> int:
        return sum(x.visited for x in self.launches)

    @property
    def full(self) -> int:
        return sum(x.full for x in self.launches)

    @property
    def predicted_time_s(self) -> float | None:
        return None if self.device is None else sum(x.predicted_time_s for x in self.launches)

    @property
    def tile_speedup(self) -> float:
        return self.tile_pairs / self.visited if self.visited else float("inf")

    @property
    def flop_speedup(self) -> float:
        return self.dense_pairs / self.visible_pairs if self.visible_pairs else float("inf")

    @property
    def predicted_speedup(self) -> float | None:
        t = self.predicted_time_s
        return None if not t else self.dense_time_s / t

    def summary(self) -> str:
        parts = ", ".join(f"{LAUNCHES[x.name]} {x.visited}" for x in self.launches)
        text = (f"on these ids ({parts} tile pairs), tiles {self.q_tile}/{self.kv_tile}: FLOP bound "
                f"{self.flop_speedup:.2f}x, tile bound {self.tile_speedup:.2f}x ({self.visited} of "
                f"{self.tile_pairs} tile pairs visited)")
        if self.predicted_speedup is not None:
            text += f", predicted {self.predicted_speedup:.2f}x over dense on {self.device.name}"
        return text


def _plan_units(plan, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) kv tiles per CTA ((batch, head, q tile), q tile fastest) of a plan."""
    profiles = plan_profiles(plan)
    rows = plan.head_group.expand(batch, -1) if plan.head_group.shape[0] == 1 else plan.head_group
    full = [profiles[g][1] for g in rows.flatten().tolist()]
    visited = [profiles[g][0] for g in rows.flatten().tolist()]
    if not full:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(full), torch.cat(visited) - torch.cat(full)


def _group_units(nq: torch.Tensor, nk: torch.Tensor, tq: int, tk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) kv tiles per CTA of groups of nq[g] queries seeing all nk[g] keys: each q
    tile visits the keys' tiles, the last one partial when the keys do not fill it."""
    q_tiles = -(-nq // tq)
    return (nk // tk).repeat_interleave(q_tiles), (nk % tk > 0).long().repeat_interleave(q_tiles)


def simulate_runtime(spec: Spec, q_tile=None, kv_tile=None, device=None, clusters: tuple | None = None,
                     block_indices: torch.Tensor | None = None) -> RuntimeReport:
    """The work of `spec` (holding Clustered() or box-routed blocks) on these ids."""
    if spec.length_free:
        raise ValueError(f"simulate: give the lengths: {spec!r} is length-free (bind it, spec.bind(nq, nkv))")
    if spec.clustered and clusters is None:
        raise ValueError(f"simulate: {spec!r} holds Clustered(), whose pairs come from run-time cluster ids: give "
                         f"them, simulate(spec, clusters=(q_clusters, kv_clusters)) (see pg.cluster)")
    if spec.ndim == 1 or spec.clustered:
        for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
            if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
                raise ValueError(f"{name}: a Clustered spec runs on flat tiles; expected an int >= 1, got {t!r}")
    if q_tile is None and kv_tile is None and spec.ndim > 1:
        tiling = default_tiling(spec)
    else:
        tiling = Tiling(q_tile or 64, kv_tile or 64)
    tq, tk = volume(tiling.q_tile), volume(tiling.kv_tile)
    batch = 1
    cq = ck = indices = masks = None
    if clusters is not None:
        batch = clusters[0].shape[0] if isinstance(clusters[0], torch.Tensor) and clusters[0].dim() == 3 else 1
        cq, ck = check_clusters(*clusters, spec, batch, spec.nq, spec.nkv, torch.device("cpu"))
    if spec.routed is not None:
        indices = normalize_block_indices(spec, block_indices)
        batch = indices.shape[0]
        masks = block_masks(spec, indices)
    dev = load_device(device) if device is not None else None
    split = split_heads(spec)
    launches, seen = [], 0

    def launch(name: str, full: torch.Tensor, partial: torch.Tensor, q_vol: int, kv_vol: int, box: bool) -> None:
        t = None if dev is None else float(predict_time(dev, Workload(q_vol, kv_vol, spec.head_dim, box, full,
                                                                      partial)))
        launches.append(Launch(name, int((full + partial).sum()), int(full.sum()), t))

    op_heads = tuple(h for h in range(spec.num_heads) if split.parts[h] is not None)
    if op_heads:
        sub, _ = head_subset(spec, op_heads, [split.parts[h] for h in op_heads])
        idx = None if sub.routed is None else indices[:, list(op_heads)]
        plan = build_plan(sub, tiling, idx)
        launch("static", *_plan_units(plan, batch), tq, tk, not isinstance(tiling.q_tile, int))
        counts = visible_pairs(sub, idx)
        seen += int(counts.sum()) * (batch if counts.dim() == 1 else 1)
    for kind in (Clustered, Routed):
        heads = tuple(h for h in split.pure if isinstance(spec.head_patterns[h], kind))
        if not heads:
            continue
        hs = list(heads)
        if kind is Clustered:
            _, _, docs_q, docs_k = sorted_documents(cq[:, hs], ck[:, hs])
            launch("packed", *_group_units(docs_q, docs_k, tq, tk), tq, tk, False)
            seen += int((docs_q * docs_k).sum())
        else:
            flat = flat_equivalent(head_subset(spec, heads, [spec.head_patterns[h] for h in heads])[0])
            plan = build_plan(flat, Tiling(tq, tk), indices[:, hs])
            launch("routed", *_plan_units(plan, batch), tq, tk, False)
            seen += int(visible_pairs(flat, indices[:, hs]).sum())
    if split.mixed:
        fulls, partials = [], []
        for b in range(batch):
            for h in split.mixed:
                pattern = spec.head_patterns[h]
                ids = None if cq is None else (cq[b, h], ck[b, h])
                qg, kg = runtime_groups(spec, pattern, ids, None if indices is None else indices[b, h])
                full, partial = _group_units((qg >= 0).sum(1), (kg >= 0).sum(1), tq, tk)
                fulls.append(torch.zeros_like(full))
                partials.append(full + partial)  # the remainder's mask is evaluated on every tile
                seen += _remainder_pairs(spec, pattern, split.parts[h], qg, kg,
                                         None if masks is None else masks[b, h], ids)
        launch("gathered", torch.cat(fulls), torch.cat(partials), tq, tk, False)
    heads = spec.num_heads * batch
    tile_pairs = heads * -(-spec.nq // tq) * -(-spec.nkv // tk)
    dense = None if dev is None else dense_time(dev, spec.nq, spec.nkv, spec.num_heads, spec.head_dim, batch)
    return RuntimeReport(spec, tiling.q_tile, tiling.kv_tile, batch, tuple(launches), heads * spec.nq * spec.nkv,
                         seen, tile_pairs, dev, dense)


def _remainder_pairs(spec: Spec, pattern, static, qg: torch.Tensor, kg: torch.Tensor, block_mask, clusters) -> int:
    """Pairs of `pattern` outside its static part within the groups, a group at a time."""
    total = 0
    for qi, kj in zip(qg, kg):
        qi, kj = qi[qi >= 0][:, None], kj[kj >= 0][None, :]
        if qi.numel() and kj.numel():
            total += int(remainder(spec, pattern, static, qi, kj, block_mask, clusters).sum())
    return total


__all__ = ["Launch", "RuntimeReport", "simulate_runtime"]
