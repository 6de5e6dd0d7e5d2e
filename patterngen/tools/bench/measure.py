"""One benchmark case measured end to end: inputs, the simulator's tiling and bound, the three
runners, and the errors between their outputs, gathered in a `CaseResult`.

Failures are recorded in the result, never raised, so that one case that does not run leaves
the rest of a long GPU run intact.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from ...backends.inputs import head_selection
from ...ir import Spec
from ...routing.blocks import route
from ...sim import simulate
from .runners import Options, run_flex, run_patterngen, run_sdpa, short_error, tile_json
from .suite import Case, moh_routing


@dataclass
class CaseResult:
    """What was measured for one case; the derived figures are properties."""

    case: Case
    status: str = "ok"
    pg: dict | None = None
    flex: dict | None = None
    sdpa: dict = field(default_factory=dict)
    sim: dict | None = None
    err_vs_flex: float | None = None
    err_vs_sdpa_mask: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pg_ms(self):
        return self.pg["ms"] if self.pg else None

    @property
    def flex_ms(self):
        return self.flex["ms"] if self.flex else None

    @property
    def sdpa_ms(self):
        return self.sdpa.get("dense", {}).get("ms")

    @property
    def speedup_vs_flex(self):
        return self.flex_ms / self.pg_ms if self.pg_ms and self.flex_ms else None

    @property
    def speedup_vs_sdpa(self):
        return self.sdpa_ms / self.pg_ms if self.pg_ms and self.sdpa_ms else None

    @property
    def speedup_vs_sdpa_causal(self):
        c = self.sdpa.get("causal", {}).get("ms")
        return c / self.pg_ms if self.pg_ms and c else None

    @property
    def bound(self):
        return self.sim["tile_speedup"] if self.sim else None

    @property
    def bound_realised(self):
        s, b = self.speedup_vs_sdpa, self.bound
        return s / b if s and b and math.isfinite(b) else None

    def to_dict(self) -> dict:
        c = self.case
        return {"case": c.name, "title": c.title, "spec": repr(c.spec), "causal": c.causal, "status": self.status,
                "patterngen": self.pg, "flex": self.flex, "sdpa": self.sdpa, "simulator": self.sim,
                "patterngen_ms": self.pg_ms, "flex_ms": self.flex_ms, "sdpa_ms": self.sdpa_ms,
                "speedup_vs_flex": self.speedup_vs_flex, "speedup_vs_sdpa": self.speedup_vs_sdpa,
                "speedup_vs_sdpa_causal": self.speedup_vs_sdpa_causal, "bound": self.bound,
                "bound_realised": self.bound_realised, "err_vs_flex": self.err_vs_flex,
                "err_vs_sdpa_mask": self.err_vs_sdpa_mask, "notes": self.notes}


# -- the simulator's view ---------------------------------------------------------------------
def device_model_name(device_name: str) -> str | None:
    """The shipped simulator model for a GPU name ('NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    low = device_name.lower()
    for key in ("h200", "h100", "b200", "a100"):
        if key in low:
            return key
    return None


def simulate_case(spec: Spec, q_tile=None, kv_tile=None, device_model: str | None = None,
                  block_indices: torch.Tensor | None = None, head_indices: torch.Tensor | None = None):
    """(the simulator's report, None), or (None, why) when it refuses the spec."""
    kwargs = {}
    if block_indices is not None:
        kwargs["block_indices"] = block_indices.cpu()
    if head_indices is not None:
        kwargs["active_heads"] = head_indices.cpu()
    try:
        return simulate(spec, q_tile, kv_tile, device=device_model, **kwargs), None
    except (ValueError, NotImplementedError) as e:
        return None, f"simulator: {e}"


def _sim_summary(report) -> dict:
    out = {"q_tile": tile_json(report.q_tile), "kv_tile": tile_json(report.kv_tile),
           "tile_speedup": float(report.tile_speedup), "flop_speedup": float(report.flop_speedup)}
    for name in ("fully_block_sparse", "predicted_speedup", "predicted_time_s", "dense_time_s", "active_fraction",
                 "all_heads_time_s", "routing_speedup"):
        v = getattr(report, name, None)
        if v is not None:
            out[name] = v if isinstance(v, bool) else float(v)
    return out


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs().max()
    return float(d) if torch.isfinite(d) else math.inf


# -- one case ---------------------------------------------------------------------------------
def run_case(case: Case, opts: Options, device_model: str | None = None) -> CaseResult:
    """Everything measured for one case (failures are recorded, not raised)."""
    res = CaseResult(case)
    spec = case.spec
    g = torch.Generator(device="cpu").manual_seed(opts.seed)
    B, D = 1, spec.head_dim

    def rand(h, n):
        return torch.randn(B, h, n, D, generator=g).to(device=opts.device, dtype=opts.dtype)

    q, k, v = rand(spec.num_heads, spec.nq), rand(spec.num_kv_heads, spec.nkv), rand(spec.num_kv_heads, spec.nkv)
    block_indices = head_indices = head_chosen = None
    if spec.routed is not None:
        r = spec.routed
        block_indices = route(q, k, r.block, r.topk, causal=r.causal)
    if case.active_heads is not None:
        head_indices = moh_routing(spec, case.active_heads, g).to(opts.device)
        head_chosen = head_selection(head_indices, spec.num_heads)

    # the simulator: its tiling and its bound
    t0 = time.perf_counter()
    fixed = (spec.routed.block,) * 2 if spec.routed is not None else (None, None)  # routed: tiles = blocks
    report, why = simulate_case(spec, *fixed, device_model=device_model, block_indices=block_indices,
                                head_indices=head_indices)
    sim_s = time.perf_counter() - t0
    ranked = []
    if report is not None:
        ranked = report.kernel_tilings()
        res.sim = {**_sim_summary(report), "device_model": device_model, "elapsed_s": sim_s}
    else:
        res.notes.append(why)

    # patterngen
    pg_out = None
    try:
        res.pg, pg_out = run_patterngen(spec, q, k, v, opts, ranked, block_indices, head_indices)
    except NotImplementedError as e:
        res.status = ("skipped: Routed not in the Triton backend yet" if spec.routed is not None
                      else f"skipped: {short_error(e)}")
    except Exception as e:  # noqa: BLE001
        res.status = f"patterngen failed: {short_error(e)}"
        if opts.verbose:
            traceback.print_exc()
    if res.pg is not None and report is not None:
        ran = (res.pg["q_tile"], res.pg["kv_tile"])
        if ran != (tile_json(report.q_tile), tile_json(report.kv_tile)):  # bound at the tiles that ran
            other, why = simulate_case(spec, ran[0], ran[1], device_model, block_indices,
                                       head_indices)
            if other is not None:
                res.sim = {**_sim_summary(other), "device_model": device_model,
                           "simulator_pick": [tile_json(report.q_tile), tile_json(report.kv_tile)]}
                res.notes.append("the simulator's tiling did not run; bound given at the tiling that ran")

    if not res.status.startswith("skipped"):
        # FlexAttention
        flex_out = None
        try:
            res.flex, flex_out = run_flex(spec, q, k, v, opts, block_indices, head_chosen)
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"flex failed: {short_error(e)}")
            if opts.verbose:
                traceback.print_exc()
        if pg_out is not None and flex_out is not None:
            res.err_vs_flex = _max_err(pg_out, flex_out)
        del flex_out
        # SDPA
        res.sdpa, masked = run_sdpa(case, q, k, v, opts, block_indices, head_chosen)
        if pg_out is not None and masked is not None:
            res.err_vs_sdpa_mask = _max_err(pg_out, masked)
    del q, k, v, pg_out
    if opts.device.type == "cuda":
        torch.cuda.empty_cache()
    return res
