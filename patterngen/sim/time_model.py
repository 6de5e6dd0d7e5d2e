"""The time model: predicted seconds of a block-sparse kernel, and of dense attention, on a device.

Work units are (batch, head, q tile) CTAs launched in that order, each costing a fixed
overhead plus its visited kv tiles (partial tiles, which run mask code, cost more: by the
ratio of their SASS instructions, `tile_costs`, where the device's arch was measured);
they run in waves over the SMs, each wave as long as its slowest CTA. Dense attention
goes through the same model with the device's dense parameters, so the predicted
speedup compares like with like. Everything works on floats or torch tensors, so that
calibration can differentiate through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from . import tile_costs
from .device import BYTES_PER_ELEMENT, DeviceModel


@dataclass
class Workload:
    """What the time model needs of one (spec, tiling, batch): per CTA in launch order
    ((batch, head, q tile), q tile fastest) the number of full and partial kv tiles."""

    q_volume: int
    kv_volume: int
    head_dim: int
    box: bool
    unit_full: torch.Tensor
    unit_partial: torch.Tensor

    @property
    def units(self) -> int:
        return len(self.unit_full)


def _hw(dev: DeviceModel) -> dict:
    return {"sm": dev.sm_count, "flops": dev.peak_bf16_dense_tflops * 1e12, "bw": dev.memory_bandwidth_gbs * 1e9,
            "exp": dev.exp_per_s}


def kernel_params(dev: DeviceModel, q_volume: int, kv_volume: int, head_dim: int) -> dict:
    """The device's kernel parameters for one tile shape: its `partial_tile_factor` prior
    replaced by the measured instruction ratio (`tile_costs`) unless the device was fitted from
    GPU timings or its arch has no measurement."""
    measured = None if dev.calibrated else tile_costs.partial_tile_factor(dev.arch, head_dim, q_volume, kv_volume)
    return dict(dev.kernel) if measured is None else {**dev.kernel, "partial_tile_factor": measured}


def tile_times(dev: DeviceModel, p: Mapping, q_volume: int, kv_volume: int, head_dim: int, box: bool):
    """(seconds per full kv tile, per partial kv tile, fixed seconds per CTA) for one CTA,
    under kernel parameters `p` (floats or tensors)."""
    hw = _hw(dev)
    ctas = p.get("ctas_per_sm", 1.0)
    per_flops = hw["flops"] / hw["sm"] / ctas
    per_exp = hw["exp"] / hw["sm"] / ctas
    per_bw = hw["bw"] / hw["sm"] / ctas
    scores = q_volume * kv_volume
    t_mma = 4.0 * scores * head_dim / (per_flops * p["mma_efficiency"])
    t_exp = scores / per_exp
    compute = t_mma + (1.0 - p["softmax_overlap"]) * t_exp + p.get("tile_overhead_us", 0.0) * 1e-6
    mem = 2.0 * kv_volume * head_dim * BYTES_PER_ELEMENT * (1.0 - p.get("kv_l2_hit_rate", 0.8)) / per_bw
    t_full = torch.maximum(torch.as_tensor(compute), torch.as_tensor(mem))
    if box:
        t_full = t_full * p.get("box_tile_factor", 1.0)
    t_partial = t_full * p.get("partial_tile_factor", 1.0)
    fixed = p["q_tile_overhead_us"] * 1e-6 + 2.0 * q_volume * head_dim * BYTES_PER_ELEMENT / per_bw
    return t_full, t_partial, fixed


def concurrent_ctas(dev: DeviceModel, p: Mapping) -> int:
    """CTAs that run at once: SMs times the CTAs per SM of kernel parameters `p`."""
    return int(round(dev.sm_count * float(p.get("ctas_per_sm", 1.0))))


def wave_time(unit_costs: torch.Tensor, slots: int) -> torch.Tensor:
    """Seconds to run CTAs in launch order, `slots` at a time: each wave lasts as long
    as its slowest CTA (wave quantisation)."""
    n = len(unit_costs)
    if n == 0:
        return unit_costs.new_zeros(())
    pad = (-n) % slots
    c = torch.nn.functional.pad(unit_costs, (0, pad))
    return c.view(-1, slots).amax(1).sum()


def predict_time(dev: DeviceModel, wl: Workload, params: Mapping | None = None) -> torch.Tensor:
    """Predicted kernel time in seconds (a 0-d tensor) of a workload; `params` overrides the
    device's kernel parameters (`kernel_params`; floats or tensors)."""
    p = {**kernel_params(dev, wl.q_volume, wl.kv_volume, wl.head_dim), **(params or {})}
    t_full, t_part, fixed = tile_times(dev, p, wl.q_volume, wl.kv_volume, wl.head_dim, wl.box)
    costs = fixed + wl.unit_full.to(torch.float64) * t_full + wl.unit_partial.to(torch.float64) * t_part
    return p["launch_overhead_us"] * 1e-6 + wave_time(costs, concurrent_ctas(dev, p))


def dense_params(dev: DeviceModel) -> dict:
    """The dense baseline's parameters in the kernel parameters' terms."""
    d = dev.dense
    return {**dev.kernel, "mma_efficiency": d["mma_efficiency"], "softmax_overlap": d["softmax_overlap"],
            "q_tile_overhead_us": d["q_tile_overhead_us"], "tile_overhead_us": d["tile_overhead_us"],
            "launch_overhead_us": d["launch_overhead_us"], "ctas_per_sm": 1.0, "box_tile_factor": 1.0}


def dense_workload(dev: DeviceModel, nq: int, nkv: int, heads: int, head_dim: int, batch: int = 1) -> Workload:
    """Dense attention on the device's dense tiles: every q tile visits every kv tile,
    the last one masked when Nkv is not a multiple of the tile."""
    qt, kt = int(dev.dense["q_tile"]), int(dev.dense["kv_tile"])
    units = batch * heads * -(-nq // qt)
    return Workload(qt, kt, head_dim, False, torch.full((units,), nkv // kt, dtype=torch.long),
                    torch.full((units,), int(nkv % kt > 0), dtype=torch.long))


def dense_time(dev: DeviceModel, nq: int, nkv: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """Predicted seconds of dense attention (the device's dense baseline parameters)."""
    return float(predict_time(dev, dense_workload(dev, nq, nkv, heads, head_dim, batch), dense_params(dev)))


__all__ = ["Workload", "kernel_params", "tile_times", "concurrent_ctas", "wave_time", "predict_time", "dense_params",
           "dense_workload", "dense_time"]
