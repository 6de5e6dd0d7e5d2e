"""The `patterngen` command line: argument parsing and the commands `show`, `run`, `plan`,
`build`, `simulate` and `bench`.

A SPEC is a Python file that defines `spec` (a `patterngen.Spec`) and/or `specs` (a list of
them). The commands here only parse, call the library and print; what they compute lives
in the library or in the modules beside this one (spec files, checks, pictures, bench), so
that it can be tested and reused without the command line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

from .. import aot
from ..ir import Spec
from ..analysis.plan import Plan, build_plan
from ..analysis.runtime import runs_split
from ..analysis.tiling import default_tiling
from ..sim import command as sim_command
from ..sim import simulate
from ..core.tiles import Tiling
from . import audit as audit_command
from .bench import command as bench_command
from .checks import check_attention, check_plan_rows, demo_block_indices, demo_clusters
from .draw import LEGEND, draw_mask, draw_tile_map
from .shrink import shrink_spec
from .specfiles import SpecFileError, load_specs, select_specs, spec_files


# -- tiles and summaries --------------------------------------------------------------------
def parse_tile(text: str):
    """'64' -> 64 (flat tile), '16,8' or '16x8' -> (16, 8) (box)."""
    try:
        parts = [int(t) for t in text.replace("x", ",").split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile {text!r} must be an int (flat) or comma-separated ints (box), "
                                         f"e.g. 64 or 16,8") from None
    if not parts or any(t < 1 for t in parts):
        raise argparse.ArgumentTypeError(f"tile {text!r} must hold positive ints, e.g. 64 or 16,8")
    return parts[0] if len(parts) == 1 and not any(c in text for c in ",x") else tuple(parts)


def choose_tiling(spec: Spec, tile: list | None) -> Tiling:
    """The tiling given on the command line, else the plan's default (flat 64 on sequences,
    64-token boxes on grids)."""
    if tile:
        return Tiling(tile[0], tile[1] if len(tile) > 1 else tile[0])
    return default_tiling(spec)


def describe_tiling(t: Tiling) -> str:
    def one(x):
        return f"{x} tokens (flat)" if isinstance(x, int) else "x".join(map(str, x)) + " box"
    return f"q tile {one(t.q_tile)}, kv tile {one(t.kv_tile)}"


def plan_summary(plan: Plan) -> str:
    c = plan.counts()
    sparsity = c["empty"] / c["tile_pairs"] if c["tile_pairs"] else 0.0
    return (f"{c['tile_pairs']} tile pairs, {c['visited']} visited ({c['full']} full, {c['partial']} partial), "
            f"{c['empty']} empty; tile sparsity {100 * sparsity:.2f}%")


def _term_width(width: int | None) -> int:
    return width if width else max(40, min(shutil.get_terminal_size((100, 24)).columns, 160))


# -- commands -------------------------------------------------------------------------------
def cmd_show(args) -> int:
    width = _term_width(args.width)
    for i, (name, spec) in enumerate(select_specs(load_specs(args.spec), args.name, args.spec)):
        if i:
            print()
        if not 0 <= args.head < spec.num_heads:
            raise ValueError(f"--head must be in 0..{spec.num_heads - 1} for {name}, got {args.head}")
        tiling = choose_tiling(spec, args.tile)
        idx = demo_block_indices(spec, args.seed)
        if runs_split(spec):
            _show_runtime(name, spec, tiling, idx, args, width)
            continue
        t0 = time.perf_counter()
        plan = build_plan(spec, tiling, idx)  # first, so that a bad --tile fails before any output
        dt = time.perf_counter() - t0
        _show_header(args, name, spec)
        if idx is not None:
            print(f"  block indices: pg.route on random q, k (seed {args.seed}); real routing depends on the model")
        print(f"  tiling: {describe_tiling(tiling)}")
        print(f"  plan (all heads): {plan_summary(plan)}")
        tp = plan.head_plan(args.head)
        print(f"  head {args.head}: {tp.visited} visited ({tp.num_full} full, {tp.num_partial} partial) of "
              f"{plan.total_pairs} tile pairs; {len(plan.groups)} distinct head plan(s)")
        print(f"  plan built in {dt:.3f} s")
        lines, caption = draw_mask(spec, args.head, 0, width, idx)
        print(caption)
        print("\n".join(lines))
        lines, caption = draw_tile_map(plan, args.head, 0, width)
        print(caption)
        print("\n".join(lines))
        print(f"legend: {LEGEND}")
    return 0


def _show_header(args, name: str, spec: Spec) -> None:
    print(f"{args.spec}: {name}")
    print(f"  {spec!r}")
    print(f"  {spec.nq} queries x {spec.nkv} keys, {spec.num_heads} head(s) ({spec.num_kv_heads} kv), "
          f"head_dim {spec.head_dim}")


def _show_runtime(name: str, spec: Spec, tiling: Tiling, idx, args, width: int) -> None:
    """`show` for a spec with run-time ids: no plan ahead of a call, so the work on demo ids
    (`simulate`) and the mask picture from the semantics on them."""
    clusters = demo_clusters(spec, args.seed)
    t0 = time.perf_counter()
    report = simulate(spec, tiling.q_tile, tiling.kv_tile, clusters=clusters, block_indices=idx)
    dt = time.perf_counter() - t0
    _show_header(args, name, spec)
    ids = [what for what, given in (("clusters from pg.cluster", clusters), ("block indices from pg.route", idx))
           if given is not None]
    print(f"  ids: {' and '.join(ids)} on random q, k (seed {args.seed}); a model's own ids give other counts")
    print(f"  work on these ids ({dt:.3f} s): {report.summary()}")
    lines, caption = draw_mask(spec, args.head, 0, width, idx, clusters)
    print(caption)
    print("\n".join(lines))
    print("  no tile map: the pairs come with each call's ids (the launches counted above)")
    print(f"legend: {LEGEND}")


RUN_INTRO = """\
patterngen run: for each spec
  1. build the tile plan at full size and count its tile pairs;
  2. check that plan exactly on sampled rows: for a few q tiles, the status of
     every kv tile is recomputed from the element-wise semantics (no dense mask);
  3. check the reference backend, pg.attention, against dense SDPA with the
     oracle's mask. Full-size attention does not fit a CPU, so this runs on a
     scaled copy of the spec (printed below) with the same kind of pattern."""


def cmd_run(args) -> int:
    files = spec_files(args.spec)
    print(RUN_INTRO)
    failures, unreadable, count, t_all = [], [], 0, time.perf_counter()
    for path in files:
        try:
            specs = load_specs(path)
        except SpecFileError as exc:
            print(f"\n== {path}: ERROR: {exc}")
            unreadable.append(str(path))
            continue
        for name, spec in specs:
            if args.name is not None and name != args.name:
                continue
            count += 1
            label = f"{path.name if isinstance(path, Path) else path}: {name}"
            print(f"\n== {label}")
            print(f"  {spec!r}")
            try:
                ok = _run_one(spec, args)
            except Exception as exc:  # report and go on with the next spec
                print(f"  ERROR: {type(exc).__name__}: {exc}")
                ok = False
            if not ok:
                failures.append(label)
    elapsed = time.perf_counter() - t_all
    print()
    if count == 0 and args.name is not None and not unreadable:
        raise SpecFileError(f"no spec named {args.name!r} in {', '.join(map(str, files))}")
    if unreadable:
        print(f"{len(unreadable)} of {len(files)} spec file(s) could not be loaded: {', '.join(unreadable)}")
    if failures:
        print(f"{len(failures)} of {count} spec(s) FAILED in {elapsed:.1f} s: {', '.join(failures)}")
    if unreadable or failures:
        return 1
    print(f"all {count} spec(s) passed in {elapsed:.1f} s")
    return 0


def _run_one(spec: Spec, args) -> bool:
    if runs_split(spec):  # the pairs come with each call: no plan at full size
        print(f"  full size: {spec.nq} x {spec.nkv} tokens, {spec.num_heads} heads, head_dim {spec.head_dim}; "
              f"the pairs come from each call's ids, so there is no plan to check ahead")
        small, how = shrink_spec(spec, args.max_tokens)
        print(f"  attention check on a scaled copy: {how}")
        print(f"    {small!r}")
        ok_attn, msg = check_attention(small, args.seed)
        print(f"    {msg}")
        return ok_attn
    tiling = choose_tiling(spec, args.tile)
    idx = demo_block_indices(spec, args.seed)
    t0 = time.perf_counter()
    plan = build_plan(spec, tiling, idx)
    dt = time.perf_counter() - t0
    print(f"  full size: {spec.nq} x {spec.nkv} tokens, {spec.num_heads} heads, head_dim {spec.head_dim}; "
          f"{describe_tiling(tiling)}")
    if idx is not None:
        print(f"  block indices: pg.route on random q, k (seed {args.seed}); counts depend on the routing")
    print(f"  plan built in {dt:.2f} s: {plan_summary(plan)}")
    ok_plan, msg = check_plan_rows(plan.spec, plan, idx, seed=args.seed)  # box-routed: planned as its flat form
    print(f"  plan check: {msg}")
    small, how = shrink_spec(spec, args.max_tokens)
    print(f"  attention check on a scaled copy: {how}")
    print(f"    {small!r}")
    ok_attn, msg = check_attention(small, args.seed)
    print(f"    {msg}")
    return ok_plan and ok_attn


def cmd_plan(args) -> int:
    """Time the tile analysis: the median of --repeat builds of each spec's plan."""
    for path in spec_files(args.spec):
        for name, spec in select_specs(load_specs(path), args.name, path):
            tiling = choose_tiling(spec, args.tile)
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                plan = build_plan(spec, tiling, demo_block_indices(spec, args.seed))
                times.append(time.perf_counter() - start)
            first = times[0]
            times.sort()
            print(f"{path.name}:{name}  {spec.nq:,} x {spec.nkv:,} tokens, {spec.num_heads} heads, "
                  f"{describe_tiling(tiling)}")
            print(f"  plan built in {times[len(times) // 2]:.3f} s (median of {args.repeat}; first build "
                  f"{first:.3f} s); {plan_summary(plan)}")
    return 0


