"""The `patterngen` command line: show, run and simulate pattern specs.

A SPEC is a Python file that defines `spec` (a `patterngen.Spec`) and/or
`specs` (a list of them). `show` draws one spec's mask and tile map, `run`
plans every spec at full size, checks the plan against the element-wise
semantics and checks the reference attention against dense SDPA, and
`simulate` is the cost model's front end (patterngen/simulate.py).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

import torch

from .ir import Band, Global, Heads, Intersection, Pattern, Routed, Sink, Spec, Strided, Union, Window
from .plan import Plan, build_plan, default_tiling
from .routing import block_masks, normalize_block_indices
from .semantics import unravel, visible
from .tiles import TileGrid, Tiling

EXAMPLES_DIR = Path("examples")


class SpecFileError(ValueError):
    """A spec file that cannot be loaded; the message says why."""


# -- loading ------------------------------------------------------------------------
def load_specs(path) -> list[tuple[str, Spec]]:
    """Execute a spec file and collect its `spec` and `specs`, as (name, Spec) pairs.

    Names are the module-level variable names of the specs when they have one
    ("spec", "hdit"), else "specs[i]". A spec listed twice is returned once.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecFileError(f"spec file {str(path)!r} not found (expected a Python file defining `spec` or `specs`)")
    sys.path.insert(0, str(p.resolve().parent))  # as `python FILE` would: siblings are importable
    try:
        ns = runpy.run_path(str(p), run_name="__patterngen_spec__")
    except Exception as exc:  # the user's file failed: say which file, keep the cause
        raise SpecFileError(f"{p}: executing the spec file failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(p.resolve().parent))
    if "spec" not in ns and "specs" not in ns:
        raise SpecFileError(f"{p}: defines neither `spec` nor `specs` (set `spec = patterngen.Spec(...)` or "
                            f"`specs = [...]`)")
    found: list[Spec] = []
    if "spec" in ns:
        found.append(ns["spec"])
    if "specs" in ns:
        listed = ns["specs"]
        if not isinstance(listed, (list, tuple)):
            raise SpecFileError(f"{p}: `specs` must be a list of patterngen.Spec, got {type(listed).__name__}")
        found.extend(listed)
    names = {id(v): k for k, v in ns.items() if isinstance(v, Spec) and not k.startswith("_")}
    names.update({id(ns["spec"]): "spec"} if isinstance(ns.get("spec"), Spec) else {})
    out, seen = [], set()
    for i, s in enumerate(found):
        if not isinstance(s, Spec):
            where = "spec" if (i == 0 and "spec" in ns) else "an entry of specs"
            raise SpecFileError(f"{p}: {where} must be a patterngen.Spec, got {s!r} ({type(s).__name__})")
        if id(s) in seen:
            continue
        seen.add(id(s))
        listed_index = i - (1 if "spec" in ns else 0)
        out.append((names.get(id(s), f"specs[{listed_index}]"), s))
    return out


def spec_files(paths: list[str]) -> list[Path]:
    """The files to run: the given ones (directories expand to their *.py), or ./examples."""
    if not paths:
        if not EXAMPLES_DIR.is_dir():
            raise SpecFileError(f"no SPEC given and there is no ./{EXAMPLES_DIR} directory here ({Path.cwd()}); "
                                f"run from the repository root, which holds the bundled examples, or pass spec files")
        paths = [str(EXAMPLES_DIR)]
    out: list[Path] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.py") if not f.name.startswith("_"))
            if not files:
                raise SpecFileError(f"directory {path!r} holds no spec files (*.py)")
            out.extend(files)
        else:
            out.append(p)
    return out


# -- tiles --------------------------------------------------------------------------
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


def demo_block_indices(spec: Spec, seed: int = 0, head_dim: int = 16) -> torch.Tensor | None:
    """Block indices for a Routed spec, from `patterngen.route` on random queries and keys.

    Real routing depends on the model's activations; random ones give a
    representative count of tiles, not the model's. Small head dims keep this cheap.
    """
    r = spec.routed
    if r is None:
        return None
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, spec.num_heads, spec.nq, head_dim, generator=g)
    k = torch.randn(1, spec.num_kv_heads, spec.nkv, head_dim, generator=g)
    from .routing import route
    return route(q, k, r.block, r.topk, r.causal)


