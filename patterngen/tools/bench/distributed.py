"""`patterngen bench --distributed`: the keys a sequence-sharded attention moves (issue 15).

For a video DiT's 3-D neighbourhood (examples/video_dit_gna.py, and the same with 32 frames so
that 4 and 8 ranks divide it) and a 128K-token sliding-window LLM (Mistral's window 4096, 32 q /
8 kv heads, head dim 128), at 2, 4 and 8 ranks: `world` processes on this machine join a gloo
group and run `pg.distributed.attention`'s exchange (the plan's rounds of point-to-point
transfers) on bf16 keys and values of the real sizes; each reports the bytes it received and
the seconds the exchange took. Beside them: the plan's prediction of those bytes, what dense
ring attention would move, and the simulator's per-rank time on H100s over NVLink
(`pg.simulate(world_size=...)`). The attention itself is not computed here (the tests hold it
to single-process results); the CPU timings are of gloo over loopback, not of GPU links.
"""
from __future__ import annotations

import time

import torch

from ...sim.report import align_columns
from .report import environment, write_json_and_markdown

TITLE = "patterngen bench --distributed"


def cases(quick: bool) -> list[tuple[str, object, tuple[int, ...]]]:
    """(name, spec, world sizes)."""
    import patterngen as pg
    video = pg.Window((18, 24, 24), stride=(16, 8, 8))
    out = [("video DiT (30 x 48 x 80, examples/video_dit_gna.py)",
            pg.Spec(video, q_shape=(30, 48, 80), num_heads=24, head_dim=128), (2, 6)),
           ("video DiT, 32 frames (32 x 48 x 80)", pg.Spec(video, q_shape=(32, 48, 80), num_heads=24, head_dim=128),
            (2, 4, 8)),
           ("sliding window 4096, 128K tokens", pg.Spec(pg.Band(4095) & pg.Causal(), 131072, num_heads=32,
                                                        num_kv_heads=8, head_dim=128), (2, 4, 8))]
    if quick:  # a 16K-token LLM and a short video: seconds, for smoke tests
        out = [("video DiT, 8 frames (8 x 16 x 16)", pg.Spec(pg.Window((6, 8, 8), stride=(4, 4, 4)),
                                                              q_shape=(8, 16, 16), num_heads=2, head_dim=64), (2, 4)),
               ("sliding window 1024, 16K tokens", pg.Spec(pg.Band(1023) & pg.Causal(), 16384, num_heads=4,
                                                           num_kv_heads=2, head_dim=64), (2, 4))]
    return out


def _exchange(rank: int, world: int, spec) -> dict:
    """One rank: its received bytes and the seconds of its second exchange (the first connects
    the pairs)."""
    import torch.distributed as dist
    from ...analysis.shards import plan
    from ...distributed.attention import _Exchange
    dp = plan(spec, world)
    n = sum(b - a for a, b in dp.kv_shards[rank])
    g = torch.Generator().manual_seed(rank)
    k, v = (torch.randn(1, spec.num_kv_heads, n, spec.head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
    for _ in range(2):
        dist.barrier()
        ex = _Exchange(dp, rank, None)
        t0 = time.perf_counter()
        ex.start(k, v)
        kr, vr = ex.finish()
        seconds = time.perf_counter() - t0
    return {"rank": rank, "received_bytes": (kr.numel() + vr.numel()) * kr.element_size(), "seconds": seconds}


def measure(spec, world: int) -> list[dict]:
    """Per-rank received bytes and exchange seconds of `world` gloo processes."""
    from ...distributed.spawn import run_ranks
    return run_ranks(_exchange, world, (spec,))


def bench_case(name: str, spec, world: int) -> dict:
    import patterngen as pg
    dp = pg.distributed.plan(spec, world)
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 2  # K and V, bf16
    sim = pg.simulate(spec, world_size=world, layout="contiguous")
    t0 = time.perf_counter()
    rows = measure(spec, world)
    for row, r in zip(rows, sim.ranks):
        row["plan_bytes"] = dp.received_tokens[row["rank"]] * per_token
        row["sim_time_ms"] = r.time_s * 1e3
        row["sim_transfer_ms"] = r.transfer_s * 1e3
    return {"case": name, "world": world, "tokens": spec.nkv, "tiling": repr(dp.tiling), "rounds": len(dp.rounds),
            "ring_bytes": pg.distributed.ring_tokens(spec, world) * per_token, "sim_one_gpu_ms": sim.one_gpu_s * 1e3,
            "sim_ms": sim.time_s * 1e3, "wall_s": time.perf_counter() - t0, "ranks": rows}


def markdown(doc: dict) -> str:
    lines = [f"# {TITLE}", "", ", ".join(f"{k} {v}" for k, v in doc["environment"].items()), "", doc["note"], ""]
    table = [["case", "ranks", "rank", "received MB (gloo)", "plan MB", "ring MB", "x less than ring",
              "exchange s (CPU gloo)", "sim ms (H100, NVLink)", "sim transfers ms"]]
    for c in doc["results"]:
        if "error" in c:
            table.append([c["case"], str(c["world"]), "-", "error: " + c["error"][:60]] + [""] * 6)
            continue
        for r in c["ranks"]:
            got = r["received_bytes"]
            table.append([c["case"], str(c["world"]), str(r["rank"]), f"{got / 1e6:.1f}",
                          f"{r['plan_bytes'] / 1e6:.1f}",
                          f"{c['ring_bytes'] / 1e6:.1f}", f"{c['ring_bytes'] / got:.1f}" if got else "-",
                          f"{r['seconds']:.3f}", f"{r['sim_time_ms']:.3g}", f"{r['sim_transfer_ms']:.3g}"])
    lines += [align_columns(table), ""]
    lines += [f"- {c['case']}, {c['world']} ranks: tiles {c['tiling']}, {c['rounds']} round(s); simulator: "
              f"{c['sim_ms']:.3g} ms sharded against {c['sim_one_gpu_ms']:.3g} ms on one GPU"
              for c in doc["results"] if "error" not in c]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """`patterngen bench --distributed`; 1 if a case failed or received other than the plan's bytes."""
    doc = {"title": TITLE, "environment": environment(torch.device("cpu")),
           "note": "Measured: bytes each rank received through pg.distributed.attention's exchange (gloo, processes "
                   "on this machine's CPU, bf16 keys and values of the real sizes, batch 1) and its wall time; plan: "
                   "the bytes the distributed plan predicts; ring: dense ring attention's (world - 1) shards; sim: "
                   "pg.simulate(world_size=...) on H100s over NVLink (contiguous layout).",
           "results": []}
    ok = True
    for name, spec, worlds in cases(args.quick):
        for world in worlds:
            try:
                res = bench_case(name, spec, world)
                ok &= all(r["received_bytes"] == r["plan_bytes"] for r in res["ranks"])
            except Exception as e:  # noqa: BLE001 - the other cases still run
                res = {"case": name, "world": world, "error": f"{type(e).__name__}: {e}"}
                ok = False
            doc["results"].append(res)
            print(f"[distributed] {name}, {world} ranks: " + (res.get("error") or f"{res['wall_s']:.1f} s"), flush=True)
            if args.out:
                write_json_and_markdown(args.out, doc, markdown(doc))
    print(markdown(doc))
    return 0 if ok else 1
