"""Simulating a Clustered spec on given cluster ids: `simulate(spec, clusters=(cq, ck))`.

The ids decide the work, so the simulator takes them (as `pg.attention` does). A spec of only
Clustered() heads runs sorted by cluster as packed documents: per (batch, head, cluster) its
q tiles each visit the kv tiles of the cluster's keys, the last one partial when the keys do
not fill it. Compositions run the masked computation over every pair, so they visit every
tile pair. The report gives the exact visible pairs, the visited tile pairs, the tile bound
(all tile pairs / visited) and, with a device model, the time model's prediction against dense
attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.semantics import visible
from ..ir import Clustered, Spec
from ..routing.clusters import check_clusters, sorted_documents
from .device import DeviceModel, load_device
from .time_model import Workload, dense_time, predict_time


@dataclass(frozen=True)
class ClusterReport:
    """What `simulate` finds for a Clustered spec on given ids (sums over batch and heads)."""

    spec: Spec
    q_tile: int
    kv_tile: int
    batch: int
    packed: bool  # sorted into documents (every head Clustered()), else the masked computation
    dense_pairs: int
    visible_pairs: int
    tile_pairs: int  # dense tile pairs
    visited: int
    full: int
    device: DeviceModel | None = None
    predicted_time_s: float | None = None
    dense_time_s: float | None = None

    @property
    def tile_speedup(self) -> float:
        return self.tile_pairs / self.visited if self.visited else float("inf")

    @property
    def flop_speedup(self) -> float:
        return self.dense_pairs / self.visible_pairs if self.visible_pairs else float("inf")

    @property
    def predicted_speedup(self) -> float | None:
        if self.predicted_time_s is None or not self.predicted_time_s:
            return None
        return self.dense_time_s / self.predicted_time_s

    def summary(self) -> str:
        how = "sorted into packed documents" if self.packed else "masked, every pair"
        text = (f"Clustered ({how}), tiles {self.q_tile}/{self.kv_tile}: FLOP bound {self.flop_speedup:.2f}x, tile "
                f"bound {self.tile_speedup:.2f}x ({self.visited} of {self.tile_pairs} tile pairs visited)")
        if self.predicted_speedup is not None:
            text += f", predicted {self.predicted_speedup:.2f}x over dense on {self.device.name}"
        return text


def simulate_clusters(spec: Spec, q_clusters: torch.Tensor, kv_clusters: torch.Tensor, q_tile: int | None = None,
                      kv_tile: int | None = None, device=None) -> ClusterReport:
    """The work of `spec` (holding Clustered()) on these cluster ids, at flat tiles (default 64)."""
    if spec.length_free:
        raise ValueError(f"simulate: give the lengths: {spec!r} is length-free (bind it, spec.bind(nq, nkv))")
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"{name}: a Clustered spec runs on flat tiles; expected an int >= 1, got {t!r}")
    tq, tk = q_tile or 64, kv_tile or 64
    batch = q_clusters.shape[0] if isinstance(q_clusters, torch.Tensor) and q_clusters.dim() == 3 else 1
    cq, ck = check_clusters(q_clusters, kv_clusters, spec, batch, spec.nq, spec.nkv, torch.device("cpu"))
    heads = spec.num_heads * batch
    dense_pairs = heads * spec.nq * spec.nkv
    tile_pairs = heads * -(-spec.nq // tq) * -(-spec.nkv // tk)
    _, _, docs_q, docs_k = sorted_documents(cq, ck)
    packed = all(p == Clustered() for p in spec.head_patterns.unique)
    if packed:
        q_tiles = -(-docs_q // tq)
        unit_full = (docs_k // tk).repeat_interleave(q_tiles)
        unit_partial = (docs_k % tk > 0).long().repeat_interleave(q_tiles)
        seen = int((docs_q * docs_k).sum())
    else:  # every (batch, head, q tile) over every kv tile
        units = tile_pairs // -(-spec.nkv // tk) if spec.nkv else 0
        unit_full = torch.full((units,), spec.nkv // tk, dtype=torch.long)
        unit_partial = torch.full((units,), int(spec.nkv % tk > 0), dtype=torch.long)
        seen = _visible(spec, cq, ck)
    visited = int((unit_full + unit_partial).sum())
    full = int(unit_full.sum())
    dev = load_device(device) if device is not None else None
    predicted = dense = None
    if dev is not None:
        predicted = float(predict_time(dev, Workload(tq, tk, spec.head_dim, False, unit_full, unit_partial)))
        dense = dense_time(dev, spec.nq, spec.nkv, spec.num_heads, spec.head_dim, batch)
    return ClusterReport(spec, tq, tk, batch, packed, dense_pairs, seen, tile_pairs, visited, full, dev, predicted,
                         dense)


def _visible(spec: Spec, cq: torch.Tensor, ck: torch.Tensor) -> int:
    """Exact visible pairs of a composition, row chunk by row chunk."""
    total = 0
    kj = torch.arange(spec.nkv)[None, :]
    rows = max(1, (1 << 22) // max(spec.nkv, 1))
    for b in range(cq.shape[0]):
        for h, pattern in enumerate(spec.head_patterns):
            for r0 in range(0, spec.nq, rows):
                qi = torch.arange(r0, min(spec.nq, r0 + rows))[:, None]
                total += int(visible(pattern, qi, kj, spec, clusters=(cq[b, h], ck[b, h])).sum())
    return total


__all__ = ["ClusterReport", "simulate_clusters"]