# -- plan summaries -----------------------------------------------------------------
def plan_summary(plan: Plan) -> str:
    c = plan.counts()
    sparsity = c["empty"] / c["tile_pairs"] if c["tile_pairs"] else 0.0
    return (f"{c['tile_pairs']} tile pairs, {c['visited']} visited ({c['full']} full, {c['partial']} partial), "
            f"{c['empty']} empty; tile sparsity {100 * sparsity:.2f}%")


def kv_tile_ids(grid: TileGrid) -> torch.Tensor:
    """Tile id of every token of a grid, [n]."""
    tok = torch.arange(grid.n)
    if grid.flat:
        return tok // grid.tile
    ids = torch.zeros_like(tok)
    for c, t, n in zip(unravel(tok, grid.shape), grid.tile, grid.counts):
        ids = ids * n + c // t
    return ids


def check_plan_rows(spec: Spec, plan: Plan, block_indices: torch.Tensor | None = None, max_tiles: int = 6,
                    budget: int = 1 << 26, seed: int = 0) -> tuple[bool, str]:
    """Recompute, from the element-wise semantics, the status of every kv tile for a
    few q tiles of each distinct head plan, and compare with the plan's rows.

    This checks the full-size plan exactly on those rows without an Nq x Nkv mask:
    each q tile costs (tile volume x Nkv) element evaluations.
    """
    qg, kg = plan.q_grid, plan.kv_grid
    kid = kv_tile_ids(kg)
    sizes = kg.sizes
    idx = normalize_block_indices(spec, block_indices)
    masks = block_masks(spec, idx) if idx is not None else None
    reps: dict[int, tuple[int, int]] = {}
    for b, row in enumerate(plan.head_group.tolist()):
        for h, g in enumerate(row):
            reps.setdefault(g, (b, h))
    groups = sorted(reps)
    if len(groups) > 8:
        groups = [groups[round(i * (len(groups) - 1) / 7)] for i in range(8)]
    per_tile = qg.volume * spec.nkv * len(groups)
    n_tiles = max(2, min(max_tiles, budget // max(1, per_tile), qg.count))
    gen = torch.Generator().manual_seed(seed)
    picks = [0, qg.count - 1, qg.count // 2] + torch.randint(qg.count, (n_tiles,), generator=gen).tolist()
    tiles = list(dict.fromkeys(picks))[:min(n_tiles, qg.count)]
    kv = torch.arange(spec.nkv)[None, :]
    for g in groups:
        b, h = reps[g]
        pattern = spec.head_patterns[h]
        bm = masks[b, h] if masks is not None else None
        tp = plan.groups[g]
        for qt in tiles:
            tok = qg.tokens(torch.tensor([qt]))[0]
            tok = tok[tok >= 0]
            vis = visible(pattern, tok[:, None], kv, spec, bm)
            vis = vis.expand(len(tok), spec.nkv)
            t_any = torch.zeros(kg.count, dtype=torch.long).index_add_(0, kid, vis.any(0).long()) > 0
            t_all = torch.zeros(kg.count, dtype=torch.long).index_add_(0, kid, vis.all(0).long()) == sizes
            want_kv = torch.nonzero(t_any).flatten()
            lo, hi = int(tp.q_ptr[qt]), int(tp.q_ptr[qt + 1])
            got_kv, got_full = tp.kv_tiles[lo:hi], tp.full[lo:hi]
            if not torch.equal(got_kv, want_kv) or not torch.equal(got_full, t_all[want_kv]):
                missing = sorted(set(want_kv.tolist()) - set(got_kv.tolist()))[:5]
                extra = sorted(set(got_kv.tolist()) - set(want_kv.tolist()))[:5]
                return False, (f"MISMATCH at head {h} (batch {b}), q tile {qt}: kv tiles missing from the plan "
                               f"{missing}, visited but empty {extra}, or full flags differ")
    return True, (f"{len(tiles)} q tiles x all {kg.count} kv tiles, for {len(groups)} of {len(plan.groups)} "
                  f"distinct head plan(s), recomputed from the element semantics: OK")


# -- scaled copies for the attention check ------------------------------------------
def _odd_like(w: int, x: float) -> int:
    """round(x), with the parity of w (odd windows stay centred)."""
    r = max(1, round(x))
    return r + 1 if (r % 2) != (w % 2) else r


def _shrink_pattern(p: Pattern, f: float, spec: Spec, q_shape, kv_shape, nkv: int) -> Pattern:
    if isinstance(p, (Union, Intersection)):
        return type(p).of(*(_shrink_pattern(c, f, spec, q_shape, kv_shape, nkv) for c in p.parts))
    if f == 1:
        return p
    if isinstance(p, Band):
        left = 0 if p.left == 0 else max(1, round((p.left + 1) / f) - 1)
        right = 0 if p.right == 0 else max(1, round(p.right / f))
        return Band(left, right)
    if isinstance(p, (Sink, Global)):
        return type(p)(min(p.n, nkv))
    if isinstance(p, Strided):
        if p.stride <= 16:
            return p
        stride = max(2, round(p.stride / f))
        return Strided(stride, min(stride - 1, round(p.offset * stride / p.stride)))
    if isinstance(p, Routed):
        block = max(1, round(p.block / f))
        return Routed(block, min(p.topk, -(-nkv // block)), p.causal)
    if isinstance(p, Window):
        sizes, strides, dils, causal = [], [], [], []
        for (w, s, d, c), L, Ln in zip(p.dims(spec.ndim), spec.q_shape, q_shape):
            fk = L / Ln
            if w == L:
                wn = Ln
            else:
                wn = min(Ln, max(2, _odd_like(w, w / fk))) if Ln >= 2 else Ln
            sn = min(wn, max(1, round(s / fk)))
            dn = d if wn * d <= Ln else max(1, Ln // wn)
            sizes.append(wn), strides.append(sn), dils.append(dn), causal.append(c)
        return Window(tuple(sizes), tuple(strides), tuple(dils) if any(d != 1 for d in dils) else 1,
                      tuple(causal) if any(causal) else False)
    return p


def shrink_spec(spec: Spec, max_tokens: int = 2048, budget: float = 2.0 ** 31) -> tuple[Spec, str]:
    """A small copy of `spec` with the same kind of pattern, for attention on a CPU.

    Heads: the key/value groups that hold one head of every distinct head
    pattern. Tokens: every grid extent divided by one integer factor (so that
    heads x tokens^2 x head_dim stays within `budget`), and with it every
    length along the sequence (bands, strides over 16, routed blocks, windows
    and window strides); sink and global counts are kept.
    """
    g = spec.num_heads // spec.num_kv_heads
    first: dict[Pattern, int] = {}
    for h, p in enumerate(spec.head_patterns):
        first.setdefault(p, h)
    kv_groups = sorted({h // g for h in first.values()})
    heads = [h for kg in kv_groups for h in range(kg * g, (kg + 1) * g)]
    H = len(heads)

    def shapes(f):
        return tuple(-(-n // f) for n in spec.q_shape), tuple(-(-n // f) for n in spec.kv_shape)

    def fits(f):
        qs, ks = shapes(f)
        n = max(math.prod(qs), math.prod(ks))
        return (n <= max_tokens and H * n * n * spec.head_dim <= budget) or all(x == 1 for x in qs + ks)

    f = 1
    while not fits(f):
        f += 1
    # a factor that divides every extent keeps proportions exact (e.g. windows aligned with strides)
    extents = spec.q_shape + spec.kv_shape
    f = next((c for c in range(f, 2 * f + 1) if all(n % c == 0 for n in extents)), f)
    qs, ks = shapes(f)
    nkv = math.prod(ks)
    pats = [_shrink_pattern(spec.head_patterns[h], f, spec, qs, ks, nkv) for h in heads]
    pattern = pats[0] if len(set(pats)) == 1 else Heads(pats)
    small = Spec(pattern, qs, ks, num_heads=H, num_kv_heads=len(kv_groups), head_dim=spec.head_dim)
    how = (f"tokens {spec.nq} -> {small.nq}" + (f" (kv {spec.nkv} -> {small.nkv})" if spec.nkv != spec.nq else "")
           + (f", every extent / {f}, lengths along it / {f}, sink/global counts kept" if f > 1 else "")
           + f"; heads {H} of {spec.num_heads} ({len(kv_groups)} kv group(s) covering all "
           f"{len(first)} distinct head pattern(s))")
    return small, how


def dense_reference(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with the oracle's boolean mask; rows that see no key give zeros (the contract)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))


def check_attention(small: Spec, seed: int = 0, tol: float = 1e-4) -> tuple[bool, str]:
    """pg.attention (reference backend) against dense SDPA on `small`, float32, batch 1."""
    try:
        from . import attention
    except ImportError as exc:
        return False, f"pg.attention is not available ({exc}); cannot check the reference backend"
    from .oracle import dense_mask
    gen = torch.Generator().manual_seed(seed)
    shape_q = (1, small.num_heads, small.nq, small.head_dim)
    shape_kv = (1, small.num_kv_heads, small.nkv, small.head_dim)
    q, k, v = (torch.randn(s, generator=gen) for s in (shape_q, shape_kv, shape_kv))
    idx = None
    if small.routed is not None:
        from .routing import route
        r = small.routed
        idx = route(q, k, r.block, r.topk, r.causal)
    t0 = time.perf_counter()
    out = attention(q, k, v, small) if idx is None else attention(q, k, v, small, block_indices=idx)
    t_ref = time.perf_counter() - t0
    mask = dense_mask(small, idx)
    want = dense_reference(q, k, v, mask)
    err = float((out - want).abs().max()) if out.shape == want.shape else float("inf")
    ok = err <= tol and bool(torch.isfinite(out).all())
    routed = ", blocks from pg.route on the same q, k" if idx is not None else ""
    return ok, (f"pg.attention (reference, {t_ref:.2f} s) vs dense SDPA with the oracle mask, float32{routed}: "
                f"max |diff| {err:.1e} (tol {tol:.0e}): {'OK' if ok else 'FAILED'}")


# -- commands -----------------------------------------------------------------------
def _term_width(width: int | None) -> int:
    return width if width else max(40, min(shutil.get_terminal_size((100, 24)).columns, 160))


def _select(specs: list[tuple[str, Spec]], name: str | None, path) -> list[tuple[str, Spec]]:
    if name is None:
        return specs
    chosen = [(n, s) for n, s in specs if n == name]
    if not chosen:
        raise SpecFileError(f"{path}: no spec named {name!r} (available: {', '.join(n for n, _ in specs)})")
    return chosen


def cmd_show(args) -> int:
    from .draw import LEGEND, draw_mask, draw_tile_map
    width = _term_width(args.width)
    for i, (name, spec) in enumerate(_select(load_specs(args.spec), args.name, args.spec)):
        if i:
            print()
        if not 0 <= args.head < spec.num_heads:
            raise ValueError(f"--head must be in 0..{spec.num_heads - 1} for {name}, got {args.head}")
        tiling = choose_tiling(spec, args.tile)
        idx = demo_block_indices(spec, args.seed)
        t0 = time.perf_counter()
        plan = build_plan(spec, tiling, idx)  # first, so that a bad --tile fails before any output
        dt = time.perf_counter() - t0
        print(f"{args.spec}: {name}")
        print(f"  {spec!r}")
        print(f"  {spec.nq} queries x {spec.nkv} keys, {spec.num_heads} head(s) ({spec.num_kv_heads} kv), "
              f"head_dim {spec.head_dim}")
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
    ok_plan, msg = check_plan_rows(spec, plan, idx, seed=args.seed)
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
        for name, spec in _select(load_specs(path), args.name, path):
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
    """Forward and backward kernels of every spec; the manifest records which kinds were built."""
    from .aot import build
    split = (lambda values, default: [x for v in (values or [default]) for x in v.split(",") if x.strip()])
    specs = load_specs(args.spec)
    print(f"patterngen build: {len(specs)} spec(s) from {args.spec} -> {args.out}")
    manifest = build(specs, args.out, split(args.arch, "sm_90"), split(args.dtype, "bf16"), args.head_dim, log=print)
    print(f"wrote {len(manifest['kernels'])} kernel(s) ({', '.join(manifest['kernels_built'])}) and "
          f"manifest.json to {args.out}")
    return 0


def cmd_simulate(args) -> int:
    try:
        simulate = _simulator()
    except ImportError as exc:
        print(f"patterngen simulate: the simulator (patterngen.simulate) is not available: {exc}", file=sys.stderr)
        return 2
    return int(simulate.cli_main(args) or 0)


def _simulator():
    """The module patterngen.simulate (the package attribute of that name may be the function)."""
    return importlib.import_module("patterngen.simulate")


# -- parser -------------------------------------------------------------------------
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

    bench = sub.add_parser("bench", help="time patterngen vs FlexAttention vs dense SDPA on the current GPU")
    from . import bench as bench_module
    bench_module.add_cli_arguments(bench)
    bench.set_defaults(func=bench_module.cli_main)

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

    sim = sub.add_parser("simulate", help="cost model: the best possible speedup over dense attention")
    try:
        simulate = _simulator()
    except ModuleNotFoundError as exc:
        if exc.name not in ("patterngen.simulate",):
            raise
        sim.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        simulate.add_cli_arguments(sim)
    sim.set_defaults(func=cmd_simulate)
    return parser


NEEDS_TRITON = ("bench", "build")
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
