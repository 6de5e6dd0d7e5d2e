"""Choosing tiles, warps and stages: pruned candidates, timed on the GPU, the winner cached.

The tilings to try come from the caller, best predicted first (the simulator's ranking,
`patterngen.sim.ranked_kernel_tilings`), else the tiling policy's default: a backend
ranks nothing itself. A winner is stored per (spec, device, dtype, batch bucket) as a
JSON file under the cache directory, so a second process never re-tunes. Without a GPU
the choice is deterministic: the first tiling given.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from ...analysis.tiling import kernel_tilings, volume
from ...core.tiles import Tiling
from ...ir import Spec
from .cache import subdir, write_atomic
from .config import KernelConfig, head_block, pow2_ceil, shared_bytes, tiling_from_json, tiling_json
from .launch import TritonForward


@dataclass(frozen=True)
class LaunchCandidate:
    """One way to launch a spec's forward kernel: its tiles and launch parameters."""

    tiling: Tiling
    config: KernelConfig


def candidates(spec: Spec, shared_limit: int = 227 * 1024,
               tilings: list[Tiling] | None = None) -> list[LaunchCandidate]:
    """`tilings` (kernel-runnable, best first; None or empty: the tiling policy's choice) x
    warps x stages that fit in `shared_limit` bytes of shared memory, in that order."""
    block_d = head_block(spec.head_dim)
    out = []
    for t in tilings or kernel_tilings(spec):
        vm, vn = volume(t.q_tile), volume(t.kv_tile)
        for warps in (8, 4) if vm * block_d >= 128 * 128 else (4, 8):
            for stages in (2, 3):
                if shared_bytes(vm, vn, block_d, stages) <= shared_limit:
                    out.append(LaunchCandidate(t, KernelConfig(warps, stages)))
    return out


def _key(spec: Spec, device: str, dtype: torch.dtype, batch: int) -> str:
    text = f"{spec!r}|{device}|{dtype}|{pow2_ceil(batch)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _store(path, record: dict) -> None:
    write_atomic(path, json.dumps(record))


def _load(path) -> LaunchCandidate | None:
    try:
        r = json.loads(path.read_text())
        return LaunchCandidate(tiling_from_json(r), KernelConfig(**r["config"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: tune again


def tuned_kernel(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 block_indices: torch.Tensor | None = None, tilings: list[Tiling] | None = None) -> TritonForward:
    """The fastest of the `candidates` of `tilings` for these inputs' device, dtype and batch
    bucket (cached on disk); the first candidate without a CUDA device."""
    if not q.is_cuda:
        first = candidates(spec, tilings=tilings)[0]
        return TritonForward(spec, first.tiling, first.config)
    device = torch.cuda.get_device_name(q.device)
    path = subdir("tuning") / f"{_key(spec, device, q.dtype, q.shape[0])}.json"
    best = _load(path)
    if best is None:
        import triton.testing
        limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        timed, built = [], {}
        for c in candidates(spec, limit, tilings):
            try:
                if c.tiling not in built:  # plan, source and tables depend on the tiling only
                    built[c.tiling] = TritonForward(spec, c.tiling, c.config)
                kern = copy.copy(built[c.tiling])
                kern.config = c.config
                ms = triton.testing.do_bench(lambda: kern(q, k, v, block_indices=block_indices))
            except Exception:  # a config the compiler rejects (resources) is skipped, not fatal
                continue
            timed.append((ms, c))
        if not timed:
            raise RuntimeError(f"autotune: no candidate configuration compiled for {spec!r}")
        best = min(timed, key=lambda x: x[0])[1]
        _store(path, {**tiling_json(best.tiling), "config": asdict(best.config),
                      "device": device, "timings_ms": [[m, repr(c)] for m, c in timed]})
    return TritonForward(spec, best.tiling, best.config)
