"""`patterngen bench` on the command line: its arguments, and a run of the suite that prints
the table and rewrites the output files after every case (an interrupted GPU run keeps what
it measured)."""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import torch

from .measure import CaseResult, device_model_name, run_case
from .report import calibration_records, environment, format_table, summary, write_outputs
from .runners import Options, raise_recompile_limits
from .suite import Case, select, suite
from .timing import SMOKE_NOTE, CpuTimer, CudaTimer


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `patterngen bench`."""
    parser.add_argument("--case", action="append", default=None, metavar="NAME",
                        help="only cases whose name contains NAME (repeatable); cases: "
                             + ", ".join(c.name for c in suite("smoke")))
    parser.add_argument("--quick", action="store_true", help="shrunken cases that run in seconds")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help=f"tiny cases on the CPU (Triton interpreter, eager FlexAttention): {SMOKE_NOTE}")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the results as PATH.json and PATH.md (also calibration records)")
    parser.add_argument("--tiles", choices=("sim", "default", "autotune"), default="sim",
                        help="patterngen's tiling: the simulator's ranking (default), the tiling policy's "
                             "default, or the autotuner")
    parser.add_argument("--no-sweep", action="store_true", help="only the default warps/stages configuration")
    parser.add_argument("--flex-eager", action="store_true", help="FlexAttention without torch.compile")
    parser.add_argument("--flex-compile", action="store_true",
                        help="with --cpu-smoke: compile FlexAttention on the CPU too (slow)")
    parser.add_argument("--sdpa-mask", choices=("auto", "always", "never"), default="auto",
                        help="dense-mask SDPA: when it fits in memory (auto), always, or never")
    parser.add_argument("--reps", type=int, default=None, help="with --cpu-smoke: timed repeats (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--lengths", action="store_true",
                        help="instead of the suite: a length-free spec at changing lengths (Hugging Face greedy "
                             "decode vs SDPA, new lengths vs FlexAttention and SDPA; runs on the CPU too)")
    parser.add_argument("--serving", action="store_true",
                        help="instead of the suite: packed documents vs padding (training, forward + backward) and "
                             "decoding with the bounded PatternCache vs an unbounded cache (runs on the CPU too; "
                             "--quick: 2K tokens instead of 32K)")
    parser.add_argument("--distributed", action="store_true",
                        help="instead of the suite: keys moved by sequence-sharded attention (gloo processes on this "
                             "machine, 2-8 ranks) against the plan, dense ring attention and the simulator "
                             "(--quick: small shapes)")
    parser.add_argument("--tokens", type=int, default=300, metavar="N",
                        help="with --lengths: decode steps of the greedy-decode measurement (default 300)")


def run_suite(cases: list[Case], opts: Options, scale: str, smoke: bool, out: str | None = None,
              log=print) -> tuple[dict, list[CaseResult]]:
    """Measure `cases` one after another; the outputs are rewritten after every case so that
    an interrupted run keeps what it measured."""
    env = environment(opts.device)
    device_model = None if smoke else device_model_name(env["device"])
    doc: dict[str, Any] = {"title": "patterngen bench", "scale": scale, "note": SMOKE_NOTE if smoke else None,
                           "environment": env, "dtype": str(opts.dtype).replace("torch.", ""),
                           "timing": opts.timer.describe(), "simulator_device_model": device_model,
                           "flex": {"compiled": opts.flex_compiled, "block_sizes": list(opts.flex_block_sizes)}}
    results: list[CaseResult] = []
    raise_recompile_limits()
    for case in cases:
        log(f"[bench] {case.name}: {case.title} ...", flush=True)
        t0 = time.perf_counter()
        res = run_case(case, opts, device_model)
        results.append(res)
        log(f"[bench] {case.name}: {res.status}, {time.perf_counter() - t0:.1f} s"
            + "".join(f"; {n}" for n in res.notes), flush=True)
        doc["cases"] = [r.to_dict() for r in results]
        doc["results"] = calibration_records(results)
        doc["summary"] = summary(results, smoke)
        if out:
            write_outputs(out, doc, results)
    doc.setdefault("cases", [])
    doc.setdefault("results", [])
    doc.setdefault("summary", summary(results, smoke))
    return doc, results


def run(args) -> int:
    """Run `patterngen bench` with parsed arguments; returns the exit status."""
    if getattr(args, "lengths", False):
        from .lengths import run as run_lengths
        return run_lengths(args)
    if getattr(args, "serving", False):
        from .serving import run as run_serving
        return run_serving(args)
    if getattr(args, "distributed", False):
        from .distributed import run as run_distributed
        return run_distributed(args)
    smoke = bool(args.cpu_smoke)
    if not smoke and not torch.cuda.is_available():
        print("patterngen bench: no CUDA device is present, so no timing is produced.\n"
              "  `patterngen bench --quick --cpu-smoke` runs tiny cases on the CPU to exercise the code path "
              f"({SMOKE_NOTE}).")
        return 1
    scale = "smoke" if smoke else ("quick" if args.quick else "full")
    cases = select(suite(scale), args.case)
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if triton is not imported yet
        device, dtype = torch.device("cpu"), torch.float32
        timer = CpuTimer(max(1, args.reps or 1))
        flex_compiled = bool(args.flex_compile)
        if not flex_compiled:  # eager FlexAttention is the point here, its advice to compile is noise
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        print(f"patterngen bench: {SMOKE_NOTE} (fp32, Triton interpreter, "
              f"{'compiled' if flex_compiled else 'eager'} FlexAttention)", flush=True)
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        timer = CudaTimer(device)
        flex_compiled = not args.flex_eager
    opts = Options(device=device, dtype=dtype, timer=timer, flex_compiled=flex_compiled,
                   sweep_configs=not (smoke or args.no_sweep), tiles=args.tiles, sdpa_mask=args.sdpa_mask,
                   seed=args.seed, verbose=args.verbose)
    doc, results = run_suite(cases, opts, scale, smoke, args.out)
    env = doc["environment"]
    print()
    print(f"patterngen bench ({scale}) on {env['device']}; torch {env['torch']}, triton {env['triton']}; "
          f"{env['date']}; {doc['dtype']}, batch 1" + (f" -- {SMOKE_NOTE}" if smoke else ""))
    print(f"timing: {doc['timing']}")
    print(format_table(results))
    s = doc["summary"]
    if "geomean_vs_flex" in s:
        print(f"geometric mean speedup over FlexAttention: {s['geomean_vs_flex']:.2f}x (min {s['min_vs_flex']:.2f}x)")
    for name, ok in s.get("targets", {}).items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if args.out:
        print("wrote " + ", ".join(str(p) for p in write_outputs(args.out, doc, results)))
    failed = [r for r in results if r.pg is None and not r.status.startswith("skipped")]
    return 1 if failed else 0
