"""Head-routed (Mixture-of-Head) kernels: only the (token, head) pairs a router chose are computed.

Per (batch, head), a compaction kernel lists the q slots (tokens in q-tile order)
whose token chose the head, as a stable prefix sum, and counts them per q tile.
Forward and dQ programs then take BLOCK_M compacted rows at a time; such a tile
spans consecutive q tiles ta..tb of the static plan and visits the union of
their kv tiles (undilated windows: the neighbourhood of the rows' bounding box,
in closed form). dK/dV programs walk, per kv tile, the runs of consecutive q
tiles that see it (the transposed plan), whose chosen rows are contiguous in the
compacted list. Work therefore scales with the chosen pairs, not with all heads.
"""
from __future__ import annotations

import math

import torch

from ...ir import Spec
from ...core.tiles import Tiling
from .aot import CompiledKernel
from .cache import load_source
from .codegen import heads_walk, render_heads
from .runtime import LOG2E, KernelConfig, TritonForward, backward_config, check_launch_dtype, cross_compile

MAX_CLASS_TABLE = 1 << 28
"""Largest (groups x q tiles x kv tiles) byte table of tile classes the table path keeps on the device."""


def _runs(qt: torch.Tensor, kt: torch.Tensor, full: torch.Tensor, num_kv_tiles: int):
    """Per kv tile, the q tiles that see it as maximal runs (first, last, full) of consecutive
    tiles of one class, and a pointer array [num_kv_tiles + 1] into them."""
    order = torch.argsort(kt * (int(qt.max()) + 2 if len(qt) else 1) + qt)
    qt, kt, full = qt[order], kt[order], full[order].long()
    new = torch.ones(len(qt), dtype=torch.bool)
    if len(qt):
        new[1:] = (kt[1:] != kt[:-1]) | (qt[1:] != qt[:-1] + 1) | (full[1:] != full[:-1])
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([len(qt)])]) - 1
    runs = torch.stack([qt[starts], qt[ends], full[starts]], 1)
    ptr = torch.zeros(num_kv_tiles + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(kt[starts], minlength=num_kv_tiles), 0)
    return runs, ptr


