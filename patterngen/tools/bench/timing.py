"""Timers of the benchmark: CUDA events on a GPU, the wall clock for the CPU smoke test.

Every timer calls the function once before timing it, so that compilation, autotuning and
other first-use costs never reach the figures.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

SMOKE_NOTE = "CPU smoke test, not a performance figure"
L2_FLUSH_BYTES = 256 * 1024 * 1024


class CudaTimer:
    """Median of CUDA-event timings: warm-up first, the L2 cache flushed before every repeat."""

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                 min_reps: int = 5, max_reps: int = 200):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def describe(self) -> str:
        return (f"median of CUDA-event timings, >= {self.min_reps} repeats over ~{self.rep_ms:g} ms after "
                f"~{self.warmup_ms:g} ms of warm-up, {L2_FLUSH_BYTES >> 20} MiB L2 flush before each repeat")

    def __call__(self, fn: Callable[[], Any]) -> dict:
        fn()  # compile / autotune / first-use costs stay out of the numbers
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            self._flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate))):
            fn()
        reps = min(self.max_reps, max(self.min_reps, int(self.rep_ms / estimate)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        times = sorted(s.elapsed_time(e) for s, e in events)
        return {"ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "reps": reps}


class CpuTimer:
    """Wall-clock median on the CPU (smoke tests only: these are not performance figures)."""

    def __init__(self, reps: int = 1):
        self.reps = reps

    def describe(self) -> str:
        return f"wall clock on the CPU, median of {self.reps} after one warm-up call ({SMOKE_NOTE})"

    def __call__(self, fn: Callable[[], Any]) -> dict:
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "reps": self.reps}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock spans are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
