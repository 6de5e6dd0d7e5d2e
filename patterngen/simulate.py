"""The speedup simulator, the device cost model and the tiling optimizer.

`simulate(spec)` answers, before any kernel runs, how much faster than dense
attention a pattern can be and with which tiles:

* the FLOP bound counts visible (q, kv) pairs exactly (`patterngen.counting`);
* the tile bound counts the tile pairs a block-sparse kernel must visit, and
  how many of them need mask code (partial), with the same numbers as
  `build_plan` (closed forms per q tile where the pattern allows, a plan
  otherwise);
* with a device model (data in `patterngen/devices/*.json`), a predicted time:
  work units are (batch, head, q tile) CTAs launched in that order, each
  costing a fixed overhead plus its visited kv tiles (partial ones cost more),
  scheduled in waves over the SMs; dense attention through the same model
  gives the predicted speedup.

When tiles are not given the optimizer searches the tile shapes the device's
kernels run (flat tiles and, for windows on n-D grids, every box whose volume
is a kernel tile volume). A `Window` on box tiles factors per dimension, so the
exact tile counts of every box shape come from a few 1-D analyses; exact lower
bounds of the predicted time (total work over the SMs, the longest CTA) let a
branch and bound evaluate only the shapes that can still win. Other patterns
build plans for a short list ranked by an estimate.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import counting
from . import head_routing_model
from .analysis import flat_form, flat_terms, kv_tile_status
from .ir import Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Union, Window
from .plan import Plan, build_plan
from .semantics import depends_on_kv_only
from .tiles import TileGrid, Tiling

DEVICE_DIR = Path(__file__).with_name("devices")
DEFAULT_TILE_VOLUMES = ((128, 128),)  # kernel tile volumes searched when no device is given
FLAT_PLAN_LIMIT = 1 << 16  # above this many tokens, flat tiles that wrap rows of an n-D window are not planned
BYTES_PER_ELEMENT = 2  # bf16 / fp16

KERNEL_KEYS = ("mma_efficiency", "softmax_overlap", "partial_tile_factor", "box_tile_factor", "q_tile_overhead_us",
               "tile_overhead_us", "launch_overhead_us", "kv_l2_hit_rate", "ctas_per_sm", "pipeline_stages")
DENSE_KEYS = ("q_tile", "kv_tile", "mma_efficiency", "softmax_overlap", "q_tile_overhead_us", "tile_overhead_us",
              "launch_overhead_us")
HW_KEYS = ("sm_count", "peak_bf16_dense_tflops", "memory_bandwidth_gbs", "exp_per_s", "shared_memory_per_sm_kb")


# == device models ======================================================================
@dataclass(frozen=True, eq=False)
class DeviceModel:
    """A GPU and the cost parameters of patterngen's kernels (and of a dense baseline) on it.

    Hardware peaks come from vendor datasheets (see `source`); the kernel
    parameters are priors until fitted from `patterngen bench` measurements
    (`calibrated` says which), see examples/calibration/.
    """

    name: str
    display_name: str
    sm_count: int
    peak_bf16_dense_tflops: float
    memory_bandwidth_gbs: float
    exp_per_s: float
    shared_memory_per_sm_kb: float
    tile_volumes: tuple[tuple[int, int], ...]
    kernel: Mapping[str, float]
    dense: Mapping[str, float]
    source: Mapping[str, str] = field(default_factory=dict)
    calibrated: bool = False
    origin: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "DeviceModel":
        if not isinstance(data, Mapping):
            raise TypeError(f"device: {origin} must hold a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "tile_volumes", "kernel", "dense") + HW_KEYS if k not in data]
        if missing:
            raise ValueError(f"device: {origin} lacks {missing}; a device model needs name, display_name, "
                             f"{', '.join(HW_KEYS)}, tile_volumes, kernel {{{', '.join(KERNEL_KEYS)}}} and "
                             f"dense {{{', '.join(DENSE_KEYS)}}}")
        for part, keys in (("kernel", KERNEL_KEYS), ("dense", DENSE_KEYS)):
            if not isinstance(data[part], Mapping):
                raise TypeError(f"device: {origin}: '{part}' must be an object with {list(keys)}")
            lack = [k for k in keys if k not in data[part]]
            if lack:
                raise ValueError(f"device: {origin}: '{part}' lacks {lack} (needs {list(keys)})")
        for k in HW_KEYS:
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"device: {origin}: '{k}' must be a positive number, got {v!r}")
        vols = data["tile_volumes"]
        if not isinstance(vols, list) or not vols or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x >= 16 for x in p)
                for p in vols):
            raise ValueError(f"device: {origin}: 'tile_volumes' must be a non-empty list of [q_volume, kv_volume] "
                             f"integer pairs, each >= 16 (tl.dot needs 16), got {vols!r}")
        return cls(name=str(data["name"]), display_name=str(data.get("display_name", data["name"])),
                   sm_count=int(data["sm_count"]), peak_bf16_dense_tflops=float(data["peak_bf16_dense_tflops"]),
                   memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]), exp_per_s=float(data["exp_per_s"]),
                   shared_memory_per_sm_kb=float(data["shared_memory_per_sm_kb"]),
                   tile_volumes=tuple((int(a), int(b)) for a, b in vols),
                   kernel={k: float(data["kernel"][k]) for k in KERNEL_KEYS},
                   dense={k: float(data["dense"][k]) for k in DENSE_KEYS},
                   source=dict(data.get("source", {})), calibrated=bool(data.get("calibrated", False)),
                   origin=origin)

    def to_dict(self) -> dict:
        return {"name": self.name, "display_name": self.display_name, "source": dict(self.source),
                "calibrated": self.calibrated, "sm_count": self.sm_count,
                "peak_bf16_dense_tflops": self.peak_bf16_dense_tflops,
                "memory_bandwidth_gbs": self.memory_bandwidth_gbs, "exp_per_s": self.exp_per_s,
                "shared_memory_per_sm_kb": self.shared_memory_per_sm_kb,
                "tile_volumes": [list(p) for p in self.tile_volumes], "kernel": dict(self.kernel),
                "dense": dict(self.dense)}

    def with_kernel(self, **params: float) -> "DeviceModel":
        """A copy with some kernel parameters replaced (what calibration produces)."""
        bad = [k for k in params if k not in KERNEL_KEYS]
        if bad:
            raise ValueError(f"with_kernel: unknown parameters {bad}; valid: {list(KERNEL_KEYS)}")
        return replace(self, kernel={**self.kernel, **{k: float(v) for k, v in params.items()}})

    def fits(self, q_volume: int, kv_volume: int, head_dim: int) -> bool:
        """Whether Q plus the pipelined K and V tiles fit in one CTA's shared memory."""
        stages = self.kernel["pipeline_stages"]
        need = (q_volume + 2 * stages * kv_volume) * head_dim * BYTES_PER_ELEMENT
        return need <= self.shared_memory_per_sm_kb * 1024 / self.kernel["ctas_per_sm"]

    def __repr__(self):
        return f"DeviceModel({self.name!r}, {self.display_name!r}, calibrated={self.calibrated})"


