"""The simulator: how much faster than dense attention a pattern can be, before any kernel runs.

`simulate(spec, q_tile=None, kv_tile=None, device=None)` returns a `SimReport` with the
FLOP bound (exact visible pairs), the tile bound (visited and partial tile pairs) and,
with a device model, a predicted time and speedup; without tiles it searches for the
best ones. Modules, in the order the simulator uses them:

    device       device models (data in devices/*.json) and their loader
    tile_costs   measured instructions of a full and a partial tile step (tile_costs.json)
    time_model   predicted seconds of a workload of CTAs, and of dense attention
    tile_shapes  flat and box tiles on a grid
    atoms        patterns as signed sums of atom conjunctions (inclusion-exclusion)
    counting     exact visible (q, kv) pairs: the FLOP bound
    profiles     visited and full kv tiles per q tile, in closed form or from a plan
    search       candidate tilings, their evaluation, branch and bound
    heads_model  token-routed heads (Mixture-of-Head) on a chosen tiling
    report       SimReport, per-head figures, the printed table
    runtime      the work of Clustered() and box-routed compositions on given ids
    sharding     a spec sequence-sharded over GPUs: link models (data in links/*.json), per-rank
                 compute, bytes and transfers, the layout chosen (simulate(world_size=...))
    simulator    simulate() and workload(), which tie the above together
    advisor      strides that make a window fully block-sparse
    plot         tile maps and bound-versus-tile pictures (matplotlib)
    command      `patterngen simulate` (arguments and output; the CLI passes in its spec loader)
"""
from .advisor import StrideAdvice, advise_strides
from .counting import visible_pairs
from .device import DeviceModel, available_devices, load_device
from .plot import plot, tile_map
from .profiles import closed_form_profile, plan_profiles
from .report import HeadFigures, SimReport, format_table
from .search import Candidate
from .runtime import Launch, RuntimeReport, simulate_runtime
from .sharding import LinkModel, ShardingReport, available_links, load_link, simulate_sharding
from .simulator import ranked_kernel_tilings, simulate, workload
from .tile_shapes import box_shapes, flat_as_box
from .time_model import Workload, dense_params, dense_time, dense_workload, predict_time, wave_time

__all__ = ["simulate", "ranked_kernel_tilings", "SimReport", "HeadFigures", "Candidate", "DeviceModel", "Workload", "load_device",
           "available_devices", "predict_time", "dense_time", "dense_params", "dense_workload", "wave_time",
           "workload", "box_shapes", "flat_as_box", "closed_form_profile", "plan_profiles", "visible_pairs",
           "advise_strides", "StrideAdvice", "format_table", "plot", "tile_map", "LinkModel", "ShardingReport",
           "available_links", "load_link", "simulate_sharding", "Launch", "RuntimeReport", "simulate_runtime"]
