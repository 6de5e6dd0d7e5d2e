"""Running a function on several local ranks of a gloo group: what the distributed tests and
`patterngen bench --distributed` do on one machine without GPUs."""
from __future__ import annotations

import pathlib
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world: int, args: tuple = (), timeout_s: float = 600.0) -> list:
    """`fn(rank, world, *args)` in `world` processes joined in a gloo group (a file rendezvous);
    their return values by rank. A rank that raises fails the run with every failing rank's
    traceback (RuntimeError); a run past `timeout_s` is killed (TimeoutError: a hang). `fn` and
    `args` must pickle (a module-level function)."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_rank_main, args=(world, d, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks still running after {timeout_s:g} s (a hang)")
        except mp.ProcessRaisedException:
            logs = sorted(pathlib.Path(d).glob("rank*.txt"))
            raise RuntimeError("\n".join(f"{p.name}:\n{p.read_text()}" for p in logs) or "a rank failed") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        return [torch.load(f"{d}/result{r}.pt") for r in range(world)]


def _rank_main(rank: int, world: int, d: str, fn, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), f"{d}/result{rank}.pt")
    except BaseException:
        with open(f"{d}/rank{rank}.txt", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


__all__ = ["run_ranks"]