def available_devices() -> list[str]:
    """Names of the device models shipped with patterngen."""
    return sorted(p.stem for p in DEVICE_DIR.glob("*.json"))


def load_device(device: "str | os.PathLike | DeviceModel | Mapping") -> DeviceModel:
    """A device model from a shipped name ('h100', 'h200', 'b200', 'a100'), a path to a
    JSON file with the same fields (the way to add a GPU), a dict, or a DeviceModel."""
    if isinstance(device, DeviceModel):
        return device
    if isinstance(device, Mapping):
        return DeviceModel.from_dict(device)
    if not isinstance(device, (str, os.PathLike)):
        raise TypeError(f"device must be a name ({', '.join(available_devices())}), a path to a JSON file or a "
                        f"DeviceModel, got {device!r}")
    text = os.fspath(device)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        path = DEVICE_DIR / f"{text.lower()}.json"
        if not path.is_file():
            raise ValueError(f"device: unknown device {text!r}; shipped models: {', '.join(available_devices())} "
                             f"(or give the path of a JSON device model)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"device: no such file {text!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"device: {text!r} is not valid JSON: {e}") from None
    return DeviceModel.from_dict(data, origin=path.name)


# == the time model ========================================================================
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


def _tile_times(hw: dict, p: Mapping, q_volume: int, kv_volume: int, head_dim: int, box: bool):
    """(seconds per full kv tile, per partial kv tile, fixed seconds per CTA) for one CTA.

    Works on floats or torch tensors (calibration differentiates through it)."""
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


def _slots(hw: dict, p: Mapping) -> int:
    return int(round(hw["sm"] * float(p.get("ctas_per_sm", 1.0))))


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
    device's kernel parameters (floats or tensors)."""
    p = dict(dev.kernel) if params is None else {**dev.kernel, **params}
    hw = _hw(dev)
    t_full, t_part, fixed = _tile_times(hw, p, wl.q_volume, wl.kv_volume, wl.head_dim, wl.box)
    costs = fixed + wl.unit_full.to(torch.float64) * t_full + wl.unit_partial.to(torch.float64) * t_part
    return p["launch_overhead_us"] * 1e-6 + wave_time(costs, _slots(hw, p))


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


# == per-q-tile tile counts ===================================================================
def _box_dims(grid: TileGrid) -> tuple[int, ...] | None:
    """The tile as a box (one extent per dimension), also for a flat tile that is a box."""
    if len(grid.shape) == 1:
        return (grid.tile,)
    return flat_as_box(grid.tile, grid.shape) if grid.flat else grid.tile


def _window_totals(node: Window, spec: Spec, qdims, kdims):
    """Per-dimension (visited, full) arrays of a window on box tiles."""
    return [counting.window_dim_tiles(L, w, s, d, bool(c), tq, tk)
            for (w, s, d, c), L, tq, tk in zip(node.dims(spec.ndim), spec.q_shape, qdims, kdims)]


def _outer(arrays: Sequence[torch.Tensor]) -> torch.Tensor:
    out = arrays[0]
    for a in arrays[1:]:
        out = (out[:, None] * a[None, :]).flatten()
    return out


def closed_form_profile(pattern: Pattern, spec: Spec, qg: TileGrid, kg: TileGrid):
    """(visited, full) kv tiles of each q tile, int64 [Tq], without a plan; None when the
    pattern needs one (Routed, windows on flat n-D tiles, windows composed with other
    primitives, flattened-index compositions on box tiles)."""
    Tq, Tk = qg.count, kg.count
    if isinstance(pattern, Full):
        return torch.full((Tq,), Tk, dtype=torch.long), torch.full((Tq,), Tk, dtype=torch.long)
    if depends_on_kv_only(pattern):
        kany, kall = kv_tile_status(pattern, kg, spec)
        return torch.full((Tq,), int(kany.sum()), dtype=torch.long), torch.full((Tq,), int((kall & kany).sum()),
                                                                                 dtype=torch.long)
    flat = flat_form(pattern, spec, qg, kg)  # flattened-index compositions on contiguous tiles
    if flat is not None:
        return flat.profile()
    if isinstance(pattern, Window):
        qd, kd = _box_dims(qg), _box_dims(kg)
        if qd is None or kd is None:
            return None
        per = _window_totals(pattern, spec, qd, kd)
        return _outer([v for v, _ in per]), _outer([f for _, f in per])
    if isinstance(pattern, Causal) or (isinstance(pattern, Band) and qg.contiguous and kg.contiguous):
        # Causal needs only each tile's smallest and largest token; a Band's lower edge may fall
        # between the runs of non-contiguous tiles, so it needs contiguous ones
        off = spec.nkv - spec.nq
        left = None if isinstance(pattern, Causal) else pattern.left
        right = 0 if isinstance(pattern, Causal) else pattern.right
        qmin, qmax = qg.span
        kmin, kmax = kg.span
        # visited: kmin <= qmax + off + right and kmax >= qmin + off - left (spans are monotone)
        hi = torch.searchsorted(kmin, qmax + off + right, right=True)
        lo = torch.zeros_like(hi) if left is None else torch.searchsorted(kmax, qmin + off - left)
        visited = (hi - lo).clamp_min(0)
        # full: kmax <= qmin + off + right and kmin >= qmax + off - left
        fhi = torch.searchsorted(kmax, qmin + off + right, right=True)
        flo = torch.zeros_like(fhi) if left is None else torch.searchsorted(kmin, qmax + off - left)
        return visited, (fhi - flo).clamp_min(0)
    if isinstance(pattern, Global):
        qmin, qmax = qg.span
        kmin, kmax = kg.span
        nk_any, nk_all = int((kmin < pattern.n).sum()), int((kmax < pattern.n).sum())
        visited = torch.where(qmin < pattern.n, Tk, nk_any)
        full = torch.where(qmax < pattern.n, Tk, nk_all)
        return visited, full
    return None


def _plan_profiles(plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for g in plan.groups:
        visited = g.q_ptr.diff()
        rows = torch.repeat_interleave(torch.arange(g.num_q_tiles), visited)
        full = torch.zeros(g.num_q_tiles, dtype=torch.long).index_add_(0, rows, g.full.long())
        out.append((visited, full))
    return out


# == tile candidates =============================================================================
def _factorisations(volume: int, caps: Sequence[int]) -> list[tuple[int, ...]]:
    """Ordered factorisations of `volume` into len(caps) factors, factor k <= caps[k]."""
    if len(caps) == 1:
        return [(volume,)] if volume <= caps[0] else []
    out = []
    for f in range(1, min(volume, caps[0]) + 1):
        if volume % f == 0:
            out += [(f,) + rest for rest in _factorisations(volume // f, caps[1:])]
    return out


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def box_shapes(volume: int, shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Box tiles of exactly `volume` tokens on a grid, no extent beyond the next power of
    two of the grid's (a larger one only pads)."""
    return _factorisations(volume, [_pow2ceil(n) for n in shape])


def flat_as_box(volume: int, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The box that a flat tile of `volume` consecutive tokens is on this grid, if any
    (e.g. 128 on a grid whose last extent is 128 or 256 is the box (1, ..., 1, 128))."""
    rest, box = volume, [1] * len(shape)
    for k in reversed(range(len(shape))):
        if rest >= shape[k]:
            if rest % shape[k]:
                return None
            box[k], rest = shape[k], rest // shape[k]
        else:
            if shape[k] % rest:
                return None
            box[k], rest = rest, 1
            break
    return tuple(box) if rest == 1 else None


def _fmt_tile(t) -> str:
    return str(t) if isinstance(t, int) else "x".join(map(str, t))


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
    _profiles: Any = field(default=None, repr=False)
    _plan: Any = field(default=None, repr=False)
    _totals: Any = field(default=None, repr=False)

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
        return f"{_fmt_tile(self.q_tile)} / {_fmt_tile(self.kv_tile)}"


# == the report =====================================================================================
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
        s = (f"q_tile {_fmt_tile(self.q_tile)}, kv_tile {_fmt_tile(self.kv_tile)}: FLOP bound "
             f"{_fmt_x(self.flop_speedup)}, tile bound {_fmt_x(self.tile_speedup)}, "
             f"{'fully block-sparse' if self.fully_block_sparse else f'{self.partial} partial tile pairs'}")
        if self.predicted_time_s is not None:
            s += (f"; predicted {_fmt_time(self.predicted_time_s)} vs dense {_fmt_time(self.dense_time_s)} "
                  f"({_fmt_x(self.predicted_speedup)}) on {self.device.display_name}")
        if self.active_fraction is not None:
            s += f"; heads active {self.active_fraction:.1%} ({self.head_routing})"
            if self.all_heads_time_s is not None:
                s += (f", all heads {_fmt_time(self.all_heads_time_s)} "
                      f"({_fmt_x(self.routing_speedup)} from head routing)")
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
                tb = _fmt_x(c.tile_speedup) if c.tile_speedup is not None else "-"
                part = f"{c.partial / c.visited:.0%}" if c.visited else ("0%" if c.visited == 0 else "-")
                if c.predicted_time_s is not None:
                    pt = _fmt_time(c.predicted_time_s)
                elif c.lower_bound_s is not None:
                    pt = ">=" + _fmt_time(c.lower_bound_s)
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
                lines.append(f"  heads {_fmt_heads(g.heads)}: {g.pattern!r}: FLOP bound {_fmt_x(g.flop_speedup)}, "
                             f"tile bound {_fmt_x(g.tile_speedup)}, partial {g.partial}")
        lines.append(f"simulated in {self.elapsed_s:.3f} s")
        return "\n".join(lines)


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}x"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def _fmt_heads(heads: Sequence[int]) -> str:
    heads = list(heads)
    if len(heads) > 1 and heads == list(range(heads[0], heads[-1] + 1)):
        return f"{heads[0]}-{heads[-1]}"
    return ",".join(map(str, heads))


# == the simulator ===================================================================================
def _check_tile_arg(name: str, tile, spec: Spec):
    if tile is None:
        return None
    if isinstance(tile, list):
        tile = tuple(tile)
    shape = spec.q_shape if name == "q_tile" else spec.kv_shape
    TileGrid(shape, tile, name)  # validates
    if isinstance(tile, tuple) and len(shape) == 1:  # a box on a 1-D grid is a flat tile
        tile = tile[0]
    return tile


def _synthetic_indices(spec: Spec, batch: int) -> torch.Tensor:
    """A representative routing for a routed spec without run-time indices: each query block
    keeps its own block and topk-1 others drawn uniformly (causally valid when causal)."""
    r = spec.routed
    blk = r.block
    nqb, nkb = -(-spec.nq // blk), -(-spec.nkv // blk)
    g = torch.Generator().manual_seed(0)
    q_last = torch.clamp(torch.arange(nqb) * blk + blk - 1, max=spec.nq - 1) + (spec.nkv - spec.nq)
    own = (q_last // blk).clamp(0, nkb - 1)
    upper = (own + 1) if r.causal else torch.full_like(own, nkb)
    rnd = torch.rand(spec.num_heads, nqb, max(r.topk - 1, 0), generator=g)
    others = (rnd * upper[None, :, None]).long()
    idx = torch.cat([own.expand(spec.num_heads, nqb)[..., None], others], 2)
    # a duplicate of a block already chosen becomes an unused slot
    srt = idx.sort(2).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    idx = torch.where(dup, -1, srt)
    return idx


class _Search:
    """Evaluates tilings of one spec on one device model (or none)."""

    def __init__(self, spec: Spec, dev: DeviceModel | None, batch: int, indices: torch.Tensor | None):
        self.spec, self.dev, self.batch, self.indices = spec, dev, batch, indices
        self.patterns = list(dict.fromkeys(spec.head_patterns))
        self.mult = {p: sum(1 for q in spec.head_patterns if q == p) for p in self.patterns}
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

        def shapes(volume, grid_shape, other):
            """Tile shapes of this volume; when the other side is fixed, of the same kind."""
            if spec.ndim == 1:
                return [volume]
            if isinstance(other, int):
                return [volume]
            out: list = box_shapes(volume, grid_shape) if boxes_ok or isinstance(other, tuple) else []
            if isinstance(other, tuple):
                return out
            eq = flat_as_box(volume, grid_shape)
            if eq is not None and boxes_ok:
                return out if eq in out else out + [eq]
            if not boxes_ok or spec.nq <= FLAT_PLAN_LIMIT:
                out.append(volume)
            return out

        skipped_flat = boxes_ok and spec.nq > FLAT_PLAN_LIMIT and q_fixed is None and kv_fixed is None and any(
            flat_as_box(v, spec.q_shape) is None or flat_as_box(k, spec.kv_shape) is None for v, k in vols)
        for matching in (True, False):  # tile volumes paired as the device lists them; else any
            for qv, kv in vols:
                if matching and ((q_fixed is not None and _volume(q_fixed) != qv)
                                 or (kv_fixed is not None and _volume(kv_fixed) != kv)):
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
        qd = (c.q_tile,) if spec.ndim == 1 else (flat_as_box(c.q_tile, spec.q_shape) if isinstance(c.q_tile, int)
                                                 else c.q_tile)
        kd = (c.kv_tile,) if spec.ndim == 1 else (flat_as_box(c.kv_tile, spec.kv_shape)
                                                  if isinstance(c.kv_tile, int) else c.kv_tile)
        if qd is None or kd is None:
            return None
        V = F = M = 0
        for p in self.patterns:
            v = f = m = 1
            for (w, st, d, cz), L, tq, tk in zip(p.dims(spec.ndim), spec.q_shape, qd, kd):
                a, b, mx = _dim_sums(L, w, st, d, bool(cz), tq, tk)
                v, f, m = v * a, f * b, m * mx
            V += self.mult[p] * v
            F += self.mult[p] * f
            M = max(M, m)
        return V, F, M

    def needs_plan(self, c: Candidate) -> bool:
        if self.routed:
            return True
        qg, kg = self.grids(c)
        return any(_cheap(p, qg, kg) is False for p in self.patterns)

    def evaluate(self, c: Candidate) -> None:
        """Exact counts (and predicted time) of a candidate."""
        spec = self.spec
        qg, kg = self.grids(c)
        c.tile_pairs = qg.count * kg.count * spec.num_heads * (self.indices.shape[0] if self._batched else 1)
        if self.routed:
            plan = build_plan(spec, Tiling(c.q_tile, c.kv_tile), self.indices)
            profiles = _plan_profiles(plan)
            head_group = plan.head_group
            c._plan = plan
        else:
            profiles, index = [], {}
            for p in self.patterns:
                prof = closed_form_profile(p, spec, qg, kg)
                if prof is None:
                    sub = build_plan(Spec(p, spec.q_shape, spec.kv_shape, head_dim=spec.head_dim),
                                     Tiling(c.q_tile, c.kv_tile))
                    prof = _plan_profiles(sub)[0]
                index[p] = len(profiles)
                profiles.append(prof)
            head_group = torch.tensor([[index[p] for p in spec.head_patterns]])
        c._profiles = (profiles, head_group)
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
        profiles, head_group = c._profiles
        vis = torch.stack([v for v, _ in profiles])
        full = torch.stack([f for _, f in profiles])
        rows = head_group
        if rows.shape[0] == 1 and self.batch > 1:
            rows = rows.expand(self.batch, -1)
        g = rows.flatten()
        uf, uv = full[g].flatten(), vis[g].flatten()
        box = self.spec.ndim > 1 and not isinstance(c.q_tile, int)
        return Workload(_volume(c.q_tile), _volume(c.kv_tile), self.spec.head_dim, box, uf, uv - uf)

    def lower_bound(self, c: Candidate, totals) -> float:
        V, F, M = totals
        units = self.batch * self.spec.num_heads * _tile_count(self.spec.q_shape, c.q_tile)
        box = self.spec.ndim > 1 and not isinstance(c.q_tile, int)
        key = (_volume(c.q_tile), _volume(c.kv_tile), box)
        if key not in self._times:
            t_full, t_part, fixed = _tile_times(_hw(self.dev), self.dev.kernel, *key[:2], self.spec.head_dim, box)
            self._times[key] = (float(t_full), float(t_part), float(fixed))
        t_full, t_part, fixed = self._times[key]
        p = self.dev.kernel
        total = units * fixed + self.batch * (F * t_full + (V - F) * t_part)
        longest = fixed + M * min(t_full, t_part)
        return p["launch_overhead_us"] * 1e-6 + max(total / _slots(_hw(self.dev), p), longest)

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
        Tq, Tk = _tile_count(spec.q_shape, c.q_tile), _tile_count(spec.kv_shape, c.kv_tile)
        if isinstance(pattern, Full):
            return float(Tq * Tk)
        if isinstance(pattern, Window):
            qd = (c.q_tile,) if spec.ndim == 1 else (flat_as_box(c.q_tile, spec.q_shape)
                                                     if isinstance(c.q_tile, int) else c.q_tile)
            kd = (c.kv_tile,) if spec.ndim == 1 else (flat_as_box(c.kv_tile, spec.kv_shape)
                                                      if isinstance(c.kv_tile, int) else c.kv_tile)
            if qd is None or kd is None:
                return float(Tq * Tk)
            return float(math.prod(_dim_sums(L, w, st, d, bool(cz), a, b)[0] for (w, st, d, cz), L, a, b
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
                Tq, Tk = _tile_count(self.spec.q_shape, c.q_tile), _tile_count(self.spec.kv_shape, c.kv_tile)
                c.tile_pairs, c.visited, c.full = Tq * Tk * self.spec.num_heads, V, F
                c._totals = t
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
                c.lower_bound_s = self.lower_bound(c, c._totals)
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


def _tile_count(shape: Sequence[int], tile) -> int:
    if isinstance(tile, int):
        return -(-math.prod(shape) // tile)
    return math.prod(-(-n // t) for n, t in zip(shape, tile))


@lru_cache(maxsize=1 << 14)
def _dim_sums(L: int, w: int, s: int, d: int, causal: bool, tq: int, tk: int) -> tuple[int, int, int]:
    """(visited, full, max visited per q tile) of a window along one dimension."""
    v, f = counting.window_dim_tiles(L, w, s, d, causal, tq, tk)
    return int(v.sum()), int(f.sum()), int(v.max())


def _volume(tile) -> int:
    return tile if isinstance(tile, int) else math.prod(tile)


def _cheap(pattern: Pattern, qg: TileGrid, kg: TileGrid) -> bool:
    """Whether `closed_form_profile` handles the pattern on these grids (without computing it)."""
    if isinstance(pattern, Full) or depends_on_kv_only(pattern) or isinstance(pattern, Global):
        return True
    if isinstance(pattern, Window):
        return _box_dims(qg) is not None and _box_dims(kg) is not None
    if isinstance(pattern, Causal):
        return True
    if isinstance(pattern, Band):
        return qg.contiguous and kg.contiguous
    return flat_terms(pattern) is not None and qg.contiguous and kg.contiguous


def simulate(spec: Spec, q_tile=None, kv_tile=None, device=None, *, batch: int = 1,
             block_indices: torch.Tensor | None = None, max_plans: int = 4, active_heads=None) -> SimReport:
    """Simulate a block-sparse kernel for `spec`.

    q_tile, kv_tile: int (flat tile) or tuple (box); None searches the shapes the
        device's kernels run (with both None, the best pair; with one given, the other).
    device: None, a shipped name ('h100', 'h200', 'b200', 'a100'), a JSON path or a
        DeviceModel; with a device the report has a predicted time and speedup, and the
        search minimises the predicted time; without, it maximises the tile bound.
    batch: batch size (CTAs are (batch, head, q tile)); head_dim comes from the spec.
    block_indices: run-time indices of a Routed spec (as `build_plan` takes them); when
        omitted a representative random routing stands in.
    max_plans: how many candidates that need a full plan (compositions) are planned.
    active_heads: token-routed heads (Mixture-of-Head): None (every head computes every
        token), a float in (0, 1] (the expected fraction of active (token, head) pairs,
        uniform over tokens and heads) or an int tensor [B, Nq, K] of the heads each token
        uses (-1 = unused). The tiling is searched computing all heads; on it the visible
        pairs, tile counts and predicted time count only the selected pairs and compacted
        q tiles (see patterngen/head_routing_model.py); `all_heads_time_s` keeps the time
        of computing every head. A fraction of 1 gives the default figures.
    """
    t0 = time.perf_counter()
    if not isinstance(spec, Spec):
        raise TypeError(f"simulate: spec must be a patterngen.Spec, got {type(spec).__name__}")
    if spec.nq == 0 or spec.nkv == 0 or spec.num_heads == 0:
        raise ValueError(f"simulate: {spec!r} has no (query, key) pair (q_shape={spec.q_shape}, "
                         f"kv_shape={spec.kv_shape}, num_heads={spec.num_heads}), so there is no speedup to "
                         f"estimate; give it at least one query, key and head")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"simulate: batch must be an int >= 1, got {batch!r}")
    if isinstance(max_plans, bool) or not isinstance(max_plans, int) or max_plans < 1:
        raise ValueError(f"simulate: max_plans must be an int >= 1, got {max_plans!r}")
    q_tile, kv_tile = _check_tile_arg("q_tile", q_tile, spec), _check_tile_arg("kv_tile", kv_tile, spec)
    if spec.ndim > 1 and q_tile is not None and kv_tile is not None \
            and isinstance(q_tile, int) != isinstance(kv_tile, int):
        raise ValueError(f"q_tile and kv_tile must both be flat (int) or both boxes (tuples) on an n-D grid, "
                         f"got {q_tile!r} and {kv_tile!r}")
    dev = load_device(device) if device is not None else None
    routing = None
    indices = block_indices
    if spec.routed is not None:
        if indices is None:
            indices, routing = _synthetic_indices(spec, batch), "synthetic"
        else:
            routing = "given"
            if not isinstance(indices, torch.Tensor):
                raise TypeError(f"block_indices: expected a torch.Tensor, got {type(indices).__name__}")
            if indices.dim() == 4:
                if batch not in (1, indices.shape[0]):
                    raise ValueError(f"simulate: batch={batch} but block_indices has batch {indices.shape[0]}")
                batch = indices.shape[0]
    elif block_indices is not None:
        raise ValueError("block_indices: given, but the spec has no Routed pattern")
    batch_fixed = batch != 1 or (indices is not None and indices.dim() == 4)
    head_kind, head_value, batch = head_routing_model.check_active_heads(active_heads, spec, batch, batch_fixed)
    if head_kind == "fraction" and head_value == 1.0:
        head_kind = None  # every pair active: the plain kernel, no routing

    visible = counting.visible_pairs(spec, indices)  # [H] or [B, H]
    search = _Search(spec, dev, batch, indices)
    notes: list[str] = []
    if q_tile is not None and kv_tile is not None:
        cands = [Candidate(q_tile, kv_tile)]
        search.evaluate(cands[0])
        searched = False
    else:
        cands, notes = search.candidates(q_tile, kv_tile)
        cands = search.run(cands, max_plans)
        searched = True
    best = cands[0]
    if best.status != "exact":  # pragma: no cover - the best is always evaluated
        search.evaluate(best)
    if best._profiles is None:
        search.evaluate(best)

    # per-head figures
    profiles, head_group = best._profiles
    qg, kg = search.grids(best)
    per_group = [(int(v.sum()), int(f.sum())) for v, f in profiles]
    vis_rows = visible if visible.dim() == 2 else visible[None]
    B = head_group.shape[0]
    heads = []
    for h, p in enumerate(spec.head_patterns):
        v = sum(per_group[int(head_group[b, h])][0] for b in range(B))
        f = sum(per_group[int(head_group[b, h])][1] for b in range(B))
        vp = int(vis_rows[:, h].sum())
        heads.append(HeadFigures((h,), p, vis_rows.shape[0] * spec.nq * spec.nkv, vp, B * qg.count * kg.count, v, f))
    groups = []
    for p in dict.fromkeys(spec.head_patterns):
        members = [hf for hf in heads if hf.pattern == p]
        groups.append(HeadFigures(tuple(h for hf in members for h in hf.heads), p,
                                  sum(hf.dense_pairs for hf in members), sum(hf.visible_pairs for hf in members),
                                  sum(hf.tile_pairs for hf in members), sum(hf.visited for hf in members),
                                  sum(hf.full for hf in members)))
    pred = dense = None
    if dev is not None:
        pred = best.predicted_time_s
        dense = dense_time(dev, spec.nq, spec.nkv, spec.num_heads, spec.head_dim, batch)
    if routing == "synthetic":
        notes.append("no block indices: a representative random routing (seed 0) was simulated")
    visible_total, visited_total, full_total = int(visible.sum()), best.visited, best.full
    dense_pairs, tile_pairs = vis_rows.shape[0] * spec.num_heads * spec.nq * spec.nkv, best.tile_pairs
    extra: dict = {}
    if active_heads is not None:
        extra["active_fraction"] = 1.0 if head_kind is None else None
        extra["head_routing"] = "fraction" if head_kind is None else head_kind
        if dev is not None:
            extra["all_heads_time_s"] = pred
    if head_kind is not None:
        # figures cover the same batch rows as the default ones (one unless routed per batch), but a
        # measured routing differs per batch, so its figures cover every batch
        rows = batch if head_kind == "measured" else vis_rows.shape[0]
        rh, heads, groups = _route_heads(spec, best, indices, head_kind, head_value, batch, visible, heads,
                                         rows // vis_rows.shape[0])
        # a fraction scales the exact count (rounded once, not per head); a measured routing is exact
        visible_total = round(head_value * int(visible.sum())) if head_kind == "fraction" \
            else sum(hf.visible_pairs for hf in heads)
        visited_total, full_total = sum(hf.visited for hf in heads), sum(hf.full for hf in heads)
        dense_pairs, tile_pairs = sum(hf.dense_pairs for hf in heads), sum(hf.tile_pairs for hf in heads)
        extra["active_fraction"] = rh.fraction
        extra["ctas"] = rh.ctas
        if dev is not None:
            box = spec.ndim > 1 and not isinstance(best.q_tile, int)
            wl = Workload(_volume(best.q_tile), _volume(best.kv_tile), spec.head_dim, box, rh.unit_full,
                          rh.unit_partial)
            # one more launch: the compaction (prefix-sum) kernel
            pred = float(predict_time(dev, wl)) + dev.kernel["launch_overhead_us"] * 1e-6
    return SimReport(
        spec=spec, q_tile=best.q_tile, kv_tile=best.kv_tile, batch=batch,
        dense_pairs=dense_pairs, visible_pairs=visible_total, tile_pairs=tile_pairs, visited=visited_total,
        full=full_total, heads=tuple(heads),
        groups=tuple(groups), device=dev, predicted_time_s=pred, dense_time_s=dense,
        candidates=tuple(cands), searched=searched, routing=routing, notes=tuple(notes),
        elapsed_s=time.perf_counter() - t0, block_indices=indices, _plan=best._plan, **extra)


def _route_heads(spec: Spec, best: Candidate, indices, kind: str, value, batch: int, visible: torch.Tensor,
                 heads: list, scale: int):
    """The head-routing model on the chosen tiling, and its per-head and per-group figures (over
    the first `scale` x (the default figures' batch rows) batches; dense and tile pairs scaled)."""
    if best._plan is None:
        best._plan = build_plan(spec, Tiling(best.q_tile, best.kv_tile), indices)
    rh = head_routing_model.model(best._plan, kind, value, batch, visible, indices)
    R = (visible.shape[0] if visible.dim() == 2 else 1) * scale
    new_heads = []
    for hf in heads:
        h = hf.heads[0]
        vp = round(float(rh.visible[:R, h].sum()))
        new_heads.append(HeadFigures(hf.heads, hf.pattern, hf.dense_pairs * scale, vp, hf.tile_pairs * scale,
                                     int(rh.visited[:R, h].sum()), int(rh.full[:R, h].sum())))
    groups = []
    for p in dict.fromkeys(spec.head_patterns):
        members = [hf for hf in new_heads if hf.pattern == p]
        groups.append(HeadFigures(tuple(h for hf in members for h in hf.heads), p,
                                  sum(hf.dense_pairs for hf in members), sum(hf.visible_pairs for hf in members),
                                  sum(hf.tile_pairs for hf in members), sum(hf.visited for hf in members),
                                  sum(hf.full for hf in members)))
    return rh, new_heads, groups


def workload(spec: Spec, q_tile, kv_tile, batch: int = 1, block_indices: torch.Tensor | None = None) -> Workload:
    """The time model's input for one tiling (what calibration fits against measured times)."""
    q_tile, kv_tile = _check_tile_arg("q_tile", q_tile, spec), _check_tile_arg("kv_tile", kv_tile, spec)
    if q_tile is None or kv_tile is None:
        raise ValueError("workload: q_tile and kv_tile are required")
    indices = block_indices
    if spec.routed is not None and indices is None:
        indices = _synthetic_indices(spec, batch)
    s = _Search(spec, None, batch, indices)
    c = Candidate(q_tile, kv_tile)
    s.evaluate(c)
    return s.workload(c)


# == command line ======================================================================================
def _parse_tile(text: str):
    try:
        parts = [int(x) for x in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise ValueError(f"--tile: {text!r} is not a tile; write an int (flat, e.g. 128) or a box such as 16x8") \
            from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def add_cli_arguments(parser) -> None:
    """Arguments of `patterngen simulate`."""
    parser.add_argument("spec", metavar="SPEC", help="Python file defining `spec` (or several specs)")
    parser.add_argument("--device", default=None,
                        help=f"device model: {', '.join(available_devices())} or a JSON file (default: none, "
                             f"tile bounds only)")
    parser.add_argument("--tile", nargs=2, metavar=("Q", "KV"), default=None,
                        help="fix the tiles, e.g. --tile 128 128 or --tile 16x8 16x8 (default: search)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--explain", action="store_true", help="show the ranking of the candidate tilings")
    parser.add_argument("--active-heads", type=float, default=None, metavar="F",
                        help="token-routed heads (Mixture-of-Head): the expected fraction in (0, 1] of "
                             "(token, head) pairs that are computed (default: every head)")
    parser.add_argument("--plot", metavar="OUT.png", default=None,
                        help="draw the tile map and the bound against tile shapes (needs matplotlib)")


def format_table(rows: Sequence[tuple[str, SimReport]]) -> str:
    """One row per spec, and one per head group for specs whose heads differ."""
    head = ["spec", "heads", "q tile", "kv tile", "FLOP bound", "tile bound", "block-sparse", "visited",
            "partial", "predicted", "speedup"]
    routed_heads = any(r.active_fraction is not None for _, r in rows)
    if routed_heads:  # head routing: the fraction of (token, head) pairs computed, and the gain over all heads
        head += ["heads on", "vs all heads"]
    table = [head]
    for name, r in rows:
        table.append([name, str(r.spec.num_heads), _fmt_tile(r.q_tile), _fmt_tile(r.kv_tile),
                      _fmt_x(r.flop_speedup), _fmt_x(r.tile_speedup), "yes" if r.fully_block_sparse else "no",
                      str(r.visited), str(r.partial), _fmt_time(r.predicted_time_s), _fmt_x(r.predicted_speedup)]
                     + ([f"{r.active_fraction:.0%}" if r.active_fraction is not None else "all",
                         _fmt_x(r.routing_speedup)] if routed_heads else []))
        if len(r.groups) > 1:
            for g in r.groups:
                table.append([f"  heads {_fmt_heads(g.heads)}", str(len(g.heads)), "", "", _fmt_x(g.flop_speedup),
                              _fmt_x(g.tile_speedup), "yes" if g.fully_block_sparse else "no", str(g.visited),
                              str(g.partial), "", ""] + (["", ""] if routed_heads else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out = []
    for j, row in enumerate(table):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def cli_main(args) -> int:
    """Run `patterngen simulate` with parsed arguments; returns the exit status."""
    from .cli import load_specs  # the CLI module imports us; import lazily to keep the layering one way
    q_tile = kv_tile = None
    try:
        if args.tile is not None:
            q_tile, kv_tile = (_parse_tile(t) for t in args.tile)
        specs = load_specs(args.spec)
        rows = []
        for name, spec in specs:
            rows.append((name, simulate(spec, q_tile, kv_tile, device=args.device, batch=args.batch,
                                        active_heads=getattr(args, "active_heads", None))))
    except (ValueError, TypeError) as e:
        print(f"patterngen simulate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.explain:
        for name, r in rows:
            print(f"\n== {name}")
            print(r.explain())
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError as e:
            print(f"patterngen simulate: error: --plot needs matplotlib ({e}); install it with "
                  f"`pip install matplotlib` or `pip install patterngen[plot]`", file=sys.stderr)
            return 3
        print(f"wrote {args.plot}")
    return 0


# == pictures =============================================================================================
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
        ax_map.set_title(f"{name}: tiles {_fmt_tile(r.q_tile)} / {_fmt_tile(r.kv_tile)} "
                         f"(green full, orange partial)", fontsize=9)
        ax_map.set_xlabel("kv tile")
        ax_map.set_ylabel("q tile")
        cands = [c for c in r.candidates if c.tile_speedup is not None][:24] or \
            [Candidate(r.q_tile, r.kv_tile, "exact", r.tile_pairs, r.visited, r.full)]
        labels = [c.label for c in cands]
        x = range(len(cands))
        ax_bar.bar(x, [c.tile_speedup for c in cands],
                   color=["#2b8a3e" if c.fully_block_sparse else "#e8590c" for c in cands])
        ax_bar.axhline(r.flop_speedup, color="k", ls="--", lw=1, label=f"FLOP bound {_fmt_x(r.flop_speedup)}")
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


__all__ = ["simulate", "SimReport", "HeadFigures", "Candidate", "DeviceModel", "Workload", "load_device",
           "available_devices", "predict_time", "dense_time", "dense_params", "dense_workload", "wave_time",
           "workload", "box_shapes", "flat_as_box", "closed_form_profile", "add_cli_arguments", "cli_main",
           "format_table", "plot", "tile_map"]
