"""`patterngen audit`: the kernels a spec runs, compiled here for sm_90 and sm_80 and read from
their SASS (backends/triton/sass.py), so that a kernel's quality is checked without a GPU:
warpgroup MMA on sm_90, a pipelined kv loop, no spills, the instructions of one full and of one
partial kv-tile step.

The kernels are the op's: the forward on the tiling policy's tiling (a length-free spec's decode
and prefill variants) and the backward (dK/dV, dQ) on its backward tiling. Beside each, a
reference FlashAttention-2 kernel (tools/fa2_reference.py) compiled at the same tiles, warps,
stages, head dim and arch: its full-tile step is the yardstick of `gate_failures`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date
from functools import lru_cache

import torch

from .. import dispatch
from ..analysis.tiling import volume
from ..core.tiles import Tiling
from ..ir import Causal, Spec
from ..sim.report import align_columns

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STEP_TOLERANCE = 1.05
"""The gate: a full-tile step may take at most 5% more instructions per tile area than the reference's."""
MATMUL = {90: "wgmma", 80: "mma.sync"}
"""The matrix instructions every matmul of a main kernel must use, per arch."""

_COMPILED: dict[tuple, list] = {}  # what determines the cubins -> their KernelReports, once per process


def _reports(kernel, arch: int, dtype: torch.dtype, mods: dict) -> list:
    """The SASS reports of a TritonForward's or TritonBackward's kernels for sm_<arch>, compiled
    once per process for each (source, launch constants, launch config, arch, dtype); `mods`: a
    forward's constants set per call (PACK)."""
    from ..backends.triton import TritonForward
    from ..backends.triton.sass import read
    fwd = kernel if isinstance(kernel, TritonForward) else kernel.fwd
    key = (kernel.source, tuple(sorted({**fwd.constexprs(dtype), **mods}.items())),
           launch_config(kernel, arch, dtype, mods), fwd.spec.head_dim, arch, dtype)
    if key not in _COMPILED:
        compiled = kernel.cross_compile(arch, dtype, mods=mods) if mods else kernel.cross_compile(arch, dtype)
        _COMPILED[key] = [read(c) for c in (compiled if isinstance(compiled, list) else [compiled])]
    return _COMPILED[key]


def launch_config(kernel, arch: int, dtype: torch.dtype, mods: dict | None = None):
    """The warps and stages `kernel` compiles with for sm_<arch> (a forward's depend on the arch
    and on its GQA packing, `mods`' PACK)."""
    if not hasattr(kernel, "config_for"):
        return kernel.config
    return kernel.config_for(arch, dtype.itemsize, (mods or {}).get("PACK", 1))


def _kernels(spec: Spec):
    """(role, TritonForward or TritonBackward, per-call constants) of every kernel the op runs
    for `spec`: a length-free spec's decode forward also GQA-packed where it packs (`gqa_pack`),
    its prefill backward also over pieces in one launch where it takes them (`takes_pieces`)."""
    from ..backends.triton import TritonBackward, TritonForward, backward_tiling
    for var in (("decode", "prefill") if spec.length_free else ("",)):
        tiling = dispatch.policy_tiling(spec, var)
        forward = TritonForward(spec, tiling)
        yield f"forward{' ' + var if var else ''}", forward, {}
        pack = forward.gqa_pack(forward.block_m) if var == "decode" else 1
        if pack > 1:
            yield "forward decode packed", forward, {"PACK": pack}
        backward = TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim, spec)))
        yield f"backward{' ' + var if var else ''}", backward, {}
        if var == "prefill" and backward.takes_pieces:
            yield "backward prefill varlen", backward, {"VARLEN": True}


def kernel_tiling(kernel, name: str, mods: dict | None = None) -> Tiling:
    """The tiles kernel `name` runs: the backward's dK/dV and dQ kernels each have their own
    (dQ the transpose of dK/dV's), a forward its own (a GQA-packed one's q rows PACK heads' worth)."""
    if name.endswith("_dq"):
        return kernel.dq.tiling
    tiling = getattr(kernel, "dkdv", kernel).tiling
    pack = (mods or {}).get("PACK", 1)
    return tiling if pack == 1 else Tiling(volume(tiling.q_tile) * pack, tiling.kv_tile)


def reference_kernel(name: str) -> str:
    """The reference kernel that does the work of kernel `name`: dK/dV, dQ or the forward."""
    return next((ref for part, ref in (("dkdv", "fa2_bwd_dkdv"), ("dq", "fa2_bwd_dq")) if part in name), "fa2_fwd")


@lru_cache(maxsize=None)
def reference_report(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                     num_warps: int, num_stages: int):
    """The SASS report of a causal reference kernel (a full-tile loop and a masked diagonal one,
    so both steps are measured), compiled once per process."""
    from ..backends.triton.sass import read
    from . import fa2_reference  # imports triton: not before the command line has set TRITON_INTERPRET
    return read(fa2_reference.cross_compile(kernel, arch, dtype, head_dim, block_m, block_n, num_warps, num_stages))


