"""Choosing tiles, warps and stages: pruned candidates, timed on the GPU, the winner cached.

A winner is stored per (spec, device, dtype, batch bucket) as a JSON file
under the cache directory, so a second process never re-tunes. Without a GPU
the choice is deterministic: the tiling the simulator predicts fastest (on an H100 model).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from ...ir import Spec
from ...sim import simulate
from ...core.tiles import Tiling
from .cache import subdir, write_atomic
from .runtime import KernelConfig, TritonForward


@dataclass(frozen=True)
class Candidate:
    tiling: Tiling
    config: KernelConfig


def shared_bytes(block_m: int, block_n: int, block_d: int, stages: int, elem: int = 2) -> int:
    """Shared memory of the kernel's pipelined K/V tiles plus the Q tile."""
    return (block_m * block_d + 2 * stages * block_n * block_d) * elem


def _volume(tile) -> int:
    return math.prod(tile) if isinstance(tile, tuple) else tile


def candidates(spec: Spec, shared_limit: int = 227 * 1024, device: str = "h100") -> list[Candidate]:
    """The simulator's best tilings (power-of-two volumes >= 16, as tl.dot and tl.arange need)
    x warps x stages that fit in shared memory, best predicted first."""
    block_d = max(16, 1 << (spec.head_dim - 1).bit_length())
    if spec.routed is not None:  # a selected block is one kv tile
        tilings = [Tiling(spec.routed.block, spec.routed.block)]
    else:
        ranked = simulate(spec, device=device).candidates
        ok = [Tiling(c.q_tile, c.kv_tile) for c in ranked
              if all(v >= 16 and not v & (v - 1) for v in (_volume(c.q_tile), _volume(c.kv_tile)))]
        tilings = list(dict.fromkeys(ok))[:4] or [Tiling(64, 64)]
    out = []
    for t in tilings:
        vm, vn = _volume(t.q_tile), _volume(t.kv_tile)
        for warps in (8, 4) if vm * block_d >= 128 * 128 else (4, 8):
            for stages in (2, 3):
                if shared_bytes(vm, vn, block_d, stages) <= shared_limit:
                    out.append(Candidate(t, KernelConfig(warps, stages)))
    return out


def _key(spec: Spec, device: str, dtype: torch.dtype, batch: int) -> str:
    bucket = 1 << max(0, batch - 1).bit_length()
    text = f"{spec!r}|{device}|{dtype}|{bucket}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _store(path, record: dict) -> None:
    write_atomic(path, json.dumps(record))


def _load(path) -> Candidate | None:
    try:
        r = json.loads(path.read_text())
        to_tile = (lambda x: tuple(x) if isinstance(x, list) else x)
        return Candidate(Tiling(to_tile(r["q_tile"]), to_tile(r["kv_tile"])), KernelConfig(**r["config"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: tune again


def tuned_kernel(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 block_indices: torch.Tensor | None = None) -> TritonForward:
    """The fastest candidate for these inputs' device, dtype and batch bucket (cached on disk);
    the top-ranked candidate without a CUDA device."""
    if not q.is_cuda:
        first = candidates(spec)[0]
        return TritonForward(spec, first.tiling, first.config)
    device = torch.cuda.get_device_name(q.device)
    path = subdir("tuning") / f"{_key(spec, device, q.dtype, q.shape[0])}.json"
    best = _load(path)
    if best is None:
        import triton.testing
        limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        model = next((m for m in ("h200", "h100", "b200", "a100") if m in device.lower()), "h100")
        timed, built = [], {}
        for c in candidates(spec, limit, model):
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
        _store(path, {"q_tile": best.tiling.q_tile, "kv_tile": best.tiling.kv_tile, "config": asdict(best.config),
                      "device": device, "timings_ms": [[m, repr(c)] for m, c in timed]})
    return TritonForward(spec, best.tiling, best.config)