def cmd_build(args) -> int:
    """Forward and backward kernels of every spec on the tiling policy's first tiling (`pg.aot.build`);
    the manifest records which kinds were built."""
    split = (lambda values, default: [x for v in (values or [default]) for x in v.split(",") if x.strip()])
    specs = load_specs(args.spec)
    print(f"patterngen build: {len(specs)} spec(s) from {args.spec} -> {args.out}")
    manifest = aot.build(specs, args.out, split(args.arch, "sm_90"), split(args.dtype, "bf16"), args.head_dim, log=print)
    print(f"wrote {len(manifest['kernels'])} kernel(s) ({', '.join(manifest['kernels_built'])}) and "
          f"manifest.json to {args.out}")
    return 0


def cmd_simulate(args) -> int:
    return sim_command.run(args, load_specs)


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patterngen", description="A compiler for sparse attention patterns.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tile_help = ("tile shapes: Q [KV], each an int (flat tile of consecutive tokens) or comma-separated "
                 "ints (a box on the grid), e.g. --tile 64 64 or --tile 16,8 16,8; default: 64 flat, "
                 "or a 64-token box on n-D grids")
    show = sub.add_parser("show", help="draw a spec's mask and tile map, with its plan's counts")
    show.add_argument("spec", metavar="SPEC", help="Python file defining `spec` (or `specs`)")
    show.add_argument("--tile", nargs="+", type=parse_tile, metavar="T", help=tile_help)
    show.add_argument("--head", type=int, default=0, help="head to draw (default 0)")
    show.add_argument("--width", type=int, default=None, help="characters per line (default: the terminal's)")
    show.add_argument("--name", default=None, help="only the spec with this variable name")
    show.add_argument("--seed", type=int, default=0, help="seed of the random routing of Routed specs")
    show.set_defaults(func=cmd_show)

    run = sub.add_parser("run", help="plan and check every spec (default: every file in ./examples)")
    run.add_argument("spec", metavar="SPEC", nargs="*", help="spec files or directories (default: ./examples)")
    run.add_argument("--tile", nargs="+", type=parse_tile, metavar="T", help=tile_help)
    run.add_argument("--name", default=None, help="only specs with this variable name")
    run.add_argument("--max-tokens", type=int, default=2048, help="token budget of the scaled attention check")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs and routing")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="time the tile analysis of each spec (median of repeated builds)")
    plan.add_argument("spec", metavar="SPEC", nargs="+", help="spec files or directories")
    plan.add_argument("--tile", nargs="+", type=parse_tile, metavar="T", help=tile_help)
    plan.add_argument("--name", default=None, help="only specs with this variable name")
    plan.add_argument("--repeat", type=int, default=5, help="builds per spec (default 5)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the random routing of Routed specs")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="time patterngen vs FlexAttention vs dense SDPA on the current GPU "
                                         "(--lengths: at changing lengths, Hugging Face decode; on the CPU too)")
    bench_command.add_cli_arguments(bench)
    bench.set_defaults(func=bench_command.run)

    build = sub.add_parser("build", help="render and cross-compile a spec file's kernels into a directory "
                                         "(load it with pg.load)")
    build.add_argument("spec", metavar="SPEC", help="Python file defining `spec` (or `specs`)")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    build.add_argument("--arch", action="append", metavar="ARCH",
                       help="target GPU, sm_80 or sm_90; repeat or comma-separate for several (default sm_90)")
    build.add_argument("--dtype", action="append", metavar="DTYPE",
                       help="bf16, fp16 or fp32; repeat or comma-separate for several (default bf16)")
    build.add_argument("--head-dim", type=int, default=None, help="override every spec's head_dim")
    build.set_defaults(func=cmd_build)

    audit = sub.add_parser("audit", help="compile a spec file's kernels for sm_90/sm_80 here and read their SASS "
                                         "(matmul instructions, pipelining, spills, shared memory); exit 1 if one "
                                         "spills or does not fit")
    audit.add_argument("spec", metavar="SPEC", nargs="?", help="Python file defining `spec` (or `specs`)")
    audit.add_argument("--arch", action="append", metavar="ARCH",
                       help="sm_90 and/or sm_80; repeat or comma-separate (default both)")
    audit.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    audit.add_argument("--head-dim", type=int, default=None, help="override every spec's head_dim")
    audit.add_argument("--gate", action="store_true",
                       help="also exit 1 where a kernel fails the CI gate: wgmma (sm_90) or mma.sync (sm_80) for "
                            "every matmul, a pipelined kv loop, and a full-tile step within 5%% of the reference's")
    audit.add_argument("--calibrate", action="store_true",
                       help="measure the forward's full and partial tile steps (sm_90, sm_80; head dims 64, 128) "
                            "into the simulator's patterngen/sim/tile_costs.json")
    audit.set_defaults(func=lambda args: audit_command.cmd_audit(args, load_specs))

    sim = sub.add_parser("simulate", help="cost model: the best possible speedup over dense attention")
    sim_command.add_cli_arguments(sim)
    sim.set_defaults(func=cmd_simulate)
    return parser


NEEDS_TRITON = ("audit", "bench", "build")
"""Commands that generate or run Triton kernels (`run`, `show`, `plan` and `simulate` do not)."""


def _missing_triton() -> str | None:
    """Why triton cannot be imported, or None when it can."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cpu_smoke", False):  # triton reads it once, when first imported (by the check below)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.command in NEEDS_TRITON:
        why = _missing_triton()
        if why is not None:
            print(f"patterngen {args.command}: needs triton, which cannot be imported here ({why}); install it "
                  f"with `pip install triton numpy` (or `make install`, which installs everything)", file=sys.stderr)
            return 2
    for name in ("tile",):
        value = getattr(args, name, None)
        if value is not None and len(value) > 2:
            parser.error(f"--{name} takes one or two tile shapes (Q [KV]), got {len(value)}")
    try:
        return args.func(args)
    except (SpecFileError, ValueError, TypeError) as exc:
        print(f"patterngen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