def _row(role: str, tiling, report) -> dict:
    return {"role": role, "tiling": repr(tiling), **asdict(report), "matmul": report.matmul,
            "serialized": report.serialized, "pipelined": report.pipelined, "fits": report.fits}


def reference_tiling(tiling: Tiling) -> Tiling:
    """The reference's flat tiles for a kernel's tiling: the same volumes, at least 16 (tl.dot's least)."""
    return Tiling(*(max(16, volume(t)) for t in (tiling.q_tile, tiling.kv_tile)))


def _compared(row: dict, report, tiling: Tiling, reference, ref_tiling: Tiling) -> tuple[dict, dict]:
    """A kernel's row with the reference's steps and the per-tile-area ratio of the full steps
    (None where either has no step loop), and the reference's own row."""
    area = volume(tiling.q_tile) * volume(tiling.kv_tile)
    ref_area = ref_tiling.q_tile * ref_tiling.kv_tile
    ratio = (round(report.full_tile / area / (reference.full_tile / ref_area), 3)
             if report.full_tile and reference.full_tile else None)
    return ({**row, "ref_full_tile": reference.full_tile, "ref_partial_tile": reference.partial_tile,
             "full_ratio": ratio},
            {**_row("FA2 reference", ref_tiling, reference), "spec": row["spec"], "reference": True})


def audit(spec: Spec, archs=(90, 80), dtype: torch.dtype = torch.bfloat16, name: str | None = None,
          roles: tuple[str, ...] | None = None) -> list[dict]:
    """One row per compiled kernel and arch (role, tiling, the SASS report's figures, `spec`:
    `name` or the spec's repr), each followed by its reference's row (`reference` True), the
    reference compiled at the kernel's `reference_tiling`, head block, warps, stages and arch. A
    kernel's row holds the reference's step counts and `full_ratio`: its full-tile step over the
    reference's, per tile area (q rows x kv rows). `roles` (e.g. "forward decode packed"): only
    those kernels."""
    from ..backends.triton.config import head_block
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype: expected one of torch.bfloat16, torch.float16, torch.float32, got {dtype}")
    label = repr(spec) if name is None else name
    rows = []
    for role, kernel, mods in _kernels(spec):
        if roles is not None and role not in roles:
            continue
        for arch in archs:
            config = launch_config(kernel, arch, dtype, mods)
            for report in _reports(kernel, arch, dtype, mods):
                tiling = kernel_tiling(kernel, report.name, mods)
                ref_tiling = reference_tiling(tiling)
                reference = reference_report(reference_kernel(report.name), arch, dtype, head_block(spec.head_dim),
                                             ref_tiling.q_tile, ref_tiling.kv_tile, config.num_warps,
                                             config.num_stages)
                row = {**_row(role, tiling, report), "spec": label, "reference": False}
                rows += _compared(row, report, tiling, reference, ref_tiling)
    return rows


def gate_failures(rows: list[dict], steps: bool = True) -> list[str]:
    """What keeps each audited kernel (not the reference rows) from the CI gate, one sentence per
    failure: on sm_90 warpgroup MMA for every matmul, issued asynchronously (not serialised), on
    sm_80 `mma.sync`; every kv-tile step loop pipelined,
    no spills, shared memory that fits a block, and (with `steps`) a full-tile step within 5% of
    the reference's instructions per tile area."""
    out = []
    for r in rows:
        if r["reference"]:
            continue
        where = f"{r['spec']}: {r['name']} ({r['role']}, {r['tiling']}) on sm_{r['arch']}"
        want = MATMUL.get(r["arch"])
        if want is not None and r["matmul"] != want:
            out.append(f"{where}: matmuls on {r['matmul']} ({r['warpgroup_mma']} HGMMA, {r['mma_sync']} HMMA), "
                       f"expected {want} only")
        if r["serialized"]:
            out.append(f"{where}: warpgroup MMAs serialised ({r['wgmma_waits']} waits for {r['warpgroup_mma']} "
                       f"HGMMA: ptxas C7515)")
        if not r["pipelined"]:
            out.append(f"{where}: kv walk not pipelined ({r['unpipelined_steps']} of {r['step_loops']} step loops "
                       f"without an asynchronous copy)")
        if r["spill_ops"] or r["stack"]:
            out.append(f"{where}: spills ({r['spill_ops']} local-memory instructions, {r['stack']} B of stack)")
        if not r["fits"]:
            out.append(f"{where}: {r['shared']} B of shared memory exceeds a block's limit")
        if not steps:
            continue
        if r["full_ratio"] is None:
            out.append(f"{where}: no kv-tile loop with matrix instructions found (or none in the reference)")
        elif r["full_ratio"] > STEP_TOLERANCE:
            out.append(f"{where}: full-tile step of {r['full_tile']} instructions is {r['full_ratio']:.2f}x the "
                       f"reference's {r['ref_full_tile']} per tile area (at most {STEP_TOLERANCE:.2f}x)")
    return out


