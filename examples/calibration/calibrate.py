"""Fit a device model's kernel parameters to measured kernel times.

    python examples/calibration/calibrate.py MEASUREMENTS.json --device h100 \
        --out patterngen/sim/devices/h100.json --errors examples/calibration/h100_errors.md

MEASUREMENTS is a JSON list (or JSON lines) of records, one per measured case
(see README.md beside this file for how to write it from `patterngen bench`):

    {"case": "gna-2d-strided", "spec": "Spec(Window((80, 80), stride=(16, 16)), q_shape=(256, 256), ...)",
     "q_tile": [16, 8], "kv_tile": [16, 8], "batch": 1, "time_ms": 0.213}

`spec` is the spec's repr (or give "spec_file" and optionally "spec_name" to
load it with `patterngen.tools.specfiles.load_specs`); `"kind": "dense"` marks a dense
baseline measurement (SDPA / cuDNN / FlashAttention), which fits the dense
parameters instead. Times are fitted in log space (relative error) with Adam
on the same time model `patterngen.sim` uses; the fitted model is written
with "calibrated": true, and every case's error to the --errors file.

`--synthetic N` makes N measurements from a perturbed copy of the device model
instead (a self-check of the fitting: the printed errors should be ~0).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

import torch

import patterngen as pg
from patterngen import sim

# fitted parameters and how each is kept in range: fraction in (0, 1), factor >= 1, or overhead >= 0
FIT = {"mma_efficiency": "fraction", "softmax_overlap": "fraction", "partial_tile_factor": "factor",
       "box_tile_factor": "factor", "q_tile_overhead_us": "overhead", "tile_overhead_us": "overhead",
       "launch_overhead_us": "overhead", "kv_l2_hit_rate": "fraction"}
DENSE_FIT = {"mma_efficiency": "fraction", "softmax_overlap": "fraction", "q_tile_overhead_us": "overhead",
             "tile_overhead_us": "overhead", "launch_overhead_us": "overhead"}


def _to_raw(kind: str, v: float) -> float:
    v = float(v)
    if kind == "fraction":
        v = min(max(v, 1e-4), 1 - 1e-4)
        return math.log(v / (1 - v))
    if kind == "factor":
        return math.log(math.expm1(max(v - 1.0, 1e-4)))
    return math.log(math.expm1(max(v, 1e-4)))


def _from_raw(kind: str, r: torch.Tensor) -> torch.Tensor:
    if kind == "fraction":
        return torch.sigmoid(r)
    if kind == "factor":
        return 1.0 + torch.nn.functional.softplus(r)
    return torch.nn.functional.softplus(r)


def _spec_of(rec: dict) -> pg.Spec:
    if "spec_file" in rec:
        from patterngen.tools.specfiles import load_specs
        specs = load_specs(rec["spec_file"])
        if "spec_name" in rec:
            specs = [s for n, s in specs if n == rec["spec_name"]]
            if not specs:
                raise ValueError(f"case {rec.get('case')!r}: no spec named {rec['spec_name']!r} in {rec['spec_file']}")
            return specs[0]
        return specs[0][1]
    names = {k: getattr(pg, k) for k in ("Spec", "Full", "Causal", "Window", "Band", "Sink", "Global", "Strided",
                                         "Routed", "Heads", "Union", "Intersection")}
    names.update(range=range, slice=slice)
    return eval(rec["spec"], {"__builtins__": {}}, names)  # a spec repr is the Python that builds it


def _tile(v):
    return v if isinstance(v, int) else tuple(v)


def load_records(path: str) -> list[dict]:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("results", data.get("cases", [data]))
    out = []
    for rec in data:
        t = next((rec[k] for k in ("time_ms", "ms", "median_ms") if k in rec), None)
        if t is None:
            raise ValueError(f"record {rec!r} has no time_ms")
        out.append({**rec, "time_ms": float(t)})
    return out


def workloads(dev: sim.DeviceModel, records: list[dict]):
    """(case name, kind, workload, measured seconds) per record."""
    out = []
    for rec in records:
        spec = _spec_of(rec)
        batch = int(rec.get("batch", 1))
        if rec.get("kind") == "dense":
            wl = sim.dense_workload(dev, spec.nq, spec.nkv, spec.num_heads, spec.head_dim, batch)
            out.append((rec.get("case", repr(spec)), "dense", wl, rec["time_ms"] * 1e-3))
        else:
            wl = sim.workload(spec, _tile(rec["q_tile"]), _tile(rec["kv_tile"]), batch)
            out.append((rec.get("case", repr(spec)), "kernel", wl, rec["time_ms"] * 1e-3))
    return out


def fit(dev: sim.DeviceModel, cases, steps: int = 1500, lr: float = 0.05):
    """Fitted kernel and dense parameters (dicts) minimising the mean squared log error."""
    result = {}
    for kind, spec_fit, base in (("kernel", FIT, dict(dev.kernel)), ("dense", DENSE_FIT, sim.dense_params(dev))):
        sel = [c for c in cases if c[1] == kind]
        if not sel:
            result[kind] = None
            continue
        raw = {k: torch.tensor(_to_raw(t, base[k]), dtype=torch.float64, requires_grad=True)
               for k, t in spec_fit.items()}
        opt = torch.optim.Adam(list(raw.values()), lr=lr)
        target = torch.tensor([math.log(c[3]) for c in sel], dtype=torch.float64)
        for _ in range(steps):
            opt.zero_grad()
            params = {**base, **{k: _from_raw(spec_fit[k], r) for k, r in raw.items()}}
            pred = torch.stack([sim.predict_time(dev, c[2], params) for c in sel])
            loss = ((pred.log() - target) ** 2).mean()
            loss.backward()
            opt.step()
        result[kind] = {k: float(_from_raw(spec_fit[k], r.detach())) for k, r in raw.items()}
    return result


def errors(dev: sim.DeviceModel, cases, fitted) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for name, kind, wl, measured in cases:
        if kind == "dense":
            params = {**sim.dense_params(dev), **(fitted["dense"] or {})}
        else:
            params = {**dev.kernel, **(fitted["kernel"] or {})}
        pred = float(sim.predict_time(dev, wl, params))
        rows.append((name, kind, measured, pred, (pred - measured) / measured))
    return rows


def synthetic_records(dev: sim.DeviceModel, n: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Measurements made by a perturbed copy of the model (the truth the fit should find)."""
    g = torch.Generator().manual_seed(seed)
    truth = dict(dev.kernel)
    for k, t in FIT.items():
        f = float(torch.empty(()).uniform_(0.8, 1.2, generator=g))
        truth[k] = min(truth[k] * f, 0.95) if t == "fraction" else (1 + (truth[k] - 1) * f if t == "factor"
                                                                    else truth[k] * f)
    shapes = [((256, 256), pg.Window((80, 80), stride=(16, 16)), [(16, 8), (8, 16)]),
              ((256, 256), pg.Window((80, 80)), [(16, 8), (8, 16)]),
              ((16384,), pg.Window(2048, stride=256), [128, 64]),
              ((16384,), pg.Causal(), [128, 64]),
              ((16, 32, 32), pg.Window((8, 8, 8), stride=(2, 8, 8)), [(2, 8, 8), (2, 4, 8)]),
              ((32768,), pg.Band(4096) | pg.Sink(64), [128, 64])]
    recs = []
    for i in range(n):
        shape, pat, tiles = shapes[i % len(shapes)]
        heads = [4, 8, 16, 24][(i // len(shapes)) % 4]
        hd = [64, 128][(i // 3) % 2]
        spec = pg.Spec(pat, shape, num_heads=heads, head_dim=hd)
        t = tiles[(i // 2) % len(tiles)]
        wl = sim.workload(spec, t, t, 1)
        ms = float(sim.predict_time(dev, wl, truth)) * 1e3
        recs.append({"case": f"synthetic-{i}", "spec": repr(spec), "q_tile": t, "kv_tile": t, "batch": 1,
                     "time_ms": ms})
    return recs, truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("measurements", nargs="?", help="JSON (list or lines) of measured cases")
    ap.add_argument("--device", required=True, help="device model to start from (name or JSON path)")
    ap.add_argument("--out", help="write the calibrated device model here")
    ap.add_argument("--errors", help="write the per-case errors (markdown) here")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--synthetic", type=int, default=0, metavar="N", help="self-check on N synthetic cases")
    args = ap.parse_args(argv)
    dev = sim.load_device(args.device)
    truth = None
    if args.synthetic:
        records, truth = synthetic_records(dev, args.synthetic)
    elif args.measurements:
        records = load_records(args.measurements)
    else:
        ap.error("give MEASUREMENTS or --synthetic N")
    cases = workloads(dev, records)
    fitted = fit(dev, cases, steps=args.steps)
    rows = errors(dev, cases, fitted)
    lines = [f"# Calibration of {dev.display_name} ({date.today().isoformat()})", "",
             "| case | kind | measured | predicted | error |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {k} | {m * 1e3:.4g} ms | {p * 1e3:.4g} ms | {e:+.1%} |" for n, k, m, p, e in rows]
    worst = max(abs(r[4]) for r in rows)
    lines += ["", f"max |error| {worst:.1%} over {len(rows)} cases", "", "fitted kernel parameters:",
              json.dumps(fitted["kernel"], indent=1), "fitted dense parameters:", json.dumps(fitted["dense"], indent=1)]
    if truth is not None:
        lines += ["synthetic truth:", json.dumps({k: truth[k] for k in FIT}, indent=1)]
    report = "\n".join(lines)
    print(report)
    if args.errors:
        Path(args.errors).write_text(report + "\n")
    if args.out:
        data = dev.to_dict()
        if fitted["kernel"]:
            data["kernel"].update(fitted["kernel"])
        if fitted["dense"]:
            data["dense"].update(fitted["dense"])
        data["calibrated"] = True
        data["source"]["kernel"] = (f"fitted by examples/calibration/calibrate.py on {len(rows)} measured cases "
                                    f"({date.today().isoformat()}), max |error| {worst:.1%}")
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
