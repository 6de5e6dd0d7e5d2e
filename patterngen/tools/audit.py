"""`patterngen audit`: the kernels a spec runs, compiled here for sm_90 and sm_80 and read from
their SASS (backends/triton/sass.py), so that a kernel's quality is checked without a GPU:
warpgroup MMA on sm_90, a pipelined kv loop, no spills, the instructions of one kv-tile step.

The kernels are the op's: the forward on the tiling policy's tiling (a length-free spec's decode
and prefill variants) and the backward (dK/dV, dQ) on its backward tiling.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from .. import dispatch
from ..ir import Spec
from ..sim.report import align_columns

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _kernels(spec: Spec, dtype: torch.dtype):
    """(role, tiling, compile(arch) -> [CompiledKernel]) of every kernel the op runs for `spec`."""
    from ..backends.triton import TritonBackward, TritonForward, backward_tiling
    for var in (("decode", "prefill") if spec.length_free else ("",)):
        tiling = dispatch.policy_tiling(spec, var)
        fwd = TritonForward(spec, tiling)
        yield f"forward{' ' + var if var else ''}", tiling, lambda arch, f=fwd: [f.cross_compile(arch, dtype)]
        bt = backward_tiling(tiling, spec.head_dim, spec)
        bwd = TritonBackward(TritonForward(spec, bt))
        yield f"backward{' ' + var if var else ''}", bt, lambda arch, b=bwd: b.cross_compile(arch, dtype)


def audit(spec: Spec, archs=(90, 80), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per compiled kernel and arch: role, tiling, and the SASS report's figures."""
    from ..backends.triton.sass import read
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    rows = []
    for role, tiling, compile_for in _kernels(spec, dtype):
        for arch in archs:
            for compiled in compile_for(arch):
                report = read(compiled)
                rows.append({"role": role, "tiling": repr(tiling), **asdict(report), "matmul": report.matmul,
                             "pipelined": report.pipelined, "fits": report.fits})
    return rows


COLUMNS = (("role", "role"), ("name", "kernel"), ("arch", "sm"), ("tiling", "tiling"), ("registers", "regs"),
           ("stack", "stack"), ("shared", "smem B"), ("fits", "fits"), ("matmul", "matmul"), ("warpgroup_mma", "HGMMA"),
           ("mma_sync", "HMMA"), ("pipelined", "pipelined"), ("spill_ops", "spill ops"), ("loop_body", "loop instr"),
           ("instructions", "instr"))


def format_audit(rows: list[dict]) -> str:
    """The audit as an aligned table."""
    return align_columns([[h for _, h in COLUMNS]] + [[str(r[k]) for k, _ in COLUMNS] for r in rows])


def cmd_audit(args, load_specs) -> int:
    """Audit every spec of a spec file; exit status 1 where a kernel spills or its shared memory
    exceeds a block's limit on the arch."""
    archs = [int(a.strip().removeprefix("sm_")) for v in (args.arch or ["sm_90,sm_80"]) for a in v.split(",") if a]
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    failed = False
    for name, spec in load_specs(args.spec):
        if args.head_dim is not None:
            spec = Spec(spec.pattern, spec.q_shape, spec.kv_shape, spec.num_heads, spec.num_kv_heads, args.head_dim)
        rows = audit(spec, archs, DTYPES[args.dtype])
        print(f"{name}: {spec!r} ({args.dtype})")
        print(format_audit(rows))
        failed = failed or any(r["spill_ops"] or not r["fits"] for r in rows)
    return 1 if failed else 0