class TritonHeads:
    """Head-routed forward and backward of one spec and tiling; `head_indices[B, Nq, k]` lists
    the heads each query token uses (-1: unused slot). Unchosen (token, head) rows give zero
    output, lse -inf and zero dq, and contribute nothing to dk and dv."""

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        if spec.routed is not None:
            raise NotImplementedError("triton backend: head routing with Routed block patterns is not generated; "
                                      "use the reference backend")
        self.fwd = fwd = TritonForward(spec, tiling, config)  # grids, plan groups, head groups, constants
        self.spec, self.config = spec, fwd.config
        self.backward_config = config or backward_config(fwd.block_d)
        self.walk = heads_walk(spec, fwd.statics, fwd.q_grid, fwd.kv_grid)
        tables = self.walk.name == "tile_union"  # the tile-class table it walks; windows need none
        nq_t, nkv_t = fwd.q_grid.count, fwd.kv_grid.count
        groups = len(fwd.groups)
        if tables and groups * nq_t * nkv_t > MAX_CLASS_TABLE:
            raise NotImplementedError(f"triton backend: head routing for {spec!r} with these tiles needs a "
                                      f"{groups} x {nq_t} x {nkv_t} tile-class table; use larger tiles")
        # tile classes (0 empty, 1 partial, 2 full) for the table walk; windows need none
        classes = torch.zeros((groups, nq_t, nkv_t) if tables else (1, 1, 1), dtype=torch.int8)
        kv_lo = torch.full((groups, nq_t), nkv_t, dtype=torch.long)
        kv_hi = torch.full((groups, nq_t), -1, dtype=torch.long)
        runs, ptrs, base = [], [], 0
        for g, tp in enumerate(fwd.groups):
            q, kt, full = tp.pairs()
            if tables:
                classes[g, q, kt] = 1 + full.to(torch.int8)
            kv_lo[g].scatter_reduce_(0, q, kt, "amin")
            kv_hi[g].scatter_reduce_(0, q, kt, "amax")
            r, p = _runs(q, kt, full, nkv_t)
            runs.append(r)
            ptrs.append(p + base)
            base += len(r)
        self.tables = {"KV_LO": kv_lo.to(torch.int32), "KV_HI": kv_hi.to(torch.int32), "CLASSES": classes,
                       "RUN_PTR": torch.stack(ptrs).to(torch.int32), "RUNS": torch.cat(runs).to(torch.int32)}
        self.source = render_heads(spec, fwd.statics, fwd.q_grid, fwd.kv_grid, self.walk)
        self.module = load_source(self.source)
        self._device_tables: dict = {}

    def tables_on(self, device) -> dict:
        if device not in self._device_tables:
            self._device_tables[device] = {k: v.to(device) for k, v in self.tables.items()}
        return self._device_tables[device]

    def head_groups(self, batch: int, device) -> torch.Tensor:
        """[B, H] static group of each head (the same for every batch entry)."""
        return self.fwd.tables_on(device)[3].repeat(batch)

    # -- launches ----------------------------------------------------------------------
    def compact(self, head_indices: torch.Tensor):
        """(SLOTS [B, H, q slots], PREF [B, H, q tiles + 1]) of int32 head indices [B, Nq, k]."""
        B, _, topk = head_indices.shape
        H, nq_t, bm = self.spec.num_heads, self.fwd.q_grid.count, self.fwd.block_m
        hidx = head_indices.to(torch.int32).contiguous()
        slots = torch.empty(B, H, nq_t * bm, dtype=torch.int32, device=hidx.device)
        pref = torch.empty(B, H, nq_t + 1, dtype=torch.int32, device=hidx.device)
        chunk = max(bm, min(1024, 1 << (nq_t * bm - 1).bit_length()))
        self.module.compact_heads[(H, B)](hidx, slots, pref, hidx.stride(0), hidx.stride(1), H, nq_t, TOPK=topk,
                                          TOPK_P2=max(2, 1 << (topk - 1).bit_length()), BLOCK_M=bm, CHUNK=chunk,
                                          num_warps=4, num_stages=1)
        return slots, pref

    @staticmethod
    def _launch(config: KernelConfig) -> dict:
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)

    def forward(self, q, k, v, head_indices, scale: float | None = None):
        """(out, lse) with only the chosen (token, head) rows computed."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B = q.shape[0]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = 1.0 / math.sqrt(spec.head_dim) if scale is None else float(scale)
        slots, pref = self.compact(head_indices)
        out = torch.zeros_like(q)
        lse = torch.full((B, spec.num_heads, spec.nq), float("-inf"), device=q.device, dtype=torch.float32)
        t = self.tables_on(q.device)
        self.module.attention_fwd_heads[(fwd.q_grid.count, spec.num_heads, B)](
            q, k, v, out, lse, slots, pref, self.head_groups(B, q.device), t["KV_LO"], t["KV_HI"], t["CLASSES"], scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], spec.num_heads,
            fwd.q_grid.count, fwd.kv_grid.count, **fwd.constexprs(q.dtype), **self._launch(self.config))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, head_indices, scale: float | None = None):
        """(dq, dk, dv) of `forward`'s (out, lse); unchosen rows get dq = 0."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B = q.shape[0]
        scale = 1.0 / math.sqrt(spec.head_dim) if scale is None else float(scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        slots, pref = self.compact(head_indices)
        t, head_group = self.tables_on(q.device), self.head_groups(B, q.device)
        lse2 = torch.where(torch.isinf(lse), float("inf"), lse.float() * LOG2E).contiguous()
        delta = torch.empty(B, spec.num_heads, spec.nq, device=q.device, dtype=torch.float32)
        dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        consts = fwd.constexprs(q.dtype)
        self.module.bwd_preprocess[(-(-spec.nq // 64), spec.num_heads, B)](
            out, dout, delta, *out.stride()[:3], spec.num_heads, HEAD_DIM=spec.head_dim, BLOCK_D=fwd.block_d,
            BLOCK_M=64)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
        sizes = (spec.num_heads, fwd.q_grid.count, fwd.kv_grid.count)
        self.module.attention_bwd_dkdv_heads[(fwd.kv_grid.count, spec.num_kv_heads, B)](
            q, k, v, dout, lse2, delta, dk, dv, slots, pref, head_group, t["RUN_PTR"], t["RUNS"], scale,
            *strides, *dk.stride()[:3], *dv.stride()[:3], *sizes, **consts, **self._launch(self.backward_config))
        self.module.attention_bwd_dq_heads[(fwd.q_grid.count, spec.num_heads, B)](
            q, k, v, dout, lse2, delta, dq, slots, pref, head_group, t["KV_LO"], t["KV_HI"], t["CLASSES"],
            scale, *strides, *dq.stride()[:3], *sizes, **consts, **self._launch(self.backward_config))
        return dq, dk, dv

    # -- ahead-of-time compilation ---------------------------------------------------------
    KERNELS = ("compact_heads", "attention_fwd_heads", "attention_bwd_dq_heads", "attention_bwd_dkdv_heads")

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16, topk: int = 4,
                      names: tuple[str, ...] = KERNELS) -> list[CompiledKernel]:
        """The kernels `names` (default: compaction, forward, dQ, dK/dV) compiled for sm_<arch>
        without a GPU; the compaction for `topk` heads per token."""
        bm = self.fwd.block_m
        chunk = max(bm, min(1024, 1 << (self.fwd.q_grid.count * bm - 1).bit_length()))
        consts = {"compact_heads": {"TOPK": topk, "TOPK_P2": max(2, 1 << (topk - 1).bit_length()), "BLOCK_M": bm,
                                    "CHUNK": chunk}}
        configs = {"compact_heads": KernelConfig(4, 1), "attention_fwd_heads": self.config}
        return [cross_compile(self.source, name, getattr(self.module, name).arg_names,
                              consts.get(name, self.fwd.constexprs(dtype)), dtype, arch,
                              configs.get(name, self.backward_config), self.spec.head_dim)
                for name in names]
