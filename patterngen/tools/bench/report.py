"""What a benchmark run reports: the terminal table, the summary against the targets, the
environment, and the JSON and markdown files (with the records the calibration script fits
device models to)."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from ...sim.report import align_columns
from ...sim.tile_shapes import format_tile
from .measure import CaseResult

COLUMNS = ("case", "patterngen ms", "tiles", "flex ms", "flex blk", "mask s", "sdpa ms", "causal ms",
           "sdpa+mask ms", "x flex", "x sdpa", "bound", "% bound", "x all heads", "err")


def _f(x, fmt="{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "nan"
    return fmt.format(x)


def table_rows(results: list[CaseResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.pg is None:
            rows.append([r.case.name, r.status] + [""] * (len(COLUMNS) - 2))
            continue
        masked = r.sdpa.get("mask", {})
        rows.append([
            r.case.name, _f(r.pg_ms), f"{format_tile(r.pg['q_tile'])}/{format_tile(r.pg['kv_tile'])}",
            _f(r.flex_ms), _f(r.flex and r.flex.get("block_size"), "{}"), _f(r.flex and r.flex.get("block_mask_s")),
            _f(r.sdpa_ms), _f(r.sdpa.get("causal", {}).get("ms")),
            _f(masked.get("ms")) if "ms" in masked else ("n/a" if "skipped" in masked else "-"),
            _f(r.speedup_vs_flex, "{:.2f}x"), _f(r.speedup_vs_sdpa, "{:.2f}x"),
            _f(r.bound, "{:.2f}x") if r.sim else "n/a", _f(r.bound_realised and 100 * r.bound_realised, "{:.0f}%"),
            _f(r.pg.get("vs_all_heads"), "{:.2f}x"), _f(r.err_vs_flex, "{:.1e}")])
    return rows


def format_table(results: list[CaseResult]) -> str:
    """One row per case; a case that was skipped or failed shows its status across the row."""
    rows = [list(COLUMNS)] + table_rows(results)
    return align_columns(rows, spanning=[j > 0 and row[2] == "" for j, row in enumerate(rows)])


def summary(results: list[CaseResult], smoke: bool) -> dict:
    """Geometric mean against FlexAttention and the performance targets (GPU runs only)."""
    vs_flex = [r.speedup_vs_flex for r in results if r.speedup_vs_flex]
    out: dict[str, Any] = {"cases": len(results), "measured": sum(r.pg is not None for r in results)}
    if vs_flex:
        out["geomean_vs_flex"] = math.exp(sum(math.log(x) for x in vs_flex) / len(vs_flex))
        out["min_vs_flex"] = min(vs_flex)
    errs = [r.err_vs_flex for r in results if r.err_vs_flex is not None]
    if errs:
        out["max_err_vs_flex"] = max(errs)
    if smoke:
        return out
    targets = {}
    if vs_flex:
        targets["never slower than FlexAttention"] = min(vs_flex) >= 1.0
        targets["geomean >= 1.3x FlexAttention"] = out["geomean_vs_flex"] >= 1.3
    for r in results:
        if r.case.block_sparse_target and r.bound_realised is not None:
            targets[f"{r.case.name}: >= 85% of the bound"] = r.bound_realised >= 0.85
        if r.case.name == "dense-causal" and r.speedup_vs_flex is not None:
            targets["dense causal >= 90% of FlexAttention"] = r.speedup_vs_flex >= 0.9
        if r.case.active_heads == 0.5 and r.pg and r.pg.get("vs_all_heads"):
            targets[f"{r.case.name}: >= 1.7x computing all heads"] = r.pg["vs_all_heads"] >= 1.7
    out["targets"] = targets
    return out


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def calibration_records(results: list[CaseResult]) -> list[dict]:
    """Measured kernel times in the format of examples/calibration/calibrate.py."""
    recs = []
    for r in results:
        if r.pg is not None:
            recs.append({"case": r.case.name, "spec": repr(r.case.spec), "q_tile": r.pg["q_tile"],
                         "kv_tile": r.pg["kv_tile"], "batch": 1, "time_ms": r.pg["ms"], "backend": "patterngen"})
        if r.sdpa_ms is not None:
            recs.append({"case": f"{r.case.name}/sdpa", "kind": "dense", "spec": repr(r.case.spec), "batch": 1,
                         "time_ms": r.sdpa_ms, "backend": "sdpa"})
    return recs


def to_markdown(doc: dict, results: list[CaseResult]) -> str:
    env = doc["environment"]
    lines = [f"# patterngen bench ({doc['scale']})", ""]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [f"- device: {env.get('device')}", f"- torch {env['torch']}, triton {env['triton']}, "
              f"CUDA {env['cuda']}", f"- date: {env['date']}", f"- dtype {doc['dtype']}, batch 1",
              f"- timing: {doc['timing']}", ""]
    rows = table_rows(results)
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + " |")
    for row in rows:
        if row[2] == "":
            row = [row[0], row[1]] + [""] * (len(COLUMNS) - 2)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Columns: times are medians in ms; `x flex` and `x sdpa` are patterngen's speedups over "
              "FlexAttention (best block size) and over dense SDPA without a mask; `bound` is the simulator's "
              "tile bound (all tile pairs / visited tile pairs) at the tiles patterngen ran; `% bound` is "
              "`x sdpa` over `bound`; `mask s` is FlexAttention's block-mask creation time (not in `flex ms`); "
              "`err` is max |patterngen - flex|.", ""]
    s = doc["summary"]
    if "geomean_vs_flex" in s:
        lines.append(f"Geometric mean speedup over FlexAttention: {s['geomean_vs_flex']:.2f}x "
                     f"(min {s['min_vs_flex']:.2f}x).")
    for name, ok in s.get("targets", {}).items():
        lines.append(f"- target {name}: {'met' if ok else 'NOT met'}")
    notes = [(r.case.name, n) for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes:"] + [f"- {c}: {n}" for c, n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(path: str, doc: dict, results: list[CaseResult]) -> list[Path]:
    """JSON and markdown side by side: PATH.json / PATH.md whichever suffix PATH has."""
    return write_json_and_markdown(path, doc, to_markdown(doc, results))


def write_json_and_markdown(path: str, doc: dict, markdown: str) -> list[Path]:
    """PATH.json (`doc`) and PATH.md (`markdown`), whatever suffix PATH has, each replaced
    atomically so that an interrupted run leaves whole files."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".json", ".md") else p
    written = []
    for suffix, text in ((".json", json.dumps(doc, indent=1, default=str)), (".md", markdown)):
        target = base.with_name(base.name + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return written