COLUMNS = (("role", "role"), ("name", "kernel"), ("arch", "sm"), ("tiling", "tiling"), ("registers", "regs"),
           ("stack", "stack"), ("shared", "smem B"), ("fits", "fits"), ("matmul", "matmul"), ("warpgroup_mma", "HGMMA"),
           ("mma_sync", "HMMA"), ("serialized", "serialised"), ("pipelined", "pipelined"), ("spill_ops", "spill ops"),
           ("full_tile", "full step"), ("partial_tile", "partial step"), ("ref_full_tile", "ref full"),
           ("ref_partial_tile", "ref partial"), ("full_ratio", "full/ref"), ("instructions", "instr"))


def format_audit(rows: list[dict]) -> str:
    """The audit as an aligned table; a reference row leaves the comparison columns empty."""
    return align_columns([[h for _, h in COLUMNS]] + [[str(r.get(k, "")) for k, _ in COLUMNS] for r in rows])


CALIBRATION_TILES = ((128, 128), (128, 64), (64, 128), (64, 64), (128, 32))
"""The flat tiles of the shipped device models (their tile_volumes), measured for the time model."""


def calibration_spec(head_dim: int) -> Spec:
    """Causal attention: its forward walks full tiles and masked diagonal tiles in two loops."""
    return Spec(Causal(), 8192, head_dim=head_dim)


def tile_cost_entry(arch: int, head_dim: int, q_tile: int, kv_tile: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One entry of the simulator's tile_costs.json: the forward's full and partial step of
    `calibration_spec(head_dim)` at q_tile x kv_tile, compiled for sm_<arch>."""
    from ..backends.triton import TritonForward
    fwd = TritonForward(calibration_spec(head_dim), Tiling(q_tile, kv_tile))
    (report,) = _reports(fwd, arch, dtype, {})
    if not report.full_tile:
        raise RuntimeError(f"sm_{arch} forward of {fwd.spec!r}: no kv-tile loop found in its SASS to calibrate from")
    return {"arch": arch, "dtype": next(k for k, v in DTYPES.items() if v == dtype), "head_dim": head_dim,
            "q_tile": q_tile, "kv_tile": kv_tile, "num_warps": launch_config(fwd, arch, dtype).num_warps,
            "num_stages": launch_config(fwd, arch, dtype).num_stages, "full_tile": report.full_tile, "partial_tile": report.partial_tile}


def calibrate(archs=(90, 80), head_dims=(64, 128), tiles=CALIBRATION_TILES) -> dict:
    """Measure the tile costs and write them to the simulator's tile_costs.json (returned too)."""
    from ..sim import tile_costs
    data = {"about": "instructions of one full and one partial kv-tile step of patterngen's forward, read from "
                     "the SASS of kernels cross-compiled on a CPU; the time model's partial/full tile cost ratio",
            "command": "patterngen audit --calibrate", "date": date.today().isoformat(),
            "spec": repr(calibration_spec(head_dims[0])).replace(f"head_dim={head_dims[0]}", "head_dim=*"),
            "entries": [tile_cost_entry(arch, hd, q, kv) for arch in archs for hd in head_dims for q, kv in tiles]}
    tile_costs.TILE_COSTS.write_text(json.dumps(data, indent=1) + "\n")
    tile_costs.load.cache_clear()
    return data


def cmd_audit(args, load_specs) -> int:
    """Audit every spec of a spec file; exit status 1 where a kernel spills or its shared memory
    exceeds a block's limit on the arch, and with --gate where a kernel fails `gate_failures`.
    With --calibrate, first measure the simulator's tile costs (`calibrate`)."""
    archs = [int(a.strip().removeprefix("sm_")) for v in (args.arch or ["sm_90,sm_80"]) for a in v.split(",") if a]
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.spec is None and not args.calibrate:
        raise ValueError("SPEC: give a spec file to audit (or --calibrate alone)")
    if args.calibrate:
        data = calibrate()
        print(f"wrote {len(data['entries'])} tile costs to the simulator's tile_costs.json")
    failed = False
    for name, spec in load_specs(args.spec) if args.spec is not None else ():
        if args.head_dim is not None:
            spec = Spec(spec.pattern, spec.q_shape, spec.kv_shape, spec.num_heads, spec.num_kv_heads, args.head_dim)
        rows = audit(spec, archs, DTYPES[args.dtype], name)
        print(f"{name}: {spec!r} ({args.dtype})")
        print(format_audit(rows))
        kernels = [r for r in rows if not r["reference"]]
        failed = failed or any(r["spill_ops"] or not r["fits"] for r in kernels)
        if args.gate:
            failures = gate_failures(rows)
            print("\n".join(f"GATE FAIL {f}" for f in failures) if failures else "gate: passed")
            failed = failed or bool(failures)
    return 1 if failed else 0